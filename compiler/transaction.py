"""The output folder as one transaction, one run per output folder, and a Ctrl-C that is never lost.

A run builds its whole output set (pruned.onnx and its .data, attribution/, engines/, report.json/md/png) in a
staging folder beside the output folder, `.<name>.disasm-<8 hex>`, and moves it into place only when it is complete
(`OutputTransaction.commit`). An existing folder (empty, or with --force an earlier output set) is swapped out in the
same step (one `renameat2(RENAME_EXCHANGE)` on Linux, else two renames) and removed afterwards. A failure or an
interrupt at any stage before that removes the staging folder: the output folder is either as it was or the complete
new set, never a mix.

`.<name>.disasm-lock` beside the output folder is held (`flock`) from the first check to the end, so a second run into
the same folder refuses instead of racing; the kernel drops the lock with its process, so a crashed run's lock file
(its dead pid inside) is simply taken over. Whoever holds the lock also clears what a killed run left: staging folders
and an earlier set moved aside (`.<name>.disasm-previous`, put back when the output folder is missing).

SIGINT: `interrupts()` (the CLI) turns it into a flag as well as a KeyboardInterrupt, because a library calling back
into Python can swallow the exception (TensorRT's logger prints "Exception caught in log(): KeyboardInterrupt" and
builds on). `raise_if_interrupted()` after such a call, and `commit` itself, raise it again. During the commit an
interrupt is only recorded: the swap is never cut in half.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from disasm.compiler.errors import DisasmError

LOCK_SUFFIX = ".disasm-lock"
STAGING_TAG = ".disasm-"
PREVIOUS_SUFFIX = ".disasm-previous"
# What an output set holds: --force replaces a folder only when nothing else is in it (never a user's own files).
OUTPUT_NAMES = frozenset({"pruned.onnx", "pruned.onnx.data", "report.json", "report.md", "report.png", "engines",
                          "attribution", ".full.onnx", ".full.onnx.data"})


# ---- interrupts ----------------------------------------------------------------------------------------------------

_interrupt = {"pending": False, "deferred": 0}


def _on_sigint(signum: int, frame: object) -> None:
    _interrupt["pending"] = True
    if not _interrupt["deferred"]:
        raise KeyboardInterrupt


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt as usual and is also remembered (`interrupted()`), for the duration. Only the
    main thread can install it; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    _interrupt["pending"], _interrupt["deferred"] = False, 0
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def interrupted() -> bool:
    """Whether SIGINT arrived since `interrupts()` began, whether or not its KeyboardInterrupt got through."""
    return bool(_interrupt["pending"])


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt a callee swallowed (call after long foreign calls: the TensorRT build)."""
    if _interrupt["pending"]:
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A section SIGINT does not cut: an interrupt in it is only recorded (`interrupted()`)."""
    _interrupt["deferred"] += 1
    try:
        yield
    finally:
        _interrupt["deferred"] -= 1


# ---- the output folder ---------------------------------------------------------------------------------------------

class OutputTransaction:
    """One run's output set: `begin(out)` locks the folder, checks it and returns the staging folder to write into;
    `commit()` moves the complete set into place; leaving the `with` block without a commit removes the staging
    folder and leaves the output folder as it was. The lock is held until the block ends."""

    def __init__(self, force: bool = False):
        self.force = force
        self.out: Path | None = None       # as the user named it
        self.target: Path | None = None    # the folder itself (symlinks resolved)
        self.staging: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def begin(self, out: Path) -> Path:
        """Lock `out`, check that it can be written (and replaced, when it exists) and create the staging folder
        beside it. Raises DisasmError for anything the user can fix, before any long work."""
        if self.staging is not None:
            raise RuntimeError("this output transaction has already begun")
        self.out, self.target = Path(out), Path(os.path.realpath(out))
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DisasmError(f"{out}: cannot create the folder it goes in, {parent} ({_reason(e)}); choose another "
                              f"--out") from None
        self._lock(parent / f".{self.target.name}{LOCK_SUFFIX}")
        self._recover()
        self._check_target()
        for _ in range(100):
            staging = parent / f".{self.target.name}{STAGING_TAG}{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise DisasmError(f"{out}: cannot write in {parent} ({_reason(e)}); choose another --out") from None
        else:
            raise RuntimeError(f"no free staging folder name in {parent}")
        staging.chmod(0o777 & ~_umask())
        self.staging = staging
        return staging

    def commit(self) -> None:
        """Move the staging folder into place as the output folder (replacing an empty folder, or with --force an
        earlier output set) and remove what it replaced. A pending interrupt aborts instead."""
        if self.staging is None or self.target is None:
            raise RuntimeError("commit before begin")
        raise_if_interrupted()
        with deferred_interrupts():
            target, staging = self.target, self.staging
            if target.exists() or target.is_symlink():
                self._check_target()  # nothing else may have appeared there meanwhile
                if _exchange(staging, target):
                    self.committed = True  # the staging name now holds the earlier contents
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    previous = target.with_name(f".{target.name}{PREVIOUS_SUFFIX}")
                    os.rename(target, previous)
                    os.rename(staging, target)
                    self.committed = True
                    shutil.rmtree(previous, ignore_errors=True)
            else:
                os.rename(staging, target)
                self.committed = True
            _fsync_dir(target.parent)
            self.staging = None

    def close(self) -> None:
        """Remove an uncommitted staging folder and release the lock."""
        with deferred_interrupts():
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            if self._lock_fd is not None:
                try:
                    self._lock_path.unlink(missing_ok=True)  # still held, so no other run is between open and flock
                except OSError:
                    pass
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- helpers --

    def _lock(self, path: Path) -> None:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise DisasmError(f"{self.out}: cannot write in {path.parent} ({_reason(e)}); choose another "
                                  f"--out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise DisasmError(f"{self.out}: another disasm-compile run{f' (pid {holder})' if holder else ''} is "
                                  f"writing this output folder; wait for it to finish or choose another --out") from None
            except OSError:  # no flock on this file system: trust a live pid in the file
                holder = _read_pid(fd)
                if holder and holder != os.getpid() and _alive(holder):
                    os.close(fd)
                    raise DisasmError(f"{self.out}: another disasm-compile run (pid {holder}) is writing this output "
                                      f"folder; wait for it to finish or choose another --out") from None
            try:  # the previous holder may have removed the file between our open and flock: lock the one there
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd, self._lock_path = fd, path

    def _recover(self) -> None:
        """What a killed run into this folder left behind (the lock is ours, so that run is gone)."""
        target = self.target
        pattern = re.compile(re.escape(f".{target.name}{STAGING_TAG}") + r"[0-9a-f]{8}")
        for entry in target.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        previous = target.with_name(f".{target.name}{PREVIOUS_SUFFIX}")
        if previous.is_dir() and not previous.is_symlink():
            if target.exists() or target.is_symlink():
                shutil.rmtree(previous, ignore_errors=True)  # that run had committed; only the cleanup was cut
            else:
                os.rename(previous, target)  # cut between its two renames: the earlier set goes back

    def _check_target(self) -> None:
        out, target = self.out, self.target
        if not (target.exists() or target.is_symlink()):
            return
        if not target.is_dir():
            raise DisasmError(f"{out}: exists and is not a folder")
        if os.path.ismount(target):
            raise DisasmError(f"{out}: is a mount point, which cannot be replaced; use a folder inside it as --out")
        entries = sorted(p.name for p in target.iterdir())
        if entries and not self.force:
            raise DisasmError(f"{out}: output folder exists; pass --force to replace its contents or choose another "
                              f"--out")
        foreign = [name for name in entries if name not in OUTPUT_NAMES]
        if foreign:
            raise DisasmError(f"{out}: --force replaces only an earlier output folder of disasm-compile, and this one "
                              f"also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; choose "
                              f"another --out")
        for folder, dirs, _ in os.walk(target):  # removing the earlier set needs write access to all of it
            if not os.access(folder, os.W_OK | os.X_OK):
                raise DisasmError(f"{out}: {folder} is not writable, so the output folder cannot be replaced; fix its "
                                  f"permissions or choose another --out")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False when this system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
