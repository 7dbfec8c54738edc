"""MBR (with extended/logical partitions) and GPT partition tables, parsed from an untrusted image.

Every number read from the image is checked before use: CRCs of the GPT header and entry array,
partitions inside the disk and inside the table's usable area, no overlaps, bounded EBR chains.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from vmtool.errors import ImageError

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
MAX_GPT_ENTRIES = 1024
MAX_LOGICAL = 128

GPT_TYPE_NAMES = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "linux",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "lvm",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "swap",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "efi",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "xbootldr",
    "21686148-6449-6e6f-744e-656564454649": "bios-boot",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "linux-root-x86-64",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "linux-home",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "linux-raid",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "microsoft-basic-data",
}
MBR_TYPE_NAMES = {
    0x83: "linux",
    0x8E: "lvm",
    0x82: "swap",
    0xEF: "efi",
    0xEA: "xbootldr",
    0xFD: "linux-raid",
    0x05: "extended",
    0x0F: "extended",
    0x85: "extended",
    0x07: "ntfs",
    0x0B: "fat32",
    0x0C: "fat32",
    0x06: "fat16",
    0xEE: "gpt-protective",
}
EXTENDED_TYPES = (0x05, 0x0F, 0x85)


@dataclass
class Partition:
    number: int  # Linux numbering: GPT entry index + 1; MBR primaries 1-4, logicals from 5
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT type GUID (lower case) or MBR id as "0x83"
    kind: str  # linux, lvm, swap, efi, xbootldr, ... or "unknown"
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT unique partition GUID (PARTUUID)
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PartitionTable:
    kind: str  # gpt | mbr | none
    sector_size: int = SECTOR
    disk_id: str = ""
    partitions: list[Partition] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sector_size": self.sector_size,
            "disk_id": self.disk_id,
            "partitions": [p.to_dict() for p in self.partitions],
        }


def _read(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _guid(b: bytes) -> str:
    return str(uuid.UUID(bytes_le=b))


def _gpt_at(f: BinaryIO, disk_size: int, sector: int) -> PartitionTable | None:
    hdr = _read(f, sector, sector)
    if hdr[:8] != GPT_SIGNATURE:
        return None
    if len(hdr) < 92:
        raise ImageError("GPT header is truncated", hint="the image file is probably incomplete")
    (hsize,) = struct.unpack_from("<I", hdr, 12)
    if not 92 <= hsize <= sector:
        raise ImageError(f"GPT header size {hsize} is invalid", hint="the partition table is damaged")
    (crc,) = struct.unpack_from("<I", hdr, 16)
    check = bytearray(hdr[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(bytes(check)) != crc:
        raise ImageError(
            "GPT header checksum does not match (damaged partition table)",
            hint="repair it with 'sgdisk --verify' / gdisk, or give the original image",
        )
    my_lba, _alt, first_usable, last_usable = struct.unpack_from("<QQQQ", hdr, 24)
    disk_guid = _guid(hdr[56:72])
    entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", hdr, 72)
    if my_lba != 1:
        raise ImageError(
            f"GPT header claims to be at LBA {my_lba}, not 1", hint="the partition table is damaged"
        )
    if n_entries > MAX_GPT_ENTRIES or entry_size < 128 or entry_size > 4096 or entry_size % 8:
        raise ImageError(
            f"GPT entry array is implausible ({n_entries} entries of {entry_size} bytes)",
            hint="the partition table is damaged",
        )
    array_bytes = n_entries * entry_size
    if entries_lba * sector + array_bytes > disk_size:
        raise ImageError(
            "GPT partition entry array lies past the end of the disk",
            hint="the image file is truncated; give the complete image",
        )
    array = _read(f, entries_lba * sector, array_bytes)
    if len(array) != array_bytes or zlib.crc32(array) != entries_crc:
        raise ImageError(
            "GPT partition entry array checksum does not match",
            hint="the partition table is damaged; repair it with gdisk or give the original image",
        )
    if first_usable > last_usable:
        raise ImageError("GPT usable area is empty or inverted", hint="the partition table is damaged")
    table = PartitionTable("gpt", sector, disk_guid)
    for i in range(n_entries):
        e = array[i * entry_size : (i + 1) * entry_size]
        if e[:16] == b"\0" * 16:
            continue
        ptype = _guid(e[0:16])
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        num = i + 1
        if last < first:
            raise ImageError(f"partition {num} ends before it starts", hint="the partition table is damaged")
        if first < first_usable or last > last_usable:
            raise ImageError(
                f"partition {num} lies outside the GPT's usable area", hint="the partition table is damaged"
            )
        table.partitions.append(
            Partition(
                num,
                first * sector,
                (last - first + 1) * sector,
                ptype,
                GPT_TYPE_NAMES.get(ptype, "unknown"),
                name,
                _guid(e[16:32]),
            )
        )
    return table


def _mbr_entries(sec: bytes) -> list[tuple[int, int, int, int]]:
    out = []
    for i in range(4):
        status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sec, 446 + 16 * i)
        out.append((status, ptype, lba, count))
    return out


def _mbr(f: BinaryIO, disk_size: int, sec: bytes) -> PartitionTable:
    (sig,) = struct.unpack_from("<I", sec, 440)
    table = PartitionTable("mbr", SECTOR, f"{sig:08x}")
    ext: tuple[int, int] | None = None
    for i, (status, ptype, lba, count) in enumerate(_mbr_entries(sec)):
        if ptype == 0 or count == 0:
            continue
        if status not in (0, 0x80):
            raise ImageError(
                f"MBR entry {i + 1} has an invalid status byte 0x{status:02x}",
                hint="this is not a valid partition table",
            )
        if lba == 0:
            raise ImageError(
                f"MBR partition {i + 1} starts at sector 0", hint="the partition table is damaged"
            )
        if ptype in EXTENDED_TYPES:
            if ext is not None:
                raise ImageError(
                    "MBR has more than one extended partition", hint="the partition table is damaged"
                )
            ext = (lba, count)
            _check_inside(i + 1, lba * SECTOR, count * SECTOR, disk_size)
            continue
        table.partitions.append(
            Partition(
                i + 1,
                lba * SECTOR,
                count * SECTOR,
                f"0x{ptype:02x}",
                MBR_TYPE_NAMES.get(ptype, "unknown"),
                bootable=status == 0x80,
            )
        )
    if ext is not None:
        table.partitions.extend(_logicals(f, disk_size, ext))
    return table


def _logicals(f: BinaryIO, disk_size: int, ext: tuple[int, int]) -> list[Partition]:
    ext_lba, ext_count = ext
    out: list[Partition] = []
    ebr_lba = ext_lba
    seen: set[int] = set()
    num = 5
    while True:
        if ebr_lba in seen:
            raise ImageError("MBR extended partition chain loops", hint="the partition table is damaged")
        if len(seen) >= MAX_LOGICAL:
            raise ImageError(
                f"more than {MAX_LOGICAL} logical partitions", hint="the partition table is damaged"
            )
        seen.add(ebr_lba)
        if not ext_lba <= ebr_lba < ext_lba + ext_count:
            raise ImageError(
                "an extended boot record lies outside the extended partition",
                hint="the partition table is damaged",
            )
        ebr = _read(f, ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            raise ImageError(
                f"extended boot record at sector {ebr_lba} is missing or truncated",
                hint="the image file is truncated or the partition table is damaged",
            )
        entries = _mbr_entries(ebr)
        status, ptype, lba, count = entries[0]
        if ptype and count:
            start = ebr_lba + lba
            if start + count > ext_lba + ext_count or lba == 0:
                raise ImageError(
                    f"logical partition {num} lies outside its extended partition",
                    hint="the partition table is damaged",
                )
            out.append(
                Partition(
                    num,
                    start * SECTOR,
                    count * SECTOR,
                    f"0x{ptype:02x}",
                    MBR_TYPE_NAMES.get(ptype, "unknown"),
                    bootable=status == 0x80,
                )
            )
            num += 1
        _s2, ptype2, lba2, count2 = entries[1]
        if ptype2 == 0 or count2 == 0:
            break
        ebr_lba = ext_lba + lba2
    return out


def _check_inside(num: int, start: int, size: int, disk_size: int) -> None:
    if start + size > disk_size:
        raise ImageError(
            f"partition {num} (bytes {start}-{start + size}) runs past the end of the disk ({disk_size} bytes)",
            hint="the image file is truncated or the partition table is wrong; give the complete image",
        )


def validate(table: PartitionTable, disk_size: int) -> None:
    for p in table.partitions:
        _check_inside(p.number, p.start, p.size, disk_size)
    parts = sorted(table.partitions, key=lambda p: p.start)
    for a, b in zip(parts, parts[1:], strict=False):
        if b.start < a.end:
            raise ImageError(
                f"partitions {a.number} and {b.number} overlap",
                hint="the partition table is damaged; fix it with fdisk/gdisk or give the original",
            )


def read_table(f: BinaryIO, disk_size: int) -> PartitionTable | None:
    """The partition table of the disk, or None when sector 0 holds no MBR/GPT (e.g. a bare filesystem)."""
    if disk_size < SECTOR * 2:
        return None
    for sector in (SECTOR, 4096):
        t = _gpt_at(f, disk_size, sector)
        if t is not None:
            validate(t, disk_size)
            return t
    sec = _read(f, 0, SECTOR)
    if sec[510:512] != b"\x55\xaa":
        return None
    entries = _mbr_entries(sec)
    if any(ptype == 0xEE for _, ptype, _, _ in entries):
        raise ImageError(
            "protective MBR found but no valid GPT header",
            hint="the GPT is damaged or uses an unsupported sector size",
        )
    # A FAT boot sector also ends in 55 aa: only trust entries that look like a partition table.
    if any(status not in (0, 0x80) for status, ptype, _, _ in entries if ptype):
        return None
    if not any(ptype and count for _, ptype, _, count in entries):
        return PartitionTable("mbr", SECTOR, "", [])
    t = _mbr(f, disk_size, sec)
    validate(t, disk_size)
    return t
