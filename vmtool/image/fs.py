"""Filesystem signatures, labels and UUIDs read from superblocks (what blkid reports), in Python."""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import BinaryIO

EXT_MAGIC = 0xEF53
EXT_COMPAT_JOURNAL = 0x4
EXT4_INCOMPAT = 0x40 | 0x80 | 0x200 | 0x400 | 0x10000  # extents, 64bit, flex_bg, mmp, inline_data...
EXT4_RO_COMPAT = 0x8 | 0x20 | 0x40 | 0x400  # huge_file, dir_nlink, extra_isize, metadata_csum
EXT4_INCOMPAT_64BIT = 0x80

# Maximum label lengths in bytes (DIB block_device/level2/mkfs.py; e2label; xfs_admin).
LABEL_MAX = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12, "btrfs": 255, "swap": 16, "vfat": 11}


@dataclass
class FsInfo:
    type: str  # ext2 ext3 ext4 xfs btrfs swap vfat LVM2_member crypto_LUKS
    label: str = ""
    uuid: str = ""
    size: int = 0  # filesystem size in bytes, when the superblock says


def _read(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _label(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def probe(f: BinaryIO, offset: int, length: int) -> FsInfo | None:
    """What lives at `offset` (a partition or an LV's first extent), or None when nothing is recognised."""
    if length < 4096:
        return None
    head = _read(f, offset, 8192)
    if len(head) < 4096:
        return None
    if head[:6] == b"LUKS\xba\xbe":
        return FsInfo("crypto_LUKS", uuid=_label(head[168:208]))
    for s in range(4):
        if head[s * 512 : s * 512 + 8] == b"LABELONE" and head[s * 512 + 24 : s * 512 + 32] == b"LVM2 001":
            return FsInfo("LVM2_member")
    sb = head[1024:2048]
    if len(sb) == 1024 and struct.unpack_from("<H", sb, 56)[0] == EXT_MAGIC:
        compat, incompat, ro = struct.unpack_from("<III", sb, 92)
        (blocks_lo,) = struct.unpack_from("<I", sb, 4)
        (log_bs,) = struct.unpack_from("<I", sb, 24)
        blocks = blocks_lo
        if incompat & EXT4_INCOMPAT_64BIT:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        if incompat & EXT4_INCOMPAT or ro & EXT4_RO_COMPAT:
            t = "ext4"
        elif compat & EXT_COMPAT_JOURNAL:
            t = "ext3"
        else:
            t = "ext2"
        bs = 1024 << min(log_bs, 6)
        return FsInfo(t, _label(sb[120:136]), str(uuidlib.UUID(bytes=sb[104:120])), blocks * bs)
    if head[:4] == b"XFSB":
        (bs,) = struct.unpack_from(">I", head, 4)
        (dblocks,) = struct.unpack_from(">Q", head, 8)
        return FsInfo("xfs", _label(head[108:120]), str(uuidlib.UUID(bytes=head[32:48])), bs * dblocks)
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return FsInfo(
            "swap", _label(head[1024 + 28 : 1024 + 44]), str(uuidlib.UUID(bytes=head[1024 + 12 : 1024 + 28]))
        )
    if length > 0x10000 + 4096:
        bt = _read(f, offset + 0x10000, 4096)
        if bt[0x40:0x48] == b"_BHRfS_M":
            (total,) = struct.unpack_from("<Q", bt, 0x70)
            return FsInfo(
                "btrfs", _label(bt[0x12B : 0x12B + 256]), str(uuidlib.UUID(bytes=bt[0x20:0x30])), total
            )
    if head[510:512] == b"\x55\xaa" and (head[0x36:0x39] == b"FAT" or head[0x52:0x57] == b"FAT32"):
        fat32 = head[0x52:0x57] == b"FAT32"
        vid = head[0x43:0x47] if fat32 else head[0x27:0x2B]
        lab = head[0x47:0x52] if fat32 else head[0x2B:0x36]
        v = struct.unpack("<I", vid)[0]
        label = _label(lab)
        return FsInfo("vfat", "" if label == "NO NAME" else label, f"{v >> 16:04X}-{v & 0xFFFF:04X}")
    return None
