"""Whole-disk images laid out the way installers do it: the disk half of `vmtool image create`.

Made without mounting anything: partition tables with sfdisk on the image file, filesystems as separate
files (mke2fs -d, mkfs.xfs -p protofile, mkswap) copied in at their offsets. LVM metadata is written by
the real LVM tools on a loop device over the LVM partition (pvcreate, vgcreate, then vgcfgbackup + a
`logical_volumes` block + vgcfgrestore, since this kernel has no device-mapper to run lvcreate); LV data
is then written at pe_start + extent * extent_size inside the PV. The LVM steps need root (losetup);
everything else does not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmtool.errors import VmtoolError
from vmtool.launch.host import newest_host_kernel
from vmtool.run import run

MiB = 1 << 20
EXTENT_MIB = 4

GPT_TYPES = {
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "lvm": "E6D6D379-F507-44C2-A23C-238F2A3DF928",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "xbootldr": "BC13C2FF-59E6-4262-A352-B275FD6F7172",
}
MBR_TYPES = {"linux": "83", "lvm": "8e", "swap": "82", "xbootldr": "ea"}

LVM_CONFIG = (
    "devices{use_devicesfile=0 obtain_device_list_from_udev=0 scan_lvs=0} backup{backup=0 archive=0} "
    "activation{udev_sync=0 udev_rules=0 monitoring=0}"
)
LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}


def _uuid() -> str:
    return str(uuidlib.uuid4())


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def sparse_copy_into(src: Path, dst: Path, offset: int) -> None:
    """Write `src` into `dst` at `offset`, data ranges only (holes in src stay holes in dst)."""
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                n = min(8 * MiB, hole - data)
                buf = os.pread(fi.fileno(), n, data)
                if buf.count(0) != len(buf):
                    os.pwrite(fo.fileno(), buf, offset + data)
                data += len(buf)
            pos = hole


def _xfs_protofile(tree: Path, proto: Path) -> None:
    """mkfs.xfs -p protofile describing `tree` (regular files, directories, symlinks)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for entry in sorted(d.iterdir(), key=lambda p: p.name):
            ind = " " * depth
            st = entry.lstat()
            # type, setuid, setgid, permissions, owner: a distribution tree keeps its owners and su bits
            su = ("u" if st.st_mode & 0o4000 else "-") + ("g" if st.st_mode & 0o2000 else "-")
            perm = f"{su}{st.st_mode & 0o777:03o} {st.st_uid} {st.st_gid}"
            if entry.is_symlink():
                lines.append(f"{ind}{entry.name} l{perm} {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{ind}{entry.name} d{perm}")
                walk(entry, depth + 1)
                lines.append(f"{ind}$")
            elif entry.is_file():
                lines.append(f"{ind}{entry.name} -{perm} {entry}")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                lines.append(f"{ind}{entry.name} {kind}{perm} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
            elif stat.S_ISFIFO(st.st_mode):
                lines.append(f"{ind}{entry.name} p{perm}")

    walk(tree, 1)
    lines.append("$")
    proto.write_text("\n".join(lines) + "\n")


def make_fs(tree: Path, image: Path, *, fstype: str, label: str, uuid: str, size_mib: int) -> None:
    """A filesystem image of `tree` made without mounting."""
    if fstype in ("ext2", "ext3", "ext4"):
        run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                fstype,
                "-L",
                label,
                "-U",
                uuid,
                "-d",
                os.fspath(tree),
                os.fspath(image),
                f"{size_mib}M",
            ]
        )
    elif fstype == "xfs":
        proto = image.with_suffix(".proto")
        _xfs_protofile(tree, proto)
        with open(image, "wb") as f:
            f.truncate(max(size_mib, 300) * MiB)
        # mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under the xfs test suite.
        run(
            [
                "mkfs.xfs",
                "-q",
                "-f",
                "-L",
                label,
                "-m",
                f"uuid={uuid}",
                "-p",
                os.fspath(proto),
                os.fspath(image),
            ],
            env={"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"},
        )
        proto.unlink()
    else:
        raise VmtoolError(f"make_fs: unsupported filesystem type {fstype!r}")


def _fs_size_mib(fstype: str, data_bytes: int, minimum: int) -> int:
    want = max(minimum, int(data_bytes * 1.4 / MiB) + 24)
    if fstype == "xfs":
        want = max(want, 300)
    return _round_up(want, EXTENT_MIB)


@contextlib.contextmanager
def loop_device(image: Path, offset: int, size: int) -> Iterator[str]:
    try:
        dev = (
            run(
                ["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), os.fspath(image)],
                hint="making LVM test images needs root (loop devices)",
            )
            .stdout.decode()
            .strip()
        )
    except VmtoolError as e:
        raise VmtoolError(
            f"cannot attach a loop device for LVM: {e.message}",
            hint="making LVM test images needs root and loop devices",
        ) from None
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev], check=False)


def write_lvm(
    image: Path,
    offset: int,
    size: int,
    *,
    vg: str,
    lvs: Sequence[tuple[str, list[tuple[int, int]]]],
    workdir: Path,
) -> dict[str, Any]:
    """Real LVM2 metadata on the partition at `offset`: one PV, VG `vg`, LVs given as (name, [(pe, count)...]).

    Returns pe_start (bytes) and extent_size (bytes) for placing LV data.
    """
    with loop_device(image, offset, size) as dev:
        common = ["--devices", dev, "--config", LVM_CONFIG]
        run(["pvcreate", *common, "-y", "-ff", "--uuid", _lvm_uuid(), "--norestorefile", dev], env=LVM_ENV)
        run(["vgcreate", *common, "-s", f"{EXTENT_MIB}M", vg, dev], env=LVM_ENV)
        backup = workdir / f"{vg}.vgcfg"
        run(["vgcfgbackup", *common, "-f", os.fspath(backup), vg], env=LVM_ENV)
        text = backup.read_text()
        pe_start = int(_grab(text, "pe_start"))
        extent_sectors = int(_grab(text, "extent_size"))
        blocks = []
        for name, segs in lvs:
            seg_text = []
            le = 0
            for i, (pe, count) in enumerate(segs, 1):
                seg_text.append(
                    f'segment{i} {{\nstart_extent = {le}\nextent_count = {count}\ntype = "striped"\n'
                    f'stripe_count = 1\nstripes = [\n"pv0", {pe}\n]\n}}\n'
                )
                le += count
            blocks.append(
                f'{name} {{\nid = "{_lvm_uuid()}"\nstatus = ["READ", "WRITE", "VISIBLE"]\nflags = []\n'
                f'creation_time = 1700000000\ncreation_host = "vmtool-test"\nsegment_count = {len(segs)}\n'
                + "".join(seg_text)
                + "}\n"
            )
        # Insert the LV section before the VG's closing brace (the last "}" of the VG block).
        head, _, tail = text.rpartition("}")
        text = head + "logical_volumes {\n" + "".join(blocks) + "}\n}" + tail
        backup.write_text(text)
        run(["vgcfgrestore", *common, "-f", os.fspath(backup), vg], env=LVM_ENV)
        backup.unlink()
    return {"pe_start": pe_start * 512, "extent_size": extent_sectors * 512}


def _grab(text: str, key: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(key) and "=" in s:
            return s.split("=", 1)[1].split("#", 1)[0].strip()
    raise VmtoolError(f"vgcfgbackup output has no {key}")


def _lvm_uuid() -> str:
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    s = "".join(secrets.choice(alphabet) for _ in range(32))
    parts = [6, 4, 4, 4, 4, 4, 6]
    out, i = [], 0
    for n in parts:
        out.append(s[i : i + n])
        i += n
    return "-".join(out)


def _mapper(vg: str, lv: str) -> str:
    """The /dev/mapper name of an LV: dashes inside either name are doubled (debian--vg-root)."""
    return f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _fstab(style: str, *, root: str, fstype: str, facts: dict[str, Any]) -> str:
    lines = ["# /etc/fstab: static file system information (made by vmtool image create)", "#"]
    r = facts["root"]
    if style == "uuid":
        lines.append(f"UUID={r['uuid']}\t/\t{fstype}\tdefaults\t1 1")
    elif style == "label":
        lines.append(f"LABEL={r['label']}\t/\t{fstype}\tdefaults\t1 1")
    elif style == "mapper":
        if root == "lvm":
            lines.append(f"{_mapper(facts['vg'], facts['lv_root'])}\t/\t{fstype}\tdefaults\t1 1")
        else:
            lines.append(f"/dev/vda{r['partition']}\t/\t{fstype}\tdefaults\t1 1")
    b = facts.get("boot_fs")
    if b:
        spec = f"LABEL={b['label']}" if style == "label" else f"UUID={b['uuid']}"
        lines.append(f"{spec}\t/boot\t{b['fstype']}\tdefaults\t1 2")
    s = facts.get("swap")
    if s:
        if style == "mapper" and root == "lvm":
            spec = _mapper(facts["vg"], facts["lv_swap"])
        elif style == "label":
            spec = f"LABEL={s['label']}"
        else:
            spec = f"UUID={s['uuid']}"
        lines.append(f"{spec}\tswap\tswap\tdefaults\t0 0")
    lines.append("proc\t/proc\tproc\tdefaults\t0 0")
    lines.append("tmpfs\t/tmp\ttmpfs\tdefaults,size=64m\t0 0")
    return "\n".join(lines) + "\n"


def make_whole_disk(
    out: str | os.PathLike[str],
    *,
    tree: Path,
    table: str = "gpt",
    boot: str = "partition",
    root: str = "partition",
    fstype: str = "ext4",
    fstab_style: str = "uuid",
    kernels: Sequence[tuple[Path, Path, str]] | None = None,
    fmt: str = "raw",
    size_mib: int | None = None,
    swap_lv_first: bool = True,
    root_label: str = "rootfs",
    vg: str = "vg0",
    lv_root: str = "lv_root",
    lv_swap: str = "lv_swap",
    swap_mib: int = 8,
    boot_fstype: str = "ext4",
    split_root: bool = False,
    fstab: bool = True,
    boot_files: dict[str, bytes | str] | None = None,
    boot_symlinks: dict[str, str] | None = None,
    root_size_mib: int | None = None,
    root_symlinks: dict[str, str] | None = None,
    consume_tree: bool = False,
) -> dict[str, Any]:
    """Make a whole-disk image of `tree` laid out as an installer would, and return its layout facts.

    table: gpt | mbr (MBR puts the root/LVM partition in an extended partition, as a logical one).
    kernels: (kernel, initrd, version) copied into /boot; default: the host's newest. What the tree's
    own /boot holds (a distribution's kernels) goes into the /boot partition as well.
    boot: partition (a separate /boot of boot_fstype) | dir (kernels in the root filesystem's /boot).
    root: partition | lvm (VG `vg` with the swap LV before the root LV unless swap_lv_first=False;
    split_root=True splits the root LV into two segments around the swap LV).
    boot_files / boot_symlinks: extra entries put into the /boot filesystem (name -> content / target).
    root_symlinks: symlinks put into the root filesystem (path -> target), replacing what is there.
    consume_tree: move `tree` in and change it (it must be on the same filesystem as `out`).
    """
    out = Path(out)
    kernels = list(kernels) if kernels is not None else [newest_host_kernel()]
    facts: dict[str, Any] = {
        "table": table,
        "boot": boot,
        "root_kind": root,
        "fstype": fstype,
        "fstab_style": fstab_style,
        "vg": vg if root == "lvm" else None,
        "lv_root": lv_root,
        "lv_swap": lv_swap,
    }
    with tempfile.TemporaryDirectory(prefix="vmtool-disk-", dir=out.parent) as tmps:
        tmp = Path(tmps)
        rtree = tmp / "root"
        if consume_tree:  # the caller's tree is changed in place (owners and xattrs stay as they are)
            os.replace(tree, rtree)
        else:
            shutil.copytree(tree, rtree, symlinks=True, copy_function=os.link)
        btree = tmp / "boot"
        btree.mkdir()
        kdir = btree if boot == "partition" else rtree / "boot"
        kdir.mkdir(exist_ok=True)
        if boot == "partition" and (rtree / "boot").is_dir():
            # A distribution's kernels move to the /boot filesystem; /boot stays as the mount point.
            for entry in (rtree / "boot").iterdir():
                os.replace(entry, btree / entry.name)
        versions = []
        for k, i, ver in kernels:
            shutil.copyfile(k, kdir / f"vmlinuz-{ver}")
            shutil.copyfile(i, kdir / f"initrd.img-{ver}")
            if (k.parent / f"config-{ver}").is_file():  # the initrd check reads it
                shutil.copyfile(k.parent / f"config-{ver}", kdir / f"config-{ver}")
            versions.append(ver)
        for name, content in (boot_files or {}).items():
            bf = kdir / name
            if isinstance(content, bytes):
                bf.write_bytes(content)
            else:
                bf.write_text(content)
        for name, target in (boot_symlinks or {}).items():
            (kdir / name).symlink_to(target)
        facts["kernels"] = versions

        facts["root"] = {"uuid": _uuid(), "label": root_label}
        if boot == "partition":
            facts["boot_fs"] = {"uuid": _uuid(), "label": "boot", "fstype": boot_fstype}
        if root == "lvm":
            facts["swap"] = {"uuid": _uuid(), "label": "swap"}

        # Partition plan (MiB): [boot] then root or LVM.
        root_mib = root_size_mib or _fs_size_mib(fstype, _tree_size(rtree), 64)
        boot_mib = _fs_size_mib(boot_fstype, _tree_size(btree), 32) if boot == "partition" else 0
        parts: list[dict[str, Any]] = []
        start = 1
        if boot == "partition":
            parts.append({"role": "boot", "type": "linux", "start_mib": start, "size_mib": boot_mib})
            start += boot_mib
        if table == "mbr":
            start += 1  # room for the extended partition's first EBR
        if root == "lvm":
            lvm_mib = 1 + swap_mib + root_mib + EXTENT_MIB
            parts.append({"role": "lvm", "type": "lvm", "start_mib": start, "size_mib": lvm_mib})
            start += lvm_mib
        else:
            parts.append({"role": "root", "type": "linux", "start_mib": start, "size_mib": root_mib})
            start += root_mib
            facts["root"]["partition"] = len(parts) if table == "gpt" else 5
        total_mib = max(size_mib or 0, start + 2)
        facts["size"] = total_mib * MiB

        fstab_text = _fstab(fstab_style, root=root, fstype=fstype, facts=facts) if fstab else None
        etc_fstab = rtree / "etc/fstab"
        if etc_fstab.exists() or etc_fstab.is_symlink():
            etc_fstab.unlink()
        if fstab_text is not None:
            etc_fstab.parent.mkdir(parents=True, exist_ok=True)
            etc_fstab.write_text(fstab_text)
        facts["fstab"] = fstab_text
        for rel, target in (root_symlinks or {}).items():
            link = rtree / rel.lstrip("/")
            if link.exists() or link.is_symlink():
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)

        img = tmp / "disk.raw"
        with open(img, "wb") as f:
            f.truncate(total_mib * MiB)
        script = [f"label: {'gpt' if table == 'gpt' else 'dos'}", "unit: sectors"]
        types = GPT_TYPES if table == "gpt" else MBR_TYPES
        for n, p in enumerate(parts):
            last = n == len(parts) - 1
            if table == "mbr" and last:
                ext_start = p["start_mib"] - 1
                script.append(f"start={ext_start * 2048}, size={(p['size_mib'] + 1) * 2048}, type=5")
                script.append(
                    f"start={p['start_mib'] * 2048}, size={p['size_mib'] * 2048}, type={types[p['type']]}"
                )
            else:
                script.append(
                    f"start={p['start_mib'] * 2048}, size={p['size_mib'] * 2048}, type={types[p['type']]}"
                )
        run(
            ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", os.fspath(img)],
            input=("\n".join(script) + "\n").encode(),
        )
        numbers = []
        for n, p in enumerate(parts):
            num = n + 1
            if table == "mbr" and n == len(parts) - 1:
                num = 5
            p["number"] = num
            numbers.append(num)
        facts["partitions"] = [{k: v for k, v in p.items()} for p in parts]

        if boot == "partition":
            bimg = tmp / "boot.img"
            make_fs(
                btree, bimg, fstype=boot_fstype, label="boot", uuid=facts["boot_fs"]["uuid"], size_mib=boot_mib
            )
            sparse_copy_into(bimg, img, parts[0]["start_mib"] * MiB)
            bimg.unlink()
            facts["boot_fs"]["partition"] = parts[0]["number"]

        rimg = tmp / "root.img"
        make_fs(rtree, rimg, fstype=fstype, label=root_label, uuid=facts["root"]["uuid"], size_mib=root_mib)
        root_bytes = os.path.getsize(rimg)
        if root == "partition":
            p = parts[-1]
            if root_bytes > p["size_mib"] * MiB:
                raise VmtoolError("root filesystem larger than its partition")
            sparse_copy_into(rimg, img, p["start_mib"] * MiB)
            facts["root"]["offset"] = p["start_mib"] * MiB
        else:
            p = parts[-1]
            root_ext = _round_up(root_bytes, EXTENT_MIB * MiB) // (EXTENT_MIB * MiB)
            swap_ext = max(1, swap_mib // EXTENT_MIB)
            if split_root:
                first = max(1, root_ext // 2)
                root_segs = [(0, first), (first + swap_ext, root_ext - first)]
                swap_segs = [(first, swap_ext)]
            elif swap_lv_first:
                swap_segs = [(0, swap_ext)]
                root_segs = [(swap_ext, root_ext)]
            else:
                root_segs = [(0, root_ext)]
                swap_segs = [(root_ext, swap_ext)]
            order = [(lv_swap, swap_segs), (lv_root, root_segs)]
            lvm = write_lvm(img, p["start_mib"] * MiB, p["size_mib"] * MiB, vg=vg, lvs=order, workdir=tmp)
            pv_data = p["start_mib"] * MiB + lvm["pe_start"]
            es = lvm["extent_size"]
            simg = tmp / "swap.img"
            with open(simg, "wb") as f:
                f.truncate(swap_mib * MiB)
            run(["mkswap", "-L", "swap", "-U", facts["swap"]["uuid"], os.fspath(simg)])
            sparse_copy_into(simg, img, pv_data + swap_segs[0][0] * es)
            simg.unlink()
            # Write the root filesystem segment by segment at its extents.
            seg_files = _split_file(rimg, [c * es for _, c in root_segs], tmp)
            for (pe, _count), part_file in zip(root_segs, seg_files, strict=True):
                sparse_copy_into(part_file, img, pv_data + pe * es)
                part_file.unlink()
            facts["lvm"] = {
                "pe_start": lvm["pe_start"],
                "extent_size": es,
                "lv_root": root_segs,  # the root LV's segments, whatever its name
                "lv_swap": swap_segs,
                "partition": p["number"],
            }
            facts["root"]["offset"] = pv_data + root_segs[0][0] * es
        facts["root"]["size"] = root_bytes
        rimg.unlink(missing_ok=True)

        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "qcow2":
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(img), os.fspath(out)])
        else:
            os.replace(img, out)
    facts["path"] = os.fspath(out)
    facts["format"] = fmt
    return facts


def _split_file(src: Path, sizes: list[int], tmp: Path) -> list[Path]:
    """Cut `src` into consecutive pieces of the given sizes (the last may be shorter), sparse."""
    outs = []
    pos = 0
    total = os.path.getsize(src)
    if len(sizes) == 1:
        return [src]
    with open(src, "rb") as fi:
        for n, size in enumerate(sizes):
            piece = tmp / f"{src.name}.{n}"
            with open(piece, "wb") as fo:
                fo.truncate(0)
                end = min(pos + size, total)
                off = pos
                while off < end:
                    k = min(8 * MiB, end - off)
                    buf = os.pread(fi.fileno(), k, off)
                    if buf.count(0) != len(buf):
                        os.pwrite(fo.fileno(), buf, off - pos)
                    off += k
                fo.truncate(max(0, end - pos))
            pos += size
            outs.append(piece)
    return outs
