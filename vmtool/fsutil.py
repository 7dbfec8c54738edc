"""Files that appear only when complete: temporary names in the same directory, then rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
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


def unsafe_dir(path: str | os.PathLike[str], *, writer_ok: bool = False) -> str | None:
    """Why a directory may not hold files another user must trust (None: it is safe).

    Safe: a real directory (no symlink) owned by this user or root, and writable by nobody else - unless
    `writer_ok` and it has the sticky bit (then others may add files but not replace ours).
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or str(e)
    import stat

    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid}, another user"
    if st.st_mode & 0o022 and not (writer_ok and st.st_mode & stat.S_ISVTX):
        return f"it is writable by {'group and others' if st.st_mode & 0o002 else 'its group'} (mode " \
               f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit"
    return None


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create (or check) a directory only this user can use: mode 0700, owned by us, not a symlink."""
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=False, exist_ok=True)
    except FileNotFoundError:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        p.mkdir(mode=0o700, exist_ok=True)
    import stat

    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise VmtoolError(f"{p} is not a directory owned by this user (uid {os.geteuid()})",
                          hint=f"remove {p}, or set XDG_CACHE_HOME to a directory of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
    return p


def user_cache_dir() -> Path:
    """This user's vmtool cache, created 0700 on first use and independent of a foreign $HOME.

    root: /var/cache/vmtool. Others: $XDG_CACHE_HOME/vmtool, else ~/.cache/vmtool when $HOME is this
    user's own, else /var/tmp/vmtool-<uid>. HTCondor runs file-transfer plugins as the job user but with
    the starter's environment (HOME=/root), so the last one is what a plugin gets with no setup.
    """
    if os.geteuid() == 0:
        return Path("/var/cache/vmtool")
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg) and _mine(Path(xdg)):
        return Path(xdg) / "vmtool"
    home = os.environ.get("HOME") or ""
    if home and os.path.isabs(home) and _mine(Path(home)):
        return Path(home) / ".cache" / "vmtool"
    return Path("/var/tmp") / f"vmtool-{os.geteuid()}"


def _mine(p: Path) -> bool:
    """p exists (or can exist under an existing parent of ours) and belongs to this user."""
    for q in (p, *p.parents):
        try:
            st = os.stat(q)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        return st.st_uid == os.geteuid() and os.access(q, os.W_OK | os.X_OK)
    return False


ZERO = bytes(1 << 20)


class Cancelled(Exception):
    """A long read stopped because its caller set the stop event."""


def sha256_file(path: Path, *, sparse: bool = True, stop: threading.Event | None = None) -> str:
    """sha256 of a file's bytes; holes are hashed from a zero buffer without reading them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            if sparse:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    data = size
                _hash_zeros(h, data - pos)
                if data >= size:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            else:
                data, hole = pos, size
            f.seek(data)
            left = hole - data
            while left > 0:
                if stop is not None and stop.is_set():
                    raise Cancelled()
                buf = f.read(min(left, 8 << 20))
                if not buf:
                    raise VmtoolError(f"{path}: file shrank while it was read", hint="another process changed it; try again")
                h.update(buf)
                left -= len(buf)
            pos = hole
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        k = min(n, len(ZERO))
        h.update(ZERO[:k] if k < len(ZERO) else ZERO)
        n -= k
