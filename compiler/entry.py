"""The disasm-compile console script: Ctrl-C is answered with one line from the first instruction on.

compiler.cli installs its interrupt handling in main(), after its own imports; a handler installed at import time
there would also take over Ctrl-C in every program that imports the module (pytest, notebooks). This entry point
installs a minimal one before importing anything else, and cli.main replaces it.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    sys.stderr.write("disasm-compile: interrupted; the output folder was left as it was\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from disasm.compiler.cli import main as cli_main  # its interrupts() takes Ctrl-C over from here

    return cli_main()
