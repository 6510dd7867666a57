"""The one user-facing error type. The CLI turns it into one line and exit code 2; anything else is a bug."""


class DisasmError(Exception):
    """A problem with the user's input that they can fix: the message says what, where, and how."""


class UnsupportedOpsError(DisasmError):
    """The model uses operators this tool cannot execute or analyse."""

    def __init__(self, what: str, op_types: set[str], supported: set[str] | None = None):
        listed = ", ".join(sorted(op_types))
        hint = f" Supported: {', '.join(sorted(supported))}." if supported else ""
        super().__init__(f"{what}: unsupported ONNX operator(s): {listed}.{hint}")
        self.op_types = frozenset(op_types)
