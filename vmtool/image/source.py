"""The input disk: checked by vmtool.image.formats, then a raw view of it.

A qcow2 input must stand alone (no backing or external data file, never followed: CVE-2024-32498
class) and pass `qemu-img check`; vmtool then reads a sparse raw copy of it made by `qemu-img convert`
beside the output, so every parser works on plain byte offsets.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmtool.errors import CommandError, ImageError
from vmtool.fsutil import Cancelled, os_error, sha256_file
from vmtool.image import formats
from vmtool.run import run

# A build reads a disk without a recognisable first sector as raw (its own parsers then explain what
# they find); the image must stand alone and its qcow2 metadata must be whole.
SOURCE_POLICY = formats.Policy(qemu_check=True)


@dataclass(frozen=True)
class SourceDisk:
    path: Path
    format: str
    size: int  # virtual size


def open_source(path: str | os.PathLike[str], fmt: str | None = None) -> SourceDisk:
    p = Path(path)
    info = formats.check(p, fmt, SOURCE_POLICY)
    return SourceDisk(p, info.format, info.virtual_size)


@contextlib.contextmanager
def raw_view(src: SourceDisk, workdir: Path) -> Iterator[Path]:
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




def build_cache_dir(kind: str) -> Path:
    """Where builds remember what they computed from content (kind: "sha256", "initrd")."""
    base = os.environ.get("VMTOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmtool"
    )
    return Path(base) / kind


def _cache_key(st: os.stat_result) -> str:
    return f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def cached_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a source image, remembered per (device, inode, size, mtime) as git's index does.

    Builds of the same disk with other options (labels, keys, kernels) then skip re-reading it. The
    cache lives in ~/.cache/vmtool (or $VMTOOL_CACHE_DIR); the input file itself is never written.
    """
    st = os.stat(path)
    entry = build_cache_dir("sha256") / _cache_key(st)
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
