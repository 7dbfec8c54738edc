"""Is this file a disk image we may use as a base? Checked before anything else opens it.

Bases are untrusted: a qcow2 header can name any host file as its backing file or external data
file (CVE-2010-3851, OSSA-2024-001), so the header is read here with plain file reads first and
such images are refused before qemu ever opens them; then `qemu-img info` runs with an explicit
format, read-only (`--force-share`), under CPU and memory limits (nova's prlimit).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmtool.errors import CommandError, ImageError
from vmtool.run import QEMU_IMG_LIMITS, run

QCOW2_MAGIC = b"QFI\xfb"
# Formats qemu knows that vmtool refuses as bases: name -> (offset, magic).
OTHER_MAGICS: dict[str, tuple[int, bytes]] = {
    "vmdk": (0, b"KDMV"),
    "vmdk descriptor": (0, b"# Disk DescriptorFile"),
    "vhdx": (0, b"vhdxfile"),
    "vpc": (0, b"conectix"),
    "qed": (0, b"QED\x00"),
    "vdi": (0x40, b"\x7f\x10\xda\xbe"),
    "luks": (0, b"LUKS\xba\xbe"),
    "gzip": (0, b"\x1f\x8b"),
    "xz": (0, b"\xfd7zXZ\x00"),
    "zstd": (0, b"\x28\xb5\x2f\xfd"),
    "bzip2": (0, b"BZh"),
    "tar": (257, b"ustar"),
    "zip": (0, b"PK\x03\x04"),
}
# Signs that a raw file is a disk: a partition table or a filesystem superblock.
RAW_SIGNS: tuple[tuple[str, int, bytes], ...] = (
    ("mbr", 510, b"\x55\xaa"),
    ("gpt", 512, b"EFI PART"),
    ("ext", 0x438, b"\x53\xef"),
    ("xfs", 0, b"XFSB"),
    ("iso9660", 0x8001, b"CD001"),
    ("btrfs", 0x10040, b"_BHRfS_M"),
    ("lvm", 0x218, b"LVM2 001"),
    ("swap", 4086, b"SWAPSPACE2"),
)
SECTOR = 512
_FLATTEN = "flatten it first: qemu-img convert -O qcow2 IMAGE flat.qcow2"
_CONVERT = "check the image with qemu-img check, or rebuild it"


@dataclass(frozen=True)
class ImageInfo:
    format: str  # qcow2 | raw
    virtual_size: int


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def sniff(path: Path) -> str:
    """'qcow2', 'raw' (a recognisable disk), 'data' (unrecognised bytes), or the name of another format."""
    with open(path, "rb") as f:
        if _read_at(f, 0, 4) == QCOW2_MAGIC:
            return "qcow2"
        for name, (off, magic) in OTHER_MAGICS.items():
            if _read_at(f, off, len(magic)) == magic:
                return name
        for _name, off, magic in RAW_SIGNS:
            if _read_at(f, off, len(magic)) == magic:
                return "raw"
    return "data"


def qcow2_header_refs(path: Path) -> tuple[str | None, bool]:
    """(backing file name or None, has external data file) from a qcow2 header, by plain reads."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        if len(hdr) < 72 or hdr[:4] != QCOW2_MAGIC:
            raise ImageError(f"{path}: truncated or damaged qcow2 header", hint=_CONVERT)
        version = struct.unpack(">I", hdr[4:8])[0]
        b_off, b_size = struct.unpack(">QI", hdr[8:20])
        backing = None
        if b_off:
            backing = _read_at(f, b_off, min(b_size, 4096)).decode(errors="replace")
        data_file = False
        if version >= 3 and len(hdr) >= 80:
            incompatible = struct.unpack(">Q", hdr[72:80])[0]
            data_file = bool(incompatible & 0x4)
    return backing, data_file


def qcow2_backing(path: Path) -> str | None:
    """The backing file an overlay names (None if not a qcow2 or none); for cache liveness checks."""
    try:
        return qcow2_header_refs(path)[0]
    except (OSError, ImageError):
        return None


def check_base(path: Path, fmt: str | None, *, what: str) -> ImageInfo:
    """Validate an untrusted base image; `fmt` is what the user declared (None: detect)."""
    try:
        size = path.stat().st_size
        kind = sniff(path)
    except OSError as e:
        raise ImageError(
            f"{what}: cannot read: {e.strerror}", hint="check the source's permissions"
        ) from None
    if size == 0:
        raise ImageError(f"{what} is empty, not a disk image", hint="check the source URL or path")
    if kind not in ("qcow2", "raw", "data"):
        raise ImageError(
            f"{what} is a {kind} file, not a qcow2 or raw disk image",
            hint="convert it first: qemu-img convert -O qcow2 SRC base.qcow2",
        )
    if fmt is None:
        if kind == "data":
            raise ImageError(
                f"{what} is not a disk image (no qcow2 header, partition table or filesystem found)",
                hint="if it really is a raw disk image, pass --format raw (a #format=raw fragment for the plugin)",
            )
        fmt = kind
    elif fmt == "qcow2" and kind != "qcow2":
        raise ImageError(f"{what} is not a qcow2 image (--format qcow2 was given)", hint="check --format")
    elif fmt == "raw" and kind == "qcow2":
        raise ImageError(
            f"{what} is a qcow2 image but --format raw was given",
            hint="drop --format or pass --format qcow2",
        )
    elif fmt not in ("raw", "qcow2"):
        raise ImageError(f"unsupported format {fmt!r}", hint="use --format raw or --format qcow2")
    if fmt == "raw" and size % SECTOR:
        raise ImageError(
            f"{what} is {size} bytes, not a whole number of 512-byte sectors: not a disk image",
            hint="check that the source is the disk image you meant",
        )
    if fmt == "qcow2":
        backing, data_file = qcow2_header_refs(path)
        if backing is not None:
            raise ImageError(
                f"{what} has a backing file ({backing!r}); a base must stand alone",
                hint="flatten it first: qemu-img convert -O qcow2 IMAGE flat.qcow2",
            )
        if data_file:
            raise ImageError(
                f"{what} has an external data file; a base must stand alone",
                hint="flatten it first: qemu-img convert -O qcow2 IMAGE flat.qcow2",
            )
    info = qemu_img_info(path, fmt, what=what)
    if info.get("format") != fmt:
        raise ImageError(f"{what}: qemu-img reads it as {info.get('format')!r}, not {fmt}", hint=_CONVERT)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(f"{what} has a backing file; a base must stand alone", hint=_FLATTEN)
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise ImageError(f"{what} has an external data file; a base must stand alone", hint=_FLATTEN)
    if data.get("corrupt"):
        raise ImageError(f"{what} is marked corrupt", hint="qemu-img check it, or rebuild it")
    vsize = int(info.get("virtual-size") or 0)
    if vsize <= 0:
        raise ImageError(f"{what}: qemu-img reports no virtual size", hint=_CONVERT)
    return ImageInfo(format=fmt, virtual_size=vsize)


def qemu_img_info(path: Path, fmt: str, *, what: str) -> dict[str, Any]:
    try:
        proc = run(
            ["qemu-img", "info", "--output=json", "--force-share", "-f", fmt, os.fspath(path)],
            limits=QEMU_IMG_LIMITS,
            timeout=60,
        )
    except CommandError as e:
        raise ImageError(f"{what}: qemu-img cannot read it as {fmt}: {e.message}", hint=_CONVERT) from None
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ImageError(f"{what}: qemu-img info printed no JSON", hint=_CONVERT) from None
    if not isinstance(info, dict):
        raise ImageError(f"{what}: qemu-img info printed unexpected JSON", hint=_CONVERT)
    return info
