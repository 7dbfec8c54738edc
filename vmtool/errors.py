"""The one error hierarchy. The library raises these; only vmtool/cli/ turns them into messages."""

from __future__ import annotations


class VmtoolError(Exception):
    """A failure the user can act on: a one-line message and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class VmtoolBug(Exception):
    """A programming error inside vmtool; never caught, always shown with a traceback."""


class ToolMissing(VmtoolError):
    def __init__(self, name: str, *, package: str | None = None) -> None:
        hint = f"install the Debian package {package}" if package else "run 'make deps' as root"
        super().__init__(f"required program {name!r} was not found on PATH", hint=hint)
        self.name = name


class CommandError(VmtoolError):
    """An external command failed: carries its argv, exit status and the tail of its stderr."""

    def __init__(
        self,
        argv: list[str],
        returncode: int,
        stderr_tail: str,
        *,
        hint: str | None = None,
        timed_out: bool = False,
    ) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        name = argv[0] if argv else "?"
        if timed_out:
            what = "timed out"
        elif returncode < 0:
            what = f"was killed by signal {-returncode}"
        else:
            what = f"exited with status {returncode}"
        last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else ""
        msg = f"{name} {what}" + (f": {last}" if last else "")
        super().__init__(msg, hint=hint)


class ImageError(VmtoolError):
    """A disk image is unreadable, malformed, hostile or unsupported."""


class OutputExists(VmtoolError):
    pass


class StageError(VmtoolError):
    pass


class FetchError(StageError):
    pass


class DomainError(VmtoolError):
    pass


class LaunchError(VmtoolError):
    pass


class CgroupError(LaunchError):
    pass


class QueueError(VmtoolError):
    pass


class PublishError(VmtoolError):
    pass


class TransferFailed(FetchError):
    """A fetch failure with the details HTCondor's TransferErrorData wants (type, code, server)."""

    def __init__(
        self, message: str, *, hint: str | None = None, error_type: str = "Transfer", code: int = -1,
        server: str = "", failure_type: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.error_type = error_type
        self.code = code
        self.server = server
        self.failure_type = failure_type
