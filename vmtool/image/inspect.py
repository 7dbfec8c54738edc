"""Whole-disk inspection without root or an appliance: partitions, LVM, filesystems, root, /boot, kernels.

Root is the filesystem holding a Linux tree (/etc plus /etc/fstab, /sbin/init or /bin), or, when none can
be read natively, the single filesystem vmtool cannot look into (xfs, btrfs). /boot comes from the root's
fstab, else an XBOOTLDR partition, else another ext filesystem with vmlinuz-* at its top, else the
root's own /boot directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool.errors import ImageError
from vmtool.image import fstab as fstabmod
from vmtool.image import initsys, lvm
from vmtool.image.extfs import ExtFs
from vmtool.image.fs import FsInfo, probe
from vmtool.image.guesttree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, FsReader, GuestTree, SymlinkOutside
from vmtool.image.initsys import InitSystem
from vmtool.image.kernels import version_key
from vmtool.image.partitions import Partition, PartitionTable, read_table
from vmtool.image.source import SourceDisk

EXT_TYPES = ("ext2", "ext3", "ext4")
OPAQUE_TYPES = ("xfs", "btrfs")  # filesystems vmtool can recognise but not read natively
DISK_NAMES = ("sda", "vda", "hda", "xvda")


@dataclass
class Volume:
    name: str  # /dev/sda1, /dev/vg0/lv_root, /dev/sda (a bare filesystem)
    kind: str  # partition | lv | disk
    pieces: list[tuple[int, int]]
    size: int
    fs: FsInfo | None = None
    partition: Partition | None = None
    lv: lvm.LogicalVolume | None = None
    unsupported: str = ""
    role: str = ""
    mountpoint: str = ""
    aliases: set[str] = field(default_factory=set)

    @property
    def fstype(self) -> str:
        return self.fs.type if self.fs else ""

    def matches(self, spec: str) -> bool:
        s = spec.strip()
        if not s:
            return False
        fs = self.fs
        for prefix, value in (
            ("UUID=", fs.uuid if fs else ""),
            ("LABEL=", fs.label if fs else ""),
            ("/dev/disk/by-uuid/", fs.uuid if fs else ""),
            ("/dev/disk/by-label/", fs.label if fs else ""),
        ):
            if s.startswith(prefix):
                v = s[len(prefix) :].strip('"')
                return bool(value) and (
                    v.lower() == value.lower() if "UUID" in prefix or "uuid" in prefix else v == value
                )
        p = self.partition
        for prefix, value in (
            ("PARTUUID=", p.uuid if p else ""),
            ("PARTLABEL=", p.name if p else ""),
            ("/dev/disk/by-partuuid/", p.uuid if p else ""),
        ):
            if s.startswith(prefix):
                return bool(value) and s[len(prefix) :].strip('"').lower() == value.lower()
        if fs and fs.uuid and s.lower() == fs.uuid.lower():
            return True
        return s in self.aliases

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "offset": self.pieces[0][0] if self.pieces else None,
            "pieces": len(self.pieces),
            "fstype": self.fstype or None,
            "label": self.fs.label if self.fs else None,
            "uuid": self.fs.uuid if self.fs else None,
            "partition_type": self.partition.kind if self.partition else None,
            "role": self.role or None,
            "mountpoint": self.mountpoint or None,
            "unsupported": self.unsupported or None,
        }


@dataclass
class Kernel:
    version: str
    path: str  # guest path as found (/boot/vmlinuz-V)
    real: str  # after symlinks
    initrd: str | None
    initrd_real: str | None
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": self.path,
            "resolved": self.real,
            "initrd": self.initrd,
            "initrd_resolved": self.initrd_real,
        }


@dataclass
class DiskLayout:
    source: SourceDisk
    raw: Path
    table: PartitionTable | None
    vgs: list[lvm.VolumeGroup]
    volumes: list[Volume]
    root: Volume | None = None
    root_reason: str = ""
    boot: Volume | None = None
    boot_reason: str = ""
    fstab: str | None = None
    fstab_read: bool = False
    kernels: list[Kernel] = field(default_factory=list)
    kernels_note: str = ""
    notes: list[str] = field(default_factory=list)
    readers: dict[str, ExtFs] = field(default_factory=dict)  # volume name -> reader, reused by build
    init: InitSystem | None = None  # None: not read natively (the guestfs backend reads it)

    def to_dict(self) -> dict[str, Any]:
        newest = choose_kernel(self.kernels, None, strict=False) if self.kernels else None
        return {
            "disk": {
                "path": os.fspath(self.source.path),
                "format": self.source.format,
                "size": self.source.size,
            },
            "partition_table": self.table.to_dict() if self.table else {"kind": "none", "partitions": []},
            "volume_groups": [vg.to_dict() for vg in self.vgs],
            "filesystems": [v.to_dict() for v in self.volumes],
            "root": self.root.name if self.root else None,
            "root_reason": self.root_reason,
            "boot": self.boot.name if self.boot else None,
            "boot_reason": self.boot_reason,
            "fstab": self.fstab,
            "kernels": [k.to_dict() for k in self.kernels],
            "kernels_note": self.kernels_note or None,
            "newest_kernel": newest.version if newest else None,
            "init": self.init.to_dict() if self.init else None,
            "notes": self.notes,
        }


def _part_aliases(n: int) -> set[str]:
    out = {f"/dev/{d}{n}" for d in DISK_NAMES}
    out |= {f"/dev/nvme0n1p{n}", f"/dev/mmcblk0p{n}", f"sda{n}", f"vda{n}"}
    return out


def _lv_aliases(vg: str, lv: str) -> set[str]:
    mapper = f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"
    return {f"/dev/mapper/{mapper}", f"/dev/{vg}/{lv}", f"{vg}/{lv}", mapper}


def scan(source: SourceDisk, raw: Path) -> DiskLayout:
    """Partitions, LVM and filesystems of the disk in `raw` (no root/boot decision yet)."""
    size = os.path.getsize(raw)
    if source.format == "raw":
        size = source.size
    volumes: list[Volume] = []
    vgs: list[lvm.VolumeGroup] = []
    with open(raw, "rb") as f:
        table = read_table(f, size)
        if table is None:
            fs = probe(f, 0, size)
            if fs is None:
                raise ImageError(
                    f"{source.path}: no partition table, LVM or filesystem found",
                    hint="is it a whole-disk image? for a qcow2 file pass --format qcow2; random or damaged data "
                    "cannot be read",
                )
            if fs.type == "LVM2_member":
                volumes_pv = [
                    Volume("/dev/sda", "disk", [(0, size)], size, fs, aliases={"/dev/sda", "/dev/vda"})
                ]
                labels = _labels(f, volumes_pv)
                vgs = lvm.read_vgs(f, labels)
                volumes += volumes_pv
            else:
                volumes.append(
                    Volume("/dev/sda", "disk", [(0, size)], size, fs, aliases={"/dev/sda", "/dev/vda"})
                )
        else:
            for p in table.partitions:
                v = Volume(
                    f"/dev/sda{p.number}",
                    "partition",
                    [(p.start, p.size)],
                    p.size,
                    partition=p,
                    aliases=_part_aliases(p.number),
                )
                v.fs = probe(f, p.start, p.size)
                volumes.append(v)
            labels = _labels(f, volumes)
            if labels:
                vgs = lvm.read_vgs(f, labels)
        for vg in vgs:
            for lv in vg.lvs:
                v = Volume(
                    f"/dev/{vg.name}/{lv.name}",
                    "lv",
                    list(lv.extents),
                    lv.size,
                    lv=lv,
                    unsupported=lv.unsupported,
                    aliases=_lv_aliases(vg.name, lv.name),
                )
                if lv.extents:
                    v.fs = probe(f, lv.extents[0][0], lv.extents[0][1])
                volumes.append(v)
    for v in volumes:
        if v.fs and v.fs.type == "LVM2_member":
            v.role = "pv"
        elif v.fs and v.fs.type == "swap":
            v.role = "swap"
        elif v.partition and v.partition.kind == "efi":
            v.role = "efi"
        if v.fs and v.fs.size and v.fs.type in EXT_TYPES + OPAQUE_TYPES and v.fs.size > v.size:
            v.unsupported = (
                f"its {v.fs.type} filesystem claims {v.fs.size} bytes but the volume holds {v.size}"
                " (truncated?)"
            )
    return DiskLayout(source, raw, table, vgs, volumes)


def _labels(f: Any, volumes: list[Volume]) -> list[lvm.PVLabel]:
    out = []
    for v in volumes:
        if v.fs and v.fs.type == "LVM2_member":
            lab = lvm.find_label(f, v.pieces[0][0], v.size)
            if lab is not None:
                out.append(lab)
    return out


# A materializer turns a non-contiguous volume into a file (path) debugfs can open.
Materializer = Callable[[Volume], Path]


def reader_for(layout: DiskLayout, v: Volume, materialize: Materializer | None) -> ExtFs | None:
    if v.fstype not in EXT_TYPES or v.unsupported:
        return None
    if v.name in layout.readers:
        return layout.readers[v.name]
    if len(v.pieces) == 1:
        fs = ExtFs(layout.raw, v.pieces[0][0], name=v.name)
    elif materialize is None:
        return None
    else:
        fs = ExtFs(materialize(v), 0, name=v.name)
    layout.readers[v.name] = fs
    return fs


def _looks_like_root(fs: ExtFs) -> bool:
    etc = fs.lstat("/etc")
    if etc is None or etc[1] & S_IFMT != S_IFDIR:
        return False
    return any(
        fs.lstat(p) is not None for p in ("/etc/fstab", "/sbin/init", "/bin", "/usr/bin", "/etc/os-release")
    )


def find_root(layout: DiskLayout, root_spec: str | None, materialize: Materializer | None) -> None:
    """Set layout.root (and its reason), or raise naming the candidates."""
    vols = [v for v in layout.volumes if v.role not in ("pv",)]
    if root_spec:
        hits = [v for v in vols if v.name == root_spec or v.matches(root_spec)]
        if not hits:
            raise ImageError(
                f"--root {root_spec}: no such volume on this disk",
                hint="see the names in 'vmtool inspect' (e.g. /dev/sda2, /dev/vg0/lv_root, UUID=...)",
            )
        if len(hits) > 1:
            raise ImageError(
                f"--root {root_spec} matches several volumes: {', '.join(v.name for v in hits)}",
                hint="name one volume exactly as 'vmtool inspect' shows it",
            )
        v = hits[0]
        if v.unsupported:
            raise ImageError(
                f"{v.name} cannot be used: {v.unsupported}",
                hint="vmtool reads linear LVs and whole partitions",
            )
        if v.fstype not in EXT_TYPES + OPAQUE_TYPES:
            raise ImageError(
                f"{v.name} holds {v.fstype or 'no recognised filesystem'}, not a root filesystem",
                hint="choose a volume with an ext4, xfs or btrfs filesystem",
            )
        layout.root, layout.root_reason = v, "chosen with --root"
        v.role = "root"
        return
    confirmed: list[Volume] = []
    opaque: list[Volume] = []
    for v in vols:
        if v.unsupported and v.lv is not None and v.lv.unsupported:
            continue
        if v.fstype in EXT_TYPES and not v.unsupported:
            fs = reader_for(layout, v, materialize)
            if fs is not None and _looks_like_root(fs):
                confirmed.append(v)
        elif v.fstype in OPAQUE_TYPES:
            opaque.append(v)
    if len(confirmed) == 1:
        layout.root, layout.root_reason = (
            confirmed[0],
            "the only filesystem holding a Linux root tree (/etc)",
        )
    elif len(confirmed) > 1:
        raise ImageError(
            "several candidate root filesystems: " + ", ".join(f"{v.name} ({v.fstype})" for v in confirmed),
            hint="choose one with --root NAME (names as 'vmtool inspect' shows them)",
        )
    elif len(opaque) == 1:
        v = opaque[0]
        layout.root = v
        layout.root_reason = (
            f"the only filesystem that can hold a root ({v.fstype}, whose contents are read "
            "through the guestfs backend)"
        )
    elif len(opaque) > 1:
        raise ImageError(
            "several candidate root filesystems: " + ", ".join(f"{v.name} ({v.fstype})" for v in opaque),
            hint="choose one with --root NAME (names as 'vmtool inspect' shows them)",
        )
    else:
        broken = [v for v in vols if v.unsupported]
        why = "; ".join(f"{v.name}: {v.unsupported}" for v in broken)
        raise ImageError(
            "no root filesystem found" + (f" ({why})" if why else ""),
            hint="the disk holds no ext2/3/4, xfs or btrfs filesystem with a Linux tree; is it the right image?",
        )
    layout.root.role = "root"


def find_boot(layout: DiskLayout, materialize: Materializer | None) -> None:
    """Set layout.boot from the root's fstab, else by fallbacks; None means /boot is a directory in root."""
    entries = fstabmod.parse(layout.fstab) if layout.fstab else []
    for e in entries:
        for v in layout.volumes:
            if v is not layout.root and v.matches(e.spec):
                v.mountpoint = e.file
                if e.vfstype == "swap" or e.file in ("swap", "none") and v.fstype == "swap":
                    v.role = v.role or "swap"
    if layout.root:
        layout.root.mountpoint = "/"
    for e in entries:
        if e.file == "/boot":
            hits = [v for v in layout.volumes if v is not layout.root and v.matches(e.spec)]
            if hits:
                layout.boot, layout.boot_reason = hits[0], f"/etc/fstab mounts it on /boot ({e.spec})"
                hits[0].role = "boot"
                return
            layout.notes.append(f"/etc/fstab mounts {e.spec} on /boot, but no such volume is on this disk")
    for v in layout.volumes:
        if v.partition and v.partition.kind == "xbootldr" and v.fstype:
            layout.boot, layout.boot_reason = v, "XBOOTLDR partition"
            v.role = "boot"
            return
    for v in layout.volumes:
        if v is layout.root or v.fstype not in EXT_TYPES:
            continue
        fs = reader_for(layout, v, materialize)
        if fs is not None and any(n.startswith("vmlinuz-") for n, _ in fs.listdir("/")):
            layout.boot, layout.boot_reason = v, "holds vmlinuz-* at its top level"
            v.role = "boot"
            return
    layout.boot_reason = "/boot is a directory of the root filesystem"


def list_kernels(tree: GuestTree) -> list[Kernel]:
    """Versioned kernels in the guest's /boot, symlinks resolved inside the guest, paired with initrds."""
    if not tree.exists("/boot"):
        return []
    names = {n: mode for n, mode in tree.listdir("/boot")}
    kernels = []
    for name, mode in sorted(names.items()):
        if not name.startswith("vmlinuz-") or mode & S_IFMT not in (S_IFREG, S_IFLNK):
            continue
        ver = name[len("vmlinuz-") :]
        if not re.fullmatch(r"[0-9][A-Za-z0-9._+~-]*", ver) or ver.endswith((".old", ".bak", ".efi.signed")):
            continue
        real = _resolve_boot_file(tree, f"/boot/{name}")
        initrd = initrd_real = None
        for cand in (f"initrd.img-{ver}", f"initramfs-{ver}.img", f"initrd-{ver}"):
            if cand in names:
                initrd = f"/boot/{cand}"
                initrd_real = _resolve_boot_file(tree, initrd)
                break
        kernels.append(Kernel(ver, f"/boot/{name}", real, initrd, initrd_real))
    return kernels


def _resolve_boot_file(tree: GuestTree, path: str) -> str:
    real = tree.resolve(path, what=path)
    _fs, _rel, mp = tree.fs_of(real)
    boot_mp = tree.fs_of("/boot")[2]
    if mp != boot_mp or not real.startswith("/boot/"):
        raise SymlinkOutside(
            f"{path} is a symlink that points outside the /boot filesystem (to {real})",
            hint="the image is hostile or broken; vmtool never follows such links",
        )
    st = tree.lstat(real)
    if st is None or st[1] & S_IFMT != S_IFREG:
        raise ImageError(f"{path} does not lead to a regular file", hint="the image's /boot is broken")
    return real


def choose_kernel(kernels: list[Kernel], version: str | None, *, strict: bool = True) -> Kernel | None:
    if version:
        for k in kernels:
            if k.version == version:
                if k.initrd is None and strict:
                    raise ImageError(
                        f"kernel {version} has no initrd (initrd.img-{version}) in /boot",
                        hint="choose another --kernel-version",
                    )
                return k
        if not strict:
            return None
        have = ", ".join(k.version for k in sorted(kernels, key=lambda k: version_key(k.version))) or "none"
        raise ImageError(
            f"kernel version {version} is not in the image (found: {have})",
            hint="pick one of the versions found, or leave out --kernel-version for the newest",
        )
    paired = [k for k in kernels if k.initrd]
    if not paired:
        if not strict:
            return None
        if kernels:
            raise ImageError(
                "the image's kernels have no matching initrd: " + ", ".join(k.version for k in kernels),
                hint="install an initramfs for the kernel in the image (update-initramfs / dracut)",
            )
        raise ImageError(
            "no kernel found in the image's /boot",
            hint="install a kernel package in the image, or check that its /boot partition is on this disk",
        )
    return max(paired, key=lambda k: version_key(k.version))


def guest_tree(root: FsReader, boot: FsReader | None) -> GuestTree:
    mounts: dict[str, FsReader] = {"/": root}
    if boot is not None:
        mounts["/boot"] = boot
    return GuestTree(mounts)


def read_fstab(tree: GuestTree) -> str | None:
    try:
        real = tree.resolve("/etc/fstab", what="/etc/fstab")
    except ImageError as e:
        if "does not exist" in e.message:
            return None
        raise
    fs, rel, _ = tree.fs_of(real)
    read = getattr(fs, "read", None)
    if read is None:
        return None
    data: bytes = read(rel)
    return data.decode("utf-8", errors="replace")


def inspect_disk(
    source: SourceDisk, raw: Path, *, root_spec: str | None = None, materialize: Materializer | None = None
) -> DiskLayout:
    """Full native inspection: layout, root, fstab, /boot and kernels (where ext filesystems allow)."""
    layout = scan(source, raw)
    find_root(layout, root_spec, materialize)
    assert layout.root is not None
    root_fs = reader_for(layout, layout.root, materialize)
    if root_fs is not None:
        layout.fstab = read_fstab(guest_tree(root_fs, None))
        layout.fstab_read = True
        layout.init = initsys.detect(guest_tree(root_fs, None))
    else:
        layout.notes.append(
            f"the root filesystem is {layout.root.fstype}: its files are read by the guestfs backend"
        )
    find_boot(layout, materialize)
    boot_fs = reader_for(layout, layout.boot, materialize) if layout.boot else None
    if layout.boot is not None and boot_fs is None:
        layout.kernels_note = f"/boot is {layout.boot.fstype}: kernels are read by the guestfs backend"
    elif root_fs is None and layout.boot is None:
        layout.kernels_note = "kernels live in the root filesystem: read by the guestfs backend"
    else:
        base: FsReader = root_fs if root_fs is not None else boot_fs  # type: ignore[assignment]
        layout.kernels = list_kernels(guest_tree(base, boot_fs))
    return layout
