"""The stage's policy on untrusted bases, over the one inspector in vmtool.image.formats.

A base must stand alone (no backing file, no external data file), be recognisably a disk unless its
format was declared, and pass `qemu-img info` and `qemu-img check` under limits before it enters the
cache. An overlay in the cache names its base there; `qcow2_backing` reads that name for liveness.
"""

from __future__ import annotations

from pathlib import Path

from vmtool.image import formats
from vmtool.image.formats import ImageInfo

BASE_POLICY = formats.Policy(guess_raw=False, qemu_check=True)


def check_base(path: Path, fmt: str | None, *, what: str) -> ImageInfo:
    """Validate an untrusted base image; `fmt` is what the user declared (None: recognise it)."""
    return formats.check(path, fmt, BASE_POLICY, what=what)


def qcow2_backing(path: Path) -> str | None:
    """The backing file an overlay names (None if not a qcow2, unreadable, or none)."""
    try:
        info = formats.inspect(path)
    except OSError:
        return None
    return info.backing if info.format == "qcow2" else None
