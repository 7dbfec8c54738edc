"""A bootable UEFI whole-disk image from a build: GPT, an EFI system partition, the root filesystem.

Made without root privileges or mounts, from Debian's packages only:
- the boot loader is a unified kernel image (UKI): systemd-boot-efi's `linuxx64.efi.stub` with the
  kernel, initrd and command line added as PE sections by `objcopy`, installed as the removable-media
  path `\\EFI\\BOOT\\BOOTX64.EFI`, so firmware boots it with no NVRAM entry and no boot loader config;
- the ESP is a FAT32 image made with `mkfs.vfat -C` and filled with `mcopy -s -m -i`, then copied into
  the disk at its offset;
- the partition table is written by `sfdisk` on the image file; the root filesystem is copied at its
  offset (holes stay holes), or placed by `qemu-img convert -n` when the build's rootfs is qcow2.

Partition and disk GUIDs derive from the inputs and the FAT volume id and all timestamps are fixed, so the same
build assembles to the same bytes (and `vmtool publish` finds it again by checksum).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmtool.errors import ImageError, VmtoolError
from vmtool.fsutil import os_error, sha256_file
from vmtool.image import formats
from vmtool.log import step
from vmtool.manifest import DiskInfo, Manifest
from vmtool.run import run

STUB_DIRS = (Path("/usr/lib/systemd/boot/efi"), Path("/usr/lib/systemd/efi"))
STUB_NAME = "linuxx64.efi.stub"

SECTOR = 512
MIB = 1 << 20
ALIGN_SECTORS = MIB // SECTOR
# GPT partition type GUIDs: EFI system partition, and Linux root (x86-64) from the Discoverable
# Partitions Specification, so systemd-gpt-auto-generator and friends recognise the root.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
# 2000-01-01T00:00:00Z: a fixed time for FAT entries, so the image is reproducible.
FIXED_MTIME = 946684800
ROOTFS_POLICY = formats.Policy()  # the rootfs stands alone; raw or qcow2 as its manifest says
COPY_CHUNK = 4 * MIB


@dataclass(frozen=True)
class PartitionPlan:
    """Sector numbers of the two partitions and the disk's total size."""

    esp_start: int
    esp_sectors: int
    root_start: int
    root_sectors: int
    total_sectors: int

    @property
    def size(self) -> int:
        return self.total_sectors * SECTOR


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_layout(esp_bytes: int, root_bytes: int) -> PartitionPlan:
    """1 MiB-aligned partitions, with room for the backup GPT (33 sectors) at the end."""
    esp_start = ALIGN_SECTORS
    esp_sectors = _align_up(esp_bytes, MIB) // SECTOR
    root_start = _align_up(esp_start + esp_sectors, ALIGN_SECTORS)
    root_sectors = _align_up(root_bytes, MIB) // SECTOR
    total = root_start + root_sectors + ALIGN_SECTORS
    return PartitionPlan(esp_start, esp_sectors, root_start, root_sectors, total)


def esp_size_for(payload_bytes: int) -> int:
    """ESP size in bytes for a boot payload: room for FAT overhead and a kernel update, at least 64 MiB."""
    return max(64 * MIB, _align_up(payload_bytes + payload_bytes // 4 + 8 * MIB, MIB))


def find_stub() -> Path:
    for d in STUB_DIRS:
        p = d / STUB_NAME
        if p.is_file():
            return p
    raise VmtoolError(
        f"the UEFI stub {STUB_NAME} was not found in {', '.join(map(str, STUB_DIRS))}",
        hint="install the Debian package systemd-boot-efi (make deps)",
    )


def _stub_layout(stub: Path) -> tuple[int, int]:
    """(end of the stub's last section as an RVA, section alignment), from objdump."""
    headers = run(["objdump", "-h", os.fspath(stub)]).stdout.decode()
    end = 0
    for line in headers.splitlines():
        # "  0 .text  0000bff0  0000000000004000  0000000000004000  00000400  2**4"
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            end = max(end, int(f[3], 16) + int(f[2], 16))
    priv = run(["objdump", "-p", os.fspath(stub)]).stdout.decode()
    m = re.search(r"^SectionAlignment\s+([0-9a-fA-F]+)", priv, re.M)
    if not end or not m:
        raise VmtoolError(f"cannot read the section table of {stub}", hint="reinstall systemd-boot-efi")
    return end, int(m.group(1), 16)


def make_uki(stub: Path, kernel: Path, initrd: Path, cmdline: str, out: Path, workdir: Path) -> None:
    """Unified kernel image: the stub plus .osrel, .cmdline, .initrd and .linux sections.

    systemd 252's stub finds its payload by section name; the added sections must sit after the
    stub's own (else they overlap them and the image is corrupt), each aligned, and .linux last,
    since the kernel may use memory past its section while it decompresses.
    """
    end, salign = _stub_layout(stub)
    align = max(salign, 4096)
    osrel = workdir / "os-release"
    osrel.write_text('NAME="vmtool guest"\nID=vmtool\nPRETTY_NAME="vmtool guest (unified kernel image)"\n')
    cmd = workdir / "cmdline"
    # The stub passes the section's bytes verbatim; a trailing NUL keeps old stubs from reading past it.
    cmd.write_bytes(cmdline.encode() + b"\0")
    argv: list[str] = ["objcopy"]
    offset = _align_up(end, align)
    for name, path in ((".osrel", osrel), (".cmdline", cmd), (".initrd", initrd), (".linux", kernel)):
        argv += [
            "--add-section",
            f"{name}={path}",
            "--change-section-vma",
            f"{name}={offset:#x}",
        ]
        offset = _align_up(offset + path.stat().st_size, align)
    argv += [os.fspath(stub), os.fspath(out)]
    run(argv, hint="objcopy from binutils must support PE images (pei-x86-64)")
    reset_pe_timestamp(out)


def reset_pe_timestamp(path: Path) -> None:
    """Zero the PE TimeDateStamp objcopy sets to the current time (as in the stub), and fix CheckSum.

    objcopy has no switch for this and ignores SOURCE_DATE_EPOCH for PE files; without it the same
    build would assemble to a different disk on every run.
    """
    data = bytearray(path.read_bytes())
    pe = int.from_bytes(data[0x3C:0x40], "little")
    if data[pe : pe + 4] != b"PE\0\0":
        raise VmtoolError(f"objcopy did not write a PE image: {path}")
    data[pe + 8 : pe + 12] = bytes(4)  # COFF header: Machine, NumberOfSections, TimeDateStamp
    csum = pe + 24 + 64  # optional header (PE32+): CheckSum at offset 64
    data[csum : csum + 4] = bytes(4)
    padded = bytes(data) + (b"\0" if len(data) % 2 else b"")
    total = sum(memoryview(padded).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    data[csum : csum + 4] = (total + len(data)).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def make_esp(image: Path, size: int, files: dict[str, Path], workdir: Path) -> None:
    """A FAT image of `size` bytes holding `files` (FAT path -> local file), made without mounting.

    The files are staged in a tree with a fixed mtime and copied with `mcopy -s -m`, so directory
    entries carry that time too and the image is the same on every run.
    """
    # FAT32, as the UEFI specification asks of an ESP (FAT16 works in OVMF, not in all firmware).
    run(["mkfs.vfat", "-C", "-F", "32", "--invariant", "-n", "ESP", os.fspath(image), str(size // 1024)])
    tree = workdir / "esp-tree"
    for dest, src in files.items():
        target = tree / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    for p in sorted(tree.rglob("*"), reverse=True):
        os.utime(p, (FIXED_MTIME, FIXED_MTIME))
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(FIXED_MTIME)}
    for top in sorted(tree.iterdir()):
        run(["mcopy", "-s", "-m", "-i", os.fspath(image), os.fspath(top), "::/"], env=env)


def sparse_copy(src: Path, dst_fd: int, offset: int) -> None:
    """Copy a file into an open file at `offset`, skipping holes (SEEK_DATA/SEEK_HOLE) and zero blocks."""
    zero = bytes(COPY_CHUNK)
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            hole = os.lseek(fd, data_start, os.SEEK_HOLE)
            p = data_start
            while p < hole:
                n = min(COPY_CHUNK, hole - p)
                buf = os.pread(fd, n, p)
                if not buf:
                    break
                if buf != zero[: len(buf)]:
                    os.pwrite(dst_fd, buf, offset + p)
                p += len(buf)
            pos = hole


def _guid(seed: bytes, what: str) -> str:
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"vmtool-disk:{what}:{hashlib.sha256(seed).hexdigest()}")
    ).upper()



def root_cmdline(m: Manifest) -> str:
    """The manifest's command line, with root=LABEL=<label> added if it names no root."""
    cmdline = m.cmdline.strip() or f"root=LABEL={m.rootfs.label} ro console=ttyS0"
    if not re.search(r"(^|\s)root=", cmdline):
        cmdline = f"root=LABEL={m.rootfs.label} {cmdline}"
    return cmdline


def assemble_disk(m: Manifest, out: Path, fmt: str) -> DiskInfo:
    """Write a bootable UEFI whole-disk image of the build `m` describes to `out`.

    `out` must lie in the manifest's directory (DiskInfo.path is relative to it). The image
    appears only when complete; the manifest is not changed: the caller records the disk with
    `replace(m, disk=info).save(...)`.
    """
    if fmt not in formats.FORMATS:
        raise VmtoolError(f"unknown disk format {fmt!r}", hint="use raw or qcow2")
    out = Path(out)
    base = m.base_dir.resolve()
    out_abs = out.resolve()
    if base not in out_abs.parents:
        raise VmtoolError(
            f"the disk image {out} must be written inside the build directory {base}",
            hint="manifest paths are relative to the manifest; choose an -o path beside manifest.json",
        )
    rootfs, kernel, initrd = m.rootfs_path, m.kernel_path, m.initrd_path
    for what, p in (("root filesystem", rootfs), ("kernel", kernel), ("initrd", initrd)):
        if not p.is_file():
            raise VmtoolError(f"the build's {what} {p} is missing", hint="rebuild it with 'vmtool build'")
    if m.rootfs.format not in formats.FORMATS:
        raise ImageError(f"the build's root filesystem has an unsupported format {m.rootfs.format!r}")
    # The build's own output, but read as hostile as any image: its header first, then qemu-img under limits.
    what = f"the build's root filesystem {rootfs}"
    root_bytes = formats.check(rootfs, m.rootfs.format, ROOTFS_POLICY, what=what).virtual_size
    stub = find_stub()
    seed = f"{m.rootfs.sha256}:{m.kernel.sha256}:{m.initrd.sha256}:{root_cmdline(m)}".encode()

    try:
        work = Path(tempfile.mkdtemp(prefix=".disk-", dir=out_abs.parent))
    except OSError as e:
        raise os_error(e, f"cannot create a work directory beside {out}") from None
    try:
        with step("making the unified kernel image"):
            uki = work / "BOOTX64.EFI"
            make_uki(stub, kernel, initrd, root_cmdline(m), uki, work)
        esp = work / "esp.img"
        with step("making the EFI system partition"):
            esp_bytes = esp_size_for(uki.stat().st_size)
            make_esp(esp, esp_bytes, {"/EFI/BOOT/BOOTX64.EFI": uki}, work)
        layout = plan_layout(esp.stat().st_size, root_bytes)
        raw = work / "disk.raw"
        with step("writing the partition table and partitions"):
            with open(raw, "wb") as f:
                f.truncate(layout.size)
            script = "\n".join(
                [
                    "label: gpt",
                    f"label-id: {_guid(seed, 'disk')}",
                    "unit: sectors",
                    f"first-lba: {ALIGN_SECTORS}",
                    f"start={layout.esp_start}, size={layout.esp_sectors}, type={ESP_TYPE}, "
                    f'uuid={_guid(seed, "esp")}, name="EFI system partition"',
                    f"start={layout.root_start}, size={layout.root_sectors}, type={ROOT_X86_64_TYPE}, "
                    f'uuid={_guid(seed, "root")}, name="{m.rootfs.label}"',
                    "",
                ]
            )
            run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", os.fspath(raw)], input=script.encode())
            fd = os.open(raw, os.O_WRONLY)
            try:
                sparse_copy(esp, fd, layout.esp_start * SECTOR)
                if m.rootfs.format == "raw":
                    sparse_copy(rootfs, fd, layout.root_start * SECTOR)
            finally:
                os.close(fd)
            if m.rootfs.format != "raw":
                # The raw driver's offset/size options make the partition a target of its own
                # (commas in option values are doubled, qemu's escaping).
                target = ",".join(
                    [
                        "driver=raw",
                        f"offset={layout.root_start * SECTOR}",
                        f"size={root_bytes}",
                        "file.driver=file",
                        "file.filename=" + os.fspath(raw).replace(",", ",,"),
                    ]
                )
                run(
                    [
                        "qemu-img",
                        "convert",
                        "-n",
                        "-f",
                        m.rootfs.format,
                        os.fspath(rootfs),
                        "--target-image-opts",
                        target,
                    ]
                )
        final = raw
        if fmt == "qcow2":
            with step("converting the disk to qcow2"):
                final = work / "disk.qcow2"
                run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(final)])
        with step("checksumming the disk image"):
            digest = sha256_file(final)
        os.chmod(final, 0o644)
        os.replace(final, out_abs)
    except OSError as e:
        raise os_error(e, f"cannot write the disk image {out}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DiskInfo(
        path=os.path.relpath(out_abs, base),
        format=fmt,
        firmware="uefi",
        virtual_size=layout.size,
        sha256=digest,
        boot="uki",
    )
