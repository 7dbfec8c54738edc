"""The input disk: format detection without probing by qemu, qcow2 safety checks, and a raw view of it.

A qcow2 input is checked with `qemu-img info -f qcow2 --force-share` under resource limits, and refused
if it names a backing file or an external data file (never followed: CVE-2024-32498 class). vmtool then
reads a sparse raw copy of it made by `qemu-img convert` beside the output, so every parser works on
plain byte offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmtool.errors import CommandError, ImageError
from vmtool.fsutil import os_error
from vmtool.run import QEMU_IMG_LIMITS, run

QCOW2_MAGIC = b"QFI\xfb"
OTHER_MAGICS = {
    b"KDMV": "vmdk",
    b"# Disk Descriptor": "vmdk",
    b"vhdxfile": "vhdx",
    b"conectix": "vhd",
    b"<<< Oracle VM VirtualBox Disk Image >>>": "vdi",
}
FORMATS = ("raw", "qcow2")
ZERO = bytes(1 << 20)


@dataclass
class Source:
    path: Path
    format: str
    size: int  # virtual size


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    for magic, name in OTHER_MAGICS.items():
        if head.startswith(magic):
            raise ImageError(
                f"{path}: {name} images are not supported",
                hint=f"convert it first: qemu-img convert -f {name} -O qcow2 {path} disk.qcow2",
            )
    return "raw"


def open_source(path: str | os.PathLike[str], fmt: str | None = None) -> Source:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageError(f"{p}: no such file", hint="give the path of a whole-disk image") from None
    except OSError as e:
        raise os_error(e, str(p)) from None
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file", hint="give the path of a whole-disk image file")
    try:
        found = detect_format(p)
    except OSError as e:
        raise os_error(e, f"cannot read {p}") from None
    if fmt is None:
        fmt = found
    if fmt not in FORMATS:
        raise ImageError(f"unsupported image format {fmt!r}", hint="use --format raw or --format qcow2")
    if fmt == "raw":
        if st.st_size == 0:
            raise ImageError(f"{p}: the file is empty", hint="give a whole-disk image")
        return Source(p, "raw", st.st_size)
    if found != "qcow2":
        raise ImageError(
            f"{p}: not a qcow2 image (no qcow2 header)", hint="check --format; is it a raw image?"
        )
    return Source(p, "qcow2", _qcow2_size(p))


def _qcow2_size(p: Path) -> int:
    try:
        out = run(
            ["qemu-img", "info", "-f", "qcow2", "--force-share", "--output=json", os.fspath(p)],
            limits=QEMU_IMG_LIMITS,
            timeout=60,
        ).stdout
        info = json.loads(out)
    except CommandError as e:
        raise ImageError(
            f"{p}: not a valid qcow2 image ({e.message})",
            hint="the file is damaged or truncated; give the complete image",
        ) from None
    except json.JSONDecodeError:
        raise ImageError(
            f"{p}: qemu-img info gave unreadable output", hint="check the qemu-utils package"
        ) from None
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(
            f"{p}: qcow2 image has a backing file ({info.get('backing-filename')}), which vmtool never follows",
            hint="flatten a trusted image first: qemu-img convert -O qcow2 IMAGE flat.qcow2",
        )
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise ImageError(
            f"{p}: qcow2 image uses an external data file ({data['data-file']}), which vmtool never follows",
            hint="convert a trusted image to a self-contained one first: qemu-img convert -O qcow2 IMAGE flat.qcow2",
        )
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise ImageError(f"{p}: qcow2 image has no valid virtual size", hint="the image is damaged")
    # A truncated qcow2 still converts (qemu reads missing clusters as zeros): check its metadata first.
    chk = run(
        ["qemu-img", "check", "-f", "qcow2", "--force-share", "--output=json", os.fspath(p)],
        limits=QEMU_IMG_LIMITS,
        timeout=120,
        check=False,
    )
    try:
        report = json.loads(chk.stdout or b"{}")
    except json.JSONDecodeError:
        report = {}
    bad = int(report.get("corruptions", 0) or 0) + int(report.get("check-errors", 0) or 0)
    if chk.returncode in (1, 2) or bad:
        raise ImageError(
            f"{p}: the qcow2 image is damaged or truncated ({bad} errors in its metadata)",
            hint="give the complete image; 'qemu-img check' shows the damage",
        )
    return size


@contextlib.contextmanager
def raw_view(src: Source, workdir: Path) -> Iterator[Path]:
    """A raw file with the disk's bytes: the source itself, or a sparse conversion inside `workdir`."""
    if src.format == "raw":
        yield src.path
        return
    tmp = workdir / ".source.raw"
    try:
        run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.fspath(src.path), os.fspath(tmp)],
            hint="the qcow2 image may be damaged; check it with qemu-img check",
        )
    except CommandError as e:
        tmp.unlink(missing_ok=True)
        if "No space left" in e.stderr_tail:
            raise ImageError(
                f"converting {src.path} to raw: no space left on device",
                hint="free some space beside the output directory",
            ) from None
        raise ImageError(
            f"{src.path}: cannot read the qcow2 image ({e.message})",
            hint="the image is damaged or truncated; check it with qemu-img check",
        ) from None
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


class Cancelled(Exception):
    pass


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
                    raise ImageError(f"{path}: file shrank while it was read")
                h.update(buf)
                left -= len(buf)
            pos = hole
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        k = min(n, len(ZERO))
        h.update(ZERO[:k] if k < len(ZERO) else ZERO)
        n -= k


def _cache_dir() -> Path:
    base = os.environ.get("VMTOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmtool"
    )
    return Path(base) / "sha256"


def _cache_key(st: os.stat_result) -> str:
    return f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def cached_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a source image, remembered per (device, inode, size, mtime) as git's index does.

    Builds of the same disk with other options (labels, keys, kernels) then skip re-reading it. The
    cache lives in ~/.cache/vmtool (or $VMTOOL_CACHE_DIR); the input file itself is never written.
    """
    st = os.stat(path)
    entry = _cache_dir() / _cache_key(st)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = entry.read_text().strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
    digest = sha256_file(path, stop=stop)
    after = os.stat(path)
    if _cache_key(after) == _cache_key(st):
        with contextlib.suppress(OSError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
            tmp.write_text(digest + "\n")
            os.replace(tmp, entry)
    return digest


class BackgroundHash:
    """sha256 of a source file computed in a thread (hashlib releases the GIL), joined when needed."""

    def __init__(self, path: Path, *, cache: bool = True) -> None:
        self.path = path
        self.cache = cache
        self.stop = threading.Event()
        self.result: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vmtool-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.cache:
                self.result = cached_sha256(self.path, self.stop)
            else:
                self.result = sha256_file(self.path, stop=self.stop)
        except Cancelled:
            pass
        except BaseException as e:  # re-raised in the caller's thread by get()
            self.error = e

    def cancel(self) -> None:
        """Stop early (the build failed); the thread ends at its next chunk."""
        self.stop.set()

    def get(self) -> str:
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, OSError):
                raise os_error(self.error, f"reading {self.path}") from None
            raise self.error
        assert self.result is not None
        return self.result
