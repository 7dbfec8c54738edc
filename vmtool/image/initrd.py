"""What an initramfs can boot from: its cpio archives read natively, with the kernel's config.

An initramfs is one or more concatenated cpio "newc" archives, each possibly compressed; distributions
put an uncompressed early-microcode archive first. gzip, xz/lzma and bzip2 are read with the standard
library; zstd and lz4 through their command-line tools (vmtool.run). With /boot/config-<version> this
tells whether the disk drivers (virtio_blk + virtio_pci, ahci, ata_piix) and the root filesystem's
driver are built into the kernel or present in the initrd, and so which disk buses the guest can boot
from: launch then picks virtio, else SATA (AHCI), else IDE.
"""

from __future__ import annotations

import bz2
import lzma
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from vmtool.errors import ImageError
from vmtool.run import run

MAX_UNPACKED = 4 << 30  # a decompression bomb is refused beyond this
CPIO_MAGICS = (b"070701", b"070702")
COMPRESSORS = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x02\x21\x4c\x18": "lz4",  # lz4 legacy frame, as the kernel reads it
    b"\x04\x22\x4d\x18": "lz4",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
}
# Kernel config symbol and module name of each driver the boot depends on.
DRIVERS = {
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "ahci": "CONFIG_SATA_AHCI",
    "ata_piix": "CONFIG_ATA_PIIX",
    "sd_mod": "CONFIG_BLK_DEV_SD",
    "libata": "CONFIG_ATA",
}
FS_DRIVERS = {
    "ext2": ("ext4", "CONFIG_EXT4_FS"),  # ext4 serves ext2/3 on distribution kernels
    "ext3": ("ext4", "CONFIG_EXT4_FS"),
    "ext4": ("ext4", "CONFIG_EXT4_FS"),
    "xfs": ("xfs", "CONFIG_XFS_FS"),
    "btrfs": ("btrfs", "CONFIG_BTRFS_FS"),
}
BUSES = {  # bus -> drivers it needs, in the order launch prefers them
    "virtio": ("virtio_pci", "virtio_blk"),
    "sata": ("libata", "ahci", "sd_mod"),
    "ide": ("libata", "ata_piix", "sd_mod"),
}
FIX = {
    "dracut": "rebuild the initrd inside the guest with all drivers: dracut --no-hostonly --force",
    "initramfs-tools": "set MODULES=most in /etc/initramfs-tools/initramfs.conf and run update-initramfs -u",
}
GENERIC_FIX = (
    "rebuild the guest's initrd with the virtio drivers (dracut --no-hostonly, or update-initramfs -u "
    "with MODULES=most)"
)


class InitrdError(ImageError):
    pass


@dataclass(frozen=True)
class InitrdReport:
    archives: tuple[str, ...]  # e.g. ("cpio", "zstd+cpio"): what the initramfs is made of
    generator: str  # dracut | initramfs-tools | unknown
    drivers: dict[str, str]  # module -> builtin | initrd | missing
    buses: tuple[str, ...]  # the disk buses it can boot from, best first
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "archives": list(self.archives),
            "generator": self.generator,
            "drivers": dict(self.drivers),
            "buses": list(self.buses),
            "warnings": list(self.warnings),
        }


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> y|m from a kernel .config; unset options are absent."""
    out = {}
    for m in re.finditer(r"^(CONFIG_[A-Za-z0-9_]+)=(\S+)$", text, re.M):
        out[m.group(1)] = m.group(2).strip('"')
    return out


def _decompress(kind: str, data: bytes, what: str) -> tuple[bytes, bytes]:
    """(decompressed, what follows the compressed stream) of the stream at the start of `data`."""
    try:
        if kind == "gzip":
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(data, MAX_UNPACKED)
            if not d.eof:
                raise InitrdError(f"{what}: the gzip stream is truncated", hint=GENERIC_FIX)
            return out, d.unused_data
        if kind in ("xz", "lzma"):
            ld = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
            out = ld.decompress(data, MAX_UNPACKED)
            if not ld.eof and kind == "xz":
                raise InitrdError(f"{what}: the xz stream is truncated", hint=GENERIC_FIX)
            return out, ld.unused_data
        if kind == "bzip2":
            bd = bz2.BZ2Decompressor()
            out = bd.decompress(data, MAX_UNPACKED)
            return out, bd.unused_data
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise InitrdError(f"{what}: the {kind} stream is damaged ({e})", hint=GENERIC_FIX) from None
    # zstd and lz4: the tools read concatenated frames to the end; the kernel does the same.
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}[kind]
    p = run(tool, input=data, check=False, timeout=600)
    if p.returncode != 0 or not p.stdout:
        raise InitrdError(
            f"{what}: cannot decompress its {kind} stream ({p.stderr.decode(errors='replace').strip()[:200]})",
            hint=f"install the {tool[0]} tool, or check the initrd is complete",
        )
    return p.stdout, b""


def _cpio_names(data: bytes, pos: int, what: str) -> tuple[list[str], int]:
    """Member names of the newc archive at `pos`, and the offset after its trailer."""
    names: list[str] = []
    while True:
        if len(data) < pos + 110:
            raise InitrdError(f"{what}: the cpio archive is truncated (no trailer)", hint=GENERIC_FIX)
        hdr = data[pos : pos + 110]
        if hdr[:6] not in CPIO_MAGICS:
            raise InitrdError(f"{what}: damaged cpio header at offset {pos}", hint=GENERIC_FIX)
        try:
            filesize = int(hdr[54:62], 16)
            namesize = int(hdr[94:102], 16)
        except ValueError:
            raise InitrdError(f"{what}: damaged cpio header at offset {pos}", hint=GENERIC_FIX) from None
        name_end = pos + 110 + namesize
        if name_end > len(data):
            raise InitrdError(f"{what}: the cpio archive is truncated", hint=GENERIC_FIX)
        name = data[pos + 110 : name_end - 1].decode(errors="replace")
        data_start = (name_end + 3) & ~3
        pos = (data_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return names, pos
        if pos > len(data):
            raise InitrdError(f"{what}: the cpio archive is truncated (in {name})", hint=GENERIC_FIX)
        names.append(name)


def read_members(data: bytes, what: str = "initrd") -> tuple[list[str], list[str]]:
    """(member names, archive kinds) of every archive in an initramfs image."""
    names: list[str] = []
    kinds: list[str] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding between archives
            nxt = len(data) - len(data[pos:].lstrip(b"\0"))
            pos = nxt
            continue
        head = data[pos : pos + 6]
        if head in CPIO_MAGICS:
            got, pos = _cpio_names(data, pos, what)
            names += got
            kinds.append("cpio")
            continue
        kind = next((k for magic, k in COMPRESSORS.items() if data.startswith(magic, pos)), None)
        if kind is None:
            raise InitrdError(
                f"{what}: unknown data at offset {pos} (magic {data[pos:pos + 6].hex()}): "
                "not a cpio archive nor a known compression",
                hint="vmtool reads cpio archives compressed with gzip, xz, lzma, bzip2, zstd or lz4",
            )
        unpacked, rest = _decompress(kind, data[pos:], what)
        inner, inner_kinds = read_members(unpacked, what)
        names += inner
        kinds += [f"{kind}+{k}" for k in inner_kinds]
        pos = len(data) - len(rest)
    if not kinds:
        raise InitrdError(f"{what}: empty", hint=GENERIC_FIX)
    return names, kinds


def _module_name(path: str) -> str | None:
    m = re.search(r"(?:^|/)lib/modules/[^/]+/.*/([^/]+)\.ko(?:\.(?:xz|gz|zst))?$", path)
    return m.group(1).replace("-", "_") if m else None


def check(initrd: bytes, config_text: str | None, fstype: str, *, what: str = "initrd") -> InitrdReport:
    """Which drivers the boot needs are built in, in the initrd or missing; which buses can boot."""
    if config_text is None:
        raise InitrdError(
            f"{what}: the kernel's config (/boot/config-<version>) is missing, so vmtool cannot tell "
            "which drivers are built in",
            hint="install the kernel package's config file into /boot (it ships with the kernel), "
            "or give --kernel-version for a kernel that has one",
        )
    config = parse_config(config_text)
    names, kinds = read_members(initrd, what)
    modules = {m for m in (_module_name(n) for n in names) if m}
    generator = "unknown"
    joined = "\n".join(names)
    if "usr/lib/dracut" in joined or "/dracut-" in joined:
        generator = "dracut"
    if "scripts/init-top" in joined or "conf/initramfs.conf" in joined:
        generator = "initramfs-tools"
    drivers: dict[str, str] = {}
    wanted = dict(DRIVERS)
    fs_mod, fs_sym = FS_DRIVERS.get(fstype, (fstype, f"CONFIG_{fstype.upper()}_FS"))
    wanted[fs_mod] = fs_sym
    for mod, sym in wanted.items():
        if config.get(sym) == "y":
            drivers[mod] = "builtin"
        elif mod in modules:
            drivers[mod] = "initrd"
        else:
            drivers[mod] = "missing"
    fs_ok = drivers[fs_mod] != "missing"
    buses = tuple(b for b, need in BUSES.items() if fs_ok and all(drivers[d] != "missing" for d in need))
    warnings = []
    if not fs_ok:
        warnings.append(f"the initrd has no driver for the {fstype} root filesystem")
    elif "virtio" not in buses:
        warnings.append(
            "the initrd cannot use virtio disks (" + ", ".join(d for d in BUSES["virtio"] if drivers[d] == "missing")
            + " missing)" + (f": the guest boots from {buses[0].upper()} instead, which is slower" if buses else "")
        )
    return InitrdReport(tuple(kinds), generator, drivers, buses, tuple(warnings))


def fix_hint(generator: str) -> str:
    return FIX.get(generator, GENERIC_FIX)
