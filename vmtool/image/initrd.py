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
import contextlib
import fcntl
import lzma
import os
import re
import threading
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool.errors import ImageError
from vmtool.run import PIPE, Limits, spawn

MAX_UNPACKED = 4 << 30  # a decompression bomb is refused beyond this
CHECK_VERSION = 1  # part of a remembered report's key: change it when what check() reports changes
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

    @classmethod
    def from_dict(cls, d: Any) -> InitrdReport:
        """The report to_dict() wrote; ValueError if it is not one (a damaged or foreign cache entry)."""
        if not isinstance(d, dict):
            raise ValueError("not an object")
        archives, drivers, buses, warnings = (
            d.get("archives"),
            d.get("drivers"),
            d.get("buses"),
            d.get("warnings"),
        )
        if not (
            isinstance(archives, list)
            and all(isinstance(a, str) for a in archives)
            and d.get("generator") in ("dracut", "initramfs-tools", "unknown")
            and isinstance(drivers, dict)
            and all(isinstance(k, str) and v in ("builtin", "initrd", "missing") for k, v in drivers.items())
            and isinstance(buses, list)
            and all(b in BUSES for b in buses)
            and isinstance(warnings, list)
            and all(isinstance(w, str) for w in warnings)
        ):
            raise ValueError("not an initrd report")
        return cls(tuple(archives), d["generator"], dict(drivers), tuple(buses), tuple(warnings))


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> y|m from a kernel .config; unset options are absent."""
    out = {}
    for m in re.finditer(r"^(CONFIG_[A-Za-z0-9_]+)=(\S+)$", text, re.M):
        out[m.group(1)] = m.group(2).strip('"')
    return out


READ = 1 << 20  # bytes per read, from the file and from a decompressor
_NONZERO = re.compile(rb"[^\0]")
TOOLS = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}
# A hostile initrd gets this much CPU time in the zstd/lz4 tool (a real one needs well under a second).
TOOL_LIMITS = Limits(cpu_seconds=120)


class _Stream:
    """Sequential reads over byte chunks, never holding more than a chunk or two: an initramfs is read
    once, header by header, and the file data between headers is skipped, not kept."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()
        self._at = 0
        self.pos = 0  # offset of the next byte, for messages

    def _fill(self, n: int) -> bool:
        while len(self._buf) - self._at < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            del self._buf[: self._at]
            self._at = 0
            self._buf += chunk
        return True

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return bytes(self._buf[self._at : self._at + n])

    def read(self, n: int) -> bytes:
        out = self.peek(n)
        self._at += len(out)
        self.pos += len(out)
        return out

    def skip(self, n: int) -> int:
        """Skip n bytes (fewer at the end); returns how many were skipped."""
        done = min(n, len(self._buf) - self._at)
        self._at += done
        while done < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            del self._buf[:]
            self._at = 0
            take = min(len(chunk), n - done)
            if take < len(chunk):
                self._buf += chunk[take:]
            done += take
        self.pos += done
        return done

    def skip_zeros(self) -> None:
        while self._fill(1):
            m = _NONZERO.search(self._buf, self._at)
            end = m.start() if m else len(self._buf)
            self.pos += end - self._at
            self._at = end
            if m:
                return

    def rest(self) -> Iterator[bytes]:
        """The unread bytes as chunks (for a decompressor); give back what it leaves with unread()."""
        if self._at < len(self._buf):
            chunk = bytes(self._buf[self._at :])
            del self._buf[:]
            self._at = 0
            self.pos += len(chunk)
            yield chunk
        for chunk in self._chunks:
            self.pos += len(chunk)
            yield chunk

    def unread(self, data: bytes) -> None:
        if data:
            self._buf[self._at : self._at] = data
            self.pos -= len(data)


def _chunks_of(initrd: bytes | Path) -> Iterator[bytes]:
    if isinstance(initrd, Path):
        with open(initrd, "rb", buffering=0) as f:
            while chunk := f.read(READ):
                yield chunk
    else:
        view = memoryview(initrd)
        for i in range(0, len(view), READ):
            yield bytes(view[i : i + READ])


def _unpacked(kind: str, src: _Stream, what: str) -> Generator[bytes, None, None]:
    """The decompressed bytes of the stream at `src`'s position, in chunks; `src` is left just after it
    (for zstd and lz4 at its end: the tools read concatenated frames to the end, as the kernel does)."""
    if kind in TOOLS:
        yield from _unpacked_by_tool(kind, src, what)
        return
    d: Any
    if kind == "gzip":
        d = zlib.decompressobj(wbits=31)
    elif kind in ("xz", "lzma"):
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
    else:
        d = bz2.BZ2Decompressor()
    total = 0
    try:
        for chunk in src.rest():
            data = chunk
            while True:
                # max_length bounds what one call may produce: a small chunk of a bomb stays small.
                out = d.decompress(data, READ)
                total += len(out)
                if total > MAX_UNPACKED:
                    raise InitrdError(
                        f"{what}: its {kind} stream unpacks to more than {MAX_UNPACKED >> 30} GiB",
                        hint=GENERIC_FIX,
                    )
                if out:
                    yield out
                if d.eof:
                    src.unread(d.unused_data)
                    return
                if kind == "gzip":
                    data = d.unconsumed_tail
                    if not data:
                        break
                else:
                    if d.needs_input:
                        break
                    data = b""
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise InitrdError(f"{what}: the {kind} stream is damaged ({e})", hint=GENERIC_FIX) from None
    if kind != "lzma":  # a .lzma ("alone") stream may end without an end marker
        raise InitrdError(f"{what}: the {kind} stream is truncated", hint=GENERIC_FIX)


def _unpacked_by_tool(kind: str, src: _Stream, what: str) -> Generator[bytes, None, None]:
    """zstd and lz4 through their command-line tools, fed on a thread and read as they go."""
    p = spawn(TOOLS[kind], stdin=PIPE, stdout=PIPE, stderr=PIPE, limits=TOOL_LIMITS)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    stdin = p.stdin

    def feed() -> None:
        try:
            for chunk in src.rest():
                stdin.write(chunk)
        except (BrokenPipeError, OSError):
            pass  # the tool stopped early: its exit status says why
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    feeder = threading.Thread(target=feed, name=f"vmtool-{kind}-feed", daemon=True)
    feeder.start()
    total = 0
    out_fd = p.stdout.fileno()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(out_fd, fcntl.F_SETPIPE_SZ, READ)  # fewer, larger reads
        while chunk := os.read(out_fd, READ):
            total += len(chunk)
            if total > MAX_UNPACKED:
                raise InitrdError(
                    f"{what}: its {kind} stream unpacks to more than {MAX_UNPACKED >> 30} GiB",
                    hint=GENERIC_FIX,
                )
            yield chunk
        err = p.stderr.read()
        rc = p.wait()
    finally:
        if p.poll() is None:  # stopped early (an error in what it produced): no need for the rest
            p.kill()
            p.wait()
        feeder.join()
        for f in (p.stdout, p.stderr):
            f.close()
    if rc != 0 or total == 0:
        raise InitrdError(
            f"{what}: cannot decompress its {kind} stream ({err.decode(errors='replace').strip()[:200]})",
            hint=f"install the {TOOLS[kind][0]} tool, or check the initrd is complete",
        )


def _cpio_names(s: _Stream, what: str, names: list[str]) -> None:
    """Member names of the newc archive at `s`'s position, which is left after its trailer."""
    while True:
        at = s.pos
        hdr = s.read(110)
        if len(hdr) < 110:
            raise InitrdError(f"{what}: the cpio archive is truncated (no trailer)", hint=GENERIC_FIX)
        if hdr[:6] not in CPIO_MAGICS:
            raise InitrdError(f"{what}: damaged cpio header at offset {at}", hint=GENERIC_FIX)
        try:
            filesize = int(hdr[54:62], 16)
            namesize = int(hdr[94:102], 16)
        except ValueError:
            raise InitrdError(f"{what}: damaged cpio header at offset {at}", hint=GENERIC_FIX) from None
        raw = s.read(namesize)
        if len(raw) < namesize:
            raise InitrdError(f"{what}: the cpio archive is truncated", hint=GENERIC_FIX)
        name = raw[:-1].decode(errors="replace")
        s.skip(-s.pos % 4)
        if name == "TRAILER!!!":
            s.skip(filesize + (-(s.pos + filesize) % 4))
            return
        if s.skip(filesize) < filesize:
            raise InitrdError(f"{what}: the cpio archive is truncated (in {name})", hint=GENERIC_FIX)
        s.skip(-s.pos % 4)
        names.append(name)


def _archives(s: _Stream, what: str, names: list[str], kinds: list[str], packed: str | None = None) -> None:
    """Every archive from `s`'s position to its end: cpio archives with zero padding between them and,
    at the top level only, compressed streams of them (the kernel reads nothing else inside one)."""
    while True:
        s.skip_zeros()
        head = s.peek(6)
        if not head:
            return
        if head in CPIO_MAGICS:
            _cpio_names(s, what, names)
            kinds.append(f"{packed}+cpio" if packed else "cpio")
            continue
        kind = next((k for magic, k in COMPRESSORS.items() if head.startswith(magic)), None)
        if kind is None or packed:
            where = f"inside its {packed} stream at offset {s.pos}" if packed else f"at offset {s.pos}"
            raise InitrdError(
                f"{what}: unknown data {where} (magic {head.hex()}): not a cpio archive nor a known compression",
                hint="vmtool reads cpio archives compressed with gzip, xz, lzma, bzip2, zstd or lz4",
            )
        unpacked = _unpacked(kind, s, what)
        try:
            # Read to its end (the decompressor's own checks run there), then on after it.
            _archives(_Stream(unpacked), what, names, kinds, kind)
        finally:
            unpacked.close()  # on an error inside: stops a decompressing tool at once


def read_members(initrd: bytes | Path, what: str = "initrd") -> tuple[list[str], list[str]]:
    """(member names, archive kinds) of every archive in an initramfs image (its bytes or its file)."""
    names: list[str] = []
    kinds: list[str] = []
    _archives(_Stream(_chunks_of(initrd)), what, names, kinds)
    if not kinds:
        raise InitrdError(f"{what}: empty", hint=GENERIC_FIX)
    return names, kinds


def _module_name(path: str) -> str | None:
    m = re.search(r"(?:^|/)lib/modules/[^/]+/.*/([^/]+)\.ko(?:\.(?:xz|gz|zst))?$", path)
    return m.group(1).replace("-", "_") if m else None


def check(
    initrd: bytes | Path, config_text: str | None, fstype: str, *, what: str = "initrd"
) -> InitrdReport:
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
