"""Every disk-image format vmtool may meet, told apart by its own bytes, and the one safety check.

Images are untrusted: a qcow2 header can name any host file (or a `json:`/`nbd:` pseudo-filename) as
its backing file or external data file, a vmdk descriptor names extent files, and `qemu-img info`
itself has been a denial-of-service vector. So an image is read here with plain file reads first
(`inspect`), judged against the caller's `Policy` (`check`), and only then, if the policy asks, shown
to `qemu-img info` with its format forced, read-only and under nova's resource limits; qemu's answer
must agree with the header.

vmtool runs raw and qcow2 disks only. Every other format is recognised so that it is refused by name,
whatever format the user declared; a raw file is described by what its first sectors hold (a
partition table, a filesystem, an ISO 9660 volume).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmtool.errors import CommandError, ImageError, VmtoolError
from vmtool.run import QEMU_IMG_LIMITS, run

SECTOR = 512


class ImageFormat(StrEnum):
    """The formats vmtool reads whole disks in and writes root filesystems and disks as (it runs them)."""

    RAW = "raw"
    QCOW2 = "qcow2"


FORMATS = tuple(f.value for f in ImageFormat)


@dataclass(frozen=True)
class Magic:
    format: str  # qemu's driver name where qemu has one
    offset: int
    magic: bytes
    label: str  # for messages: "vmdk", "gzip-compressed"


# Formats that are not raw, by their signature. First match wins; qcow2 is parsed, the rest refused.
MAGICS: tuple[Magic, ...] = (
    Magic("qcow2", 0, b"QFI\xfb", "qcow2"),
    Magic("qed", 0, b"QED\x00", "qed"),
    Magic("vmdk", 0, b"KDMV", "vmdk"),
    Magic("vmdk", 0, b"COWD", "vmdk"),
    Magic("vmdk", 0, b"# Disk DescriptorFile", "vmdk"),
    Magic("vhdx", 0, b"vhdxfile", "vhdx"),
    Magic("vpc", 0, b"conectix", "vhd"),
    Magic("vdi", 0, b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    Magic("vdi", 0x40, b"\x7f\x10\xda\xbe", "vdi"),
    Magic("luks", 0, b"LUKS\xba\xbe", "LUKS-encrypted"),
    Magic("parallels", 0, b"WithoutFreeSpace", "parallels"),
    Magic("parallels", 0, b"WithouFreSpacExt", "parallels"),
    Magic("bochs", 0, b"Bochs Virtual HD Image", "bochs"),
    Magic("cloop", 0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
    Magic("gzip", 0, b"\x1f\x8b", "gzip-compressed"),
    Magic("xz", 0, b"\xfd7zXZ\x00", "xz-compressed"),
    Magic("zstd", 0, b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    Magic("bzip2", 0, b"BZh", "bzip2-compressed"),
    Magic("tar", 257, b"ustar", "tar"),
    Magic("zip", 0, b"PK\x03\x04", "zip"),
)
COMPRESSED = frozenset({"gzip", "xz", "zstd", "bzip2", "tar", "zip"})
# What the first sectors of a raw file may hold: a partition table, a filesystem, an ISO 9660 volume.
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

# qcow2 (docs/interop/qcow2.txt in qemu): incompatible feature bits qemu knows, and header extensions.
QCOW2_DIRTY, QCOW2_CORRUPT, QCOW2_DATA_FILE = 0x1, 0x2, 0x4
QCOW2_KNOWN_INCOMPATIBLE = 0x1F  # dirty, corrupt, external data file, compression type, extended L2
QCOW2_EXT_END, QCOW2_EXT_BACKING_FORMAT, QCOW2_EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
QCOW2_MAX_BACKING_NAME = 1023  # qemu refuses longer names
QCOW2_CRYPT = {0: None, 1: "aes", 2: "luks"}
_EXT_AREA_MAX = 2 << 20  # the extensions live in the first cluster, at most 2 MiB
_DESCRIPTOR_MAX = 64 << 10
_VMDK_EXTENT = re.compile(rb'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)")?', re.M)

_FLATTEN = "flatten a trusted copy first: qemu-img convert -O qcow2 IMAGE flat.qcow2"
_DECRYPT = "qemu-img convert --object secret,id=k,file=KEYFILE --image-opts ...,key-secret=k -O qcow2 disk.qcow2"
_DAMAGED = "give the complete image; 'qemu-img check' shows the damage"


@dataclass(frozen=True)
class ImageInfo:
    """What an image is, from its header (`inspect`) or from qemu-img (`qemu_img_info`)."""

    format: str  # "raw", "qcow2", or the name of a refused format ("vmdk", "luks", "gzip", ...)
    virtual_size: int = 0  # bytes the guest sees; 0 where the header does not say
    content: str | None = None  # raw only: what its first sectors hold ("gpt", "ext", "iso9660"), or None
    version: int | None = None
    backing: str | None = None  # the backing file name as the header spells it ("" if the name is empty)
    backing_format: str | None = None  # None: not named, so qemu would probe the backing file
    data_file: str | None = None  # an external data file ("" if flagged but not named)
    encrypted: bool = False
    corrupt: bool = False
    unknown_features: int = 0  # qcow2 incompatible feature bits qemu does not know
    extents: tuple[str, ...] = ()  # vmdk: the files its descriptor names
    damage: str | None = None  # why the header cannot be read as its format (truncated, out of range)


@dataclass(frozen=True)
class Policy:
    """What one caller accepts; everything else about an image is refused the same way everywhere."""

    # None: the image must stand alone. Otherwise a backing file is allowed when it is a plain path whose
    # real path lies under one of these roots, its format is named in the header (raw or qcow2), and it
    # is itself a standalone image of that format (checked here, header only).
    backing_roots: tuple[Path, ...] | None = None
    backing_name: re.Pattern[str] | None = None  # and its real file name must match this (a cache's bases)
    guess_raw: bool = True  # no format declared and nothing recognisable: a raw disk (False: refused)
    whole_sectors: bool = True  # a raw image must be a whole number of 512-byte sectors
    qemu: bool = True  # cross-check with qemu-img info (under limits): virtual size, format, references
    qemu_check: bool = False  # also run qemu-img check: a truncated qcow2 still reads, as zeros


# A backing file anywhere on the host, as long as it is a plain file path named with its format and
# itself stands alone: the overlays vmtool stages, whose bases are in a cache the caller does not know.
ANYWHERE = (Path("/"),)
MAX_CHAIN = 4  # images in a backing chain, the top one included (a loop ends here too)


# -- reading headers -----------------------------------------------------------------------------------

Reader = Callable[[int, int], bytes]  # (offset, length) -> the bytes there, short at the end of the file


def inspect(path: Path) -> ImageInfo:
    """The header facts of an image file, by plain reads (qemu never opens it). Raises OSError."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        return _inspect(lambda off, n: os.pread(fd, n, off), size)


def inspect_bytes(data: bytes) -> ImageInfo:
    """`inspect` of an image held in memory."""
    return _inspect(lambda off, n: data[off : off + n], len(data))


def _inspect(read_at: Reader, size: int) -> ImageInfo:
    head = read_at(0, 4096)

    def at(off: int, n: int) -> bytes:
        return head[off : off + n] if off + n <= len(head) else read_at(off, n)

    found = next((m for m in MAGICS if at(m.offset, len(m.magic)) == m.magic), None)
    if found is None:
        if _is_vmdk_descriptor(head):
            return _vmdk_descriptor(read_at(0, _DESCRIPTOR_MAX))
        sign = next((name for name, off, magic in RAW_SIGNS if at(off, len(magic)) == magic), None)
        return ImageInfo("raw", virtual_size=size, content=sign)
    parse = _PARSERS.get(found.format)
    return parse(read_at, size) if parse else ImageInfo(found.format)


def _truncated(fmt: str, got: int, need: int) -> str:
    return f"its {fmt} header is truncated ({got} of {need} bytes)"


def _qcow2(read_at: Reader, size: int) -> ImageInfo:
    hdr = read_at(0, 112)
    if len(hdr) < 72:
        return ImageInfo("qcow2", damage=_truncated("qcow2", len(hdr), 72))
    version, b_off, b_size, cluster_bits, vsize, crypt = struct.unpack_from(">IQIIQI", hdr, 4)
    info = ImageInfo(
        "qcow2",
        virtual_size=vsize,
        version=version,
        backing="" if b_off else None,
        encrypted=crypt != 0,
    )
    if version not in (2, 3):
        return replace(info, damage=f"qcow2 version {version} does not exist (qemu knows 2 and 3)")
    incompatible, header_len = 0, 72
    if version == 3:
        if len(hdr) < 104:
            return replace(info, damage=_truncated("qcow2", len(hdr), 104))
        incompatible = struct.unpack_from(">Q", hdr, 72)[0]
        header_len = struct.unpack_from(">I", hdr, 100)[0]
    info = replace(
        info,
        corrupt=bool(incompatible & QCOW2_CORRUPT),
        data_file="" if incompatible & QCOW2_DATA_FILE else None,
        unknown_features=incompatible & ~QCOW2_KNOWN_INCOMPATIBLE,
    )
    if version == 3 and header_len < 104:
        return replace(info, damage=f"its header length {header_len} is shorter than 104 bytes")
    if not 9 <= cluster_bits <= 21:
        return replace(info, damage=f"its cluster size 2^{cluster_bits} is out of range")
    if crypt not in QCOW2_CRYPT:
        return replace(info, damage=f"unknown encryption method {crypt}")
    cluster = 1 << cluster_bits
    if b_off:
        if b_size > QCOW2_MAX_BACKING_NAME or b_off + b_size > cluster:
            return replace(info, damage="its backing file name lies outside the first cluster")
        name = read_at(b_off, b_size)
        if len(name) < b_size:
            return replace(info, damage=_truncated("qcow2", size, b_off + b_size))
        info = replace(info, backing=os.fsdecode(name))
    # Header extensions: from the end of the header to the backing file name (or the first cluster's end).
    start, end = header_len, b_off or cluster
    if end < start:
        return replace(info, damage="its backing file name overlaps the header")
    area = read_at(start, min(end - start, _EXT_AREA_MAX))
    pos = 0
    while True:
        if pos + 8 > len(area):
            return replace(info, damage=_truncated("qcow2", size, start + pos + 8))
        kind, length = struct.unpack_from(">II", area, pos)
        pos += 8
        if kind == QCOW2_EXT_END:
            return info
        if length > len(area) - pos:
            return replace(info, damage="a header extension runs past the first cluster or the file")
        data = area[pos : pos + length]
        if kind == QCOW2_EXT_BACKING_FORMAT:
            info = replace(info, backing_format=data.decode(errors="replace"))
        elif kind == QCOW2_EXT_DATA_FILE:
            info = replace(info, data_file=os.fsdecode(data))
        pos += (length + 7) & ~7


def _qed(read_at: Reader, size: int) -> ImageInfo:
    hdr = read_at(0, 64)
    if len(hdr) < 64:
        return ImageInfo("qed", damage=_truncated("qed", len(hdr), 64))
    features, vsize, b_off, b_size = struct.unpack_from("<Q", hdr, 16) + struct.unpack_from("<QII", hdr, 48)
    backing = os.fsdecode(read_at(b_off, min(b_size, 4096))) if features & 1 else None
    return ImageInfo("qed", virtual_size=vsize, backing=backing)


def _vmdk(read_at: Reader, size: int) -> ImageInfo:
    hdr = read_at(0, 44)
    if hdr[:4] == b"COWD":
        return ImageInfo("vmdk")  # a VMware 3 image
    if hdr[:4] != b"KDMV":
        return _vmdk_descriptor(read_at(0, _DESCRIPTOR_MAX))
    if len(hdr) < 44:
        return ImageInfo("vmdk", damage=_truncated("vmdk", len(hdr), 44))
    capacity, _grain, d_off, d_size = struct.unpack_from("<QQQQ", hdr, 12)
    info = ImageInfo("vmdk", virtual_size=capacity * SECTOR)
    if d_off and d_size:
        embedded = _vmdk_descriptor(read_at(d_off * SECTOR, min(d_size * SECTOR, _DESCRIPTOR_MAX)))
        info = replace(info, extents=embedded.extents)
    return info


def _is_vmdk_descriptor(head: bytes) -> bool:
    """qemu's probe: comment and blank lines, then a version=1|2|3 line."""
    for line in head.split(b"\n"):
        if line.startswith(b"#") or not line.strip(b" \r"):
            continue
        return line.rstrip(b"\r") in (b"version=1", b"version=2", b"version=3")
    return False


def _vmdk_descriptor(text: bytes) -> ImageInfo:
    text = text.split(b"\0", 1)[0]
    extents = _VMDK_EXTENT.findall(text)
    return ImageInfo(
        "vmdk",
        virtual_size=sum(int(sectors) for _, sectors, _, _ in extents) * SECTOR,
        extents=tuple(os.fsdecode(name) for _, _, _, name in extents if name),
    )


def _vpc(read_at: Reader, size: int) -> ImageInfo:
    footer = read_at(0, 64)
    if len(footer) < 64:
        return ImageInfo("vpc", damage=_truncated("vhd", len(footer), 64))
    vsize, disk_type = struct.unpack_from(">Q", footer, 48)[0], struct.unpack_from(">I", footer, 60)[0]
    return ImageInfo("vpc", virtual_size=vsize, backing="" if disk_type == 4 else None)  # 4: differencing


def _luks(read_at: Reader, size: int) -> ImageInfo:
    hdr = read_at(0, 8)
    return ImageInfo("luks", version=int.from_bytes(hdr[6:8], "big") if len(hdr) == 8 else None, encrypted=True)


_PARSERS: dict[str, Callable[[Reader, int], ImageInfo]] = {
    "qcow2": _qcow2,
    "qed": _qed,
    "vmdk": _vmdk,
    "vpc": _vpc,
    "luks": _luks,
}


def protocol_of(name: str) -> str | None:
    """The protocol qemu reads in a filename ("json", "nbd", "file"...), or None for a plain path.

    As qemu's path_has_protocol: a colon before the first slash makes the name a pseudo-filename."""
    m = re.match(r"[^:/]*:", name)
    return m.group(0)[:-1] if m else None


def label(fmt: str) -> str:
    return next((m.label for m in MAGICS if m.format == fmt), fmt)


# -- the safety check ----------------------------------------------------------------------------------


def check(
    path: Path,
    fmt: str | None,
    policy: Policy,
    *,
    what: str | None = None,
    error: type[VmtoolError] = ImageError,
) -> ImageInfo:
    """Refuse anything `policy` does not accept about the image at `path`; its facts otherwise.

    `fmt` is the format the user declared (None: recognise it). The header is read and judged before
    qemu opens the file; the `error` raised carries a hint."""
    return _check(path, fmt, policy, what or str(path), error, 0)


def _check(
    path: Path, fmt: str | None, policy: Policy, what: str, error: type[VmtoolError], depth: int
) -> ImageInfo:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{what}: no such file", hint="give the path of a whole-disk image file") from None
    except OSError as e:
        raise error(f"{what}: cannot read: {e.strerror}", hint="check the file's permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: not a regular file", hint="give the path of a whole-disk image file")
    if st.st_size == 0:
        raise error(f"{what} is empty, not a disk image", hint="give a whole-disk image")
    if fmt is not None and fmt not in FORMATS:
        raise error(f"unsupported image format {fmt!r}", hint="use --format raw or --format qcow2")
    try:
        info = inspect(path)
    except OSError as e:
        raise error(f"{what}: cannot read: {e.strerror}", hint="check the file's permissions") from None
    _judge(path, info, fmt, policy, what, error, depth)
    if info.format == "raw" and fmt is None and info.content is None and not policy.guess_raw:
        raise error(
            f"{what} is not a disk image (no qcow2 header, partition table or filesystem found)",
            hint="if it really is a raw disk image, pass --format raw (a #format=raw fragment for the plugin)",
        )
    if info.format == "raw" and policy.whole_sectors and st.st_size % SECTOR:
        raise error(
            f"{what} is {st.st_size} bytes, not a whole number of 512-byte sectors: not a disk image",
            hint="check that the file is the disk image you meant",
        )
    if not policy.qemu:
        return info
    q = qemu_img_info(path, info.format, what=what, error=error)
    if q.format != info.format:
        raise error(f"{what}: qemu-img reads it as {q.format!r}, not {info.format}", hint=_DAMAGED)
    if q.backing != info.backing and (q.backing or info.backing):
        raise error(f"{what}: qemu-img sees a backing file its header does not name", hint=_FLATTEN)
    if q.data_file:
        raise error(f"{what} has an external data file, which vmtool never follows", hint=_FLATTEN)
    if q.encrypted or q.corrupt:
        raise error(f"{what} is {'encrypted' if q.encrypted else 'marked corrupt'}", hint=_DAMAGED)
    if q.virtual_size <= 0:
        raise error(f"{what}: qemu-img reports no virtual size", hint=_DAMAGED)
    if policy.qemu_check and info.format == "qcow2":
        qemu_img_check(path, info.format, what=what, error=error)
    return replace(info, virtual_size=q.virtual_size)


def _judge(
    path: Path, info: ImageInfo, fmt: str | None, policy: Policy, what: str, error: type[VmtoolError], depth: int
) -> None:
    """The header checks every caller shares; `policy` only decides about backing files."""
    if info.format not in FORMATS:
        detail = ""
        others = [e for e in info.extents if e != path.name]  # a sparse vmdk names itself
        if others:
            names = ", ".join(repr(e) for e in others[:3])
            detail = f" (its descriptor names the extent files {names}, which vmtool never opens)"
        if info.format in COMPRESSED:
            hint = "unpack it first; vmtool reads raw and qcow2 disk images"
        elif info.encrypted:
            hint = f"decrypt a trusted copy first: {_DECRYPT}"
        else:
            hint = f"convert a trusted copy first: qemu-img convert -f {info.format} -O qcow2 IMAGE disk.qcow2"
        raise error(f"{what}: {label(info.format)} images are not supported{detail}", hint=hint)
    if fmt == "qcow2" and info.format != "qcow2":
        raise error(f"{what} is not a qcow2 image (no qcow2 header), but qcow2 was declared",
                    hint="check --format; is it a raw image?")
    if fmt == "raw" and info.format == "qcow2":
        raise error(f"{what} is a qcow2 image but --format raw was given", hint="drop --format or pass --format qcow2")
    if info.format != "qcow2":
        return
    if info.backing is not None:
        _judge_backing(path, info, policy, what, error, depth)
    if info.data_file is not None:
        named = f" ({info.data_file!r})" if info.data_file else ""
        raise error(f"{what} has an external data file{named}, which vmtool never follows", hint=_FLATTEN)
    if info.encrypted:
        raise error(f"{what} is an encrypted qcow2 image, which vmtool cannot read",
                    hint=f"decrypt a trusted copy first: {_DECRYPT}")
    if info.unknown_features:
        raise error(
            f"{what} uses qcow2 incompatible features qemu does not know (bits {info.unknown_features:#x})",
            hint="convert a trusted copy with this host's qemu-img: qemu-img convert -O qcow2 IMAGE new.qcow2",
        )
    if info.damage:
        raise error(f"{what} is a damaged qcow2 image: {info.damage}", hint=_DAMAGED)
    if info.corrupt:
        raise error(f"{what} is a qcow2 image marked corrupt", hint="qemu-img check -r all a copy, or rebuild it")


def _judge_backing(
    path: Path, info: ImageInfo, policy: Policy, what: str, error: type[VmtoolError], depth: int
) -> None:
    name = info.backing or ""
    proto = protocol_of(name)
    if proto is not None:
        raise error(
            f"{what} names the backing file {name[:80]!r}, a {proto}: pseudo-filename qemu would read "
            "as a protocol or block-driver options",
            hint=_FLATTEN,
        )
    if policy.backing_roots is None:
        raise error(f"{what} has a backing file ({name!r}), which vmtool never follows; it must stand alone",
                    hint=_FLATTEN)
    if not name:
        raise error(f"{what} has a backing file with an empty name", hint=_FLATTEN)
    real = Path(os.path.realpath(path.parent / name))
    if not any(real == root or root in real.parents for root in (r.resolve() for r in policy.backing_roots)):
        roots = ", ".join(str(r) for r in policy.backing_roots)
        raise error(f"{what} is backed by {name!r}, outside {roots}", hint=_FLATTEN)
    if policy.backing_name is not None and not policy.backing_name.match(real.name):
        raise error(f"{what} is backed by {name!r}, which is not a base in a vmtool cache", hint=_FLATTEN)
    if info.backing_format not in FORMATS:
        why = "does not name its format" if info.backing_format is None else f"is {info.backing_format!r}"
        raise error(f"{what}: its backing file {name!r} {why} (qemu would probe it)",
                    hint="make overlays with an explicit backing format: qemu-img create -F raw|qcow2 ...")
    if depth + 1 >= MAX_CHAIN:
        raise error(f"{what}: its backing chain is deeper than {MAX_CHAIN} images", hint=_FLATTEN)
    # Every link of the chain is judged as the image itself was (a per-VM overlay on a staged overlay on
    # a cached base has three), by its header alone.
    link = replace(policy, guess_raw=True, whole_sectors=False, qemu=False, qemu_check=False)
    _check(real, info.backing_format, link, f"{what}: its backing file {name!r}", error, depth + 1)


# -- qemu-img ------------------------------------------------------------------------------------------


def qemu_img_info(
    path: Path, fmt: str, *, what: str | None = None, error: type[VmtoolError] = ImageError
) -> ImageInfo:
    """qemu-img info with the format forced (no probing), read-only, shared, under nova's limits.

    Call it after `check`'s header reads: qemu opens an external data file the header names."""
    what = what or str(path)
    try:
        proc = run(
            ["qemu-img", "info", "--output=json", "--force-share", "-f", fmt, os.fspath(path)],
            limits=QEMU_IMG_LIMITS,
            timeout=60,
        )
    except CommandError as e:
        raise error(f"{what}: qemu-img cannot read it as {fmt}: {e.message}", hint=_DAMAGED) from None
    try:
        raw: Any = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict):
        raise error(f"{what}: qemu-img info printed no JSON object", hint="check the qemu-utils package")
    data = (raw.get("format-specific") or {}).get("data") or {}
    vsize = raw.get("virtual-size")
    return ImageInfo(
        format=str(raw.get("format")),
        virtual_size=vsize if isinstance(vsize, int) else 0,
        backing=raw.get("backing-filename") or raw.get("full-backing-filename") or None,
        backing_format=raw.get("backing-filename-format"),
        data_file=data.get("data-file") or ("" if data.get("data-file-raw") else None),
        encrypted=bool(raw.get("encrypted")),
        corrupt=bool(data.get("corrupt")),
    )


def qemu_img_check(path: Path, fmt: str, *, what: str | None = None, error: type[VmtoolError] = ImageError) -> None:
    """Refuse an image whose metadata is damaged: a truncated qcow2 still converts, its lost clusters as zeros."""
    what = what or str(path)
    chk = run(
        ["qemu-img", "check", "-f", fmt, "--force-share", "--output=json", os.fspath(path)],
        limits=QEMU_IMG_LIMITS,
        timeout=120,
        check=False,
    )
    try:
        report = json.loads(chk.stdout or b"{}")
    except json.JSONDecodeError:
        report = {}
    if not isinstance(report, dict):
        report = {}
    bad = int(report.get("corruptions", 0) or 0) + int(report.get("check-errors", 0) or 0)
    # 0: clean, 3: only leaked clusters (harmless to a reader); 2: corruptions, 1 or other: not checked.
    if bad or chk.returncode not in (0, 3):
        why = f"{bad} errors in its metadata" if bad else f"qemu-img check exited with status {chk.returncode}"
        raise error(f"{what}: the {fmt} image is damaged or truncated ({why})", hint=_DAMAGED)
