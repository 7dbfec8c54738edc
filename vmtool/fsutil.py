"""Files that appear only when complete: temporary names in the same directory, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vmtool.errors import VmtoolError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed over `dest`, on error removed."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if mode is not None:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_atomic(dest: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> None:
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(dest, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `dest` and rename it into place when complete.

    An existing non-empty `dest` is refused unless force=True (then it is replaced only on success).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise VmtoolError(f"output {dest} exists and is not a directory", hint="choose another -o path")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise VmtoolError(
            f"output directory {dest} exists and is not empty",
            hint="choose another -o path, or pass --force to replace it",
        )
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise VmtoolError(f"cannot create {dest}: {e.strerror}", hint="check the directory's permissions") from None
    try:
        yield tmp
        if dest.exists():
            old = parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def os_error(e: OSError, what: str) -> VmtoolError:
    """Turn an OSError into a user error; ENOSPC and EACCES get their own hints."""
    if e.errno == errno.ENOSPC:
        return VmtoolError(f"{what}: no space left on device", hint="free some space or choose another directory")
    if e.errno in (errno.EACCES, errno.EPERM):
        return VmtoolError(f"{what}: permission denied", hint="check ownership and permissions")
    return VmtoolError(f"{what}: {e.strerror or e}")
