"""Every bad input of the build issue: one error line + a hint, non-zero exit, no traceback, no OUTDIR."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import tree_with_host_kernel, whole_disk
from vmtool.cli.main import main
from vmtool.image import lvm
from vmtool.recipe.disk import sparse_copy_into
from vmtool.run import run

pytestmark = pytest.mark.integration

MiB = 1 << 20


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path | None, match: str) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("vmtool: error: ") and lines[1].startswith("hint: "), err
    assert re.search(match, lines[0]), lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def build_fails(
    capsys: pytest.CaptureFixture[str], disk: Path, tmp_path: Path, match: str, *extra: str
) -> str:
    out = tmp_path / "out"
    return fails(capsys, ["build", str(disk), "-o", str(out), *extra], out, match)


def test_random_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "random.img"
    disk.write_bytes(random.Random(1).randbytes(4 * MiB))
    build_fails(capsys, disk, tmp_path, "no partition table, LVM or filesystem")
    fails(capsys, ["inspect", str(disk)], None, "no partition table, LVM or filesystem")


def test_empty_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    build_fails(capsys, tmp_path / "empty.img", tmp_path, "empty")
    build_fails(capsys, tmp_path / "nope.img", tmp_path, "no such file")


def test_truncated_image_partition_past_the_end(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "truncated.raw"
    shutil.copyfile(default_disk, disk)
    os.truncate(disk, 100 * MiB)
    build_fails(capsys, disk, tmp_path, r"partition 2 .* runs past the end of the disk")


def test_truncated_qcow2(default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "d.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(default_disk), str(q)])
    os.truncate(q, os.path.getsize(q) // 3)
    build_fails(capsys, q, tmp_path, "qcow2")


def test_overlapping_partitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buf = bytearray(16 * MiB)
    struct.pack_into("<B3xB3xII", buf, 446, 0, 0x83, 2048, 8192)
    struct.pack_into("<B3xB3xII", buf, 462, 0, 0x83, 6144, 8192)
    buf[510:512] = b"\x55\xaa"
    disk = tmp_path / "overlap.img"
    disk.write_bytes(bytes(buf))
    build_fails(capsys, disk, tmp_path, "partitions 1 and 2 overlap")


def _rewrite_lvm_text(
    img: Path, facts: dict[str, Any], change: Callable[[bytes], bytes], *, fix_crc: bool = True
) -> None:
    part = facts["partitions"][-1]
    pv_off, pv_size = part["start_mib"] * MiB, part["size_mib"] * MiB
    with open(img, "r+b") as f:
        label = lvm.find_label(f, pv_off, pv_size)
        assert label is not None
        mda_off, _ = label.metadata_areas[0]
        f.seek(pv_off + mda_off)
        hdr = bytearray(f.read(512))
        r_off, r_size, r_crc, flags = struct.unpack_from("<QQII", hdr, 40)
        f.seek(pv_off + mda_off + r_off)
        text = f.read(r_size)
        new = change(text)
        f.seek(pv_off + mda_off + r_off)
        f.write(new)
        crc = lvm.lvm_crc(new) if fix_crc else r_crc
        struct.pack_into("<QQII", hdr, 40, r_off, len(new), crc, flags)
        struct.pack_into("<I", hdr, 0, lvm.lvm_crc(bytes(hdr[4:512])))
        f.seek(pv_off + mda_off)
        f.write(hdr)


@pytest.fixture
def lvm_disk(guest_tree_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    disk = tmp_path / "lvm.raw"
    facts = whole_disk(disk, tree=guest_tree_dir, table="gpt", boot="partition", root="lvm")
    return disk, facts


def test_lv_extents_outside_the_pv(
    lvm_disk: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk, facts = lvm_disk
    pe = facts["lvm"]["lv_root"][0][0]
    _rewrite_lvm_text(disk, facts, lambda t: t.replace(f'"pv0", {pe}\n'.encode(), b'"pv0", 4000\n'))
    build_fails(capsys, disk, tmp_path, r"lv_root: extents 4000-.* lie outside PV pv0")


def test_lvm_metadata_that_does_not_parse(
    lvm_disk: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk, facts = lvm_disk
    _rewrite_lvm_text(disk, facts, lambda t: t.replace(b"logical_volumes {", b"logical_volumes { = [", 1))
    build_fails(capsys, disk, tmp_path, "LVM metadata does not parse")


def test_lvm_metadata_checksum_damaged(
    lvm_disk: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk, facts = lvm_disk
    _rewrite_lvm_text(disk, facts, lambda t: t.replace(b"lv_root", b"lv_ruut", 1), fix_crc=False)
    build_fails(capsys, disk, tmp_path, "LVM metadata is unreadable: metadata text checksum does not match")


def _gpt_disk(tmp_path: Path, parts: list[Path]) -> Path:
    """A GPT disk with one Linux partition per filesystem image in `parts`."""
    disk = tmp_path / "disk.raw"
    sizes = [-(-os.path.getsize(p) // MiB) for p in parts]
    with open(disk, "wb") as f:
        f.truncate((sum(sizes) + 2) * MiB)
    script = ["label: gpt"]
    start = 1
    for s in sizes:
        script.append(f"start={start * 2048}, size={s * 2048}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4")
        start += s
    run(["sfdisk", "-q", str(disk)], input=("\n".join(script) + "\n").encode())
    start = 1
    for p, s in zip(parts, sizes, strict=True):
        sparse_copy_into(p, disk, start * MiB)
        start += s
    return disk


def _fs(tmp_path: Path, name: str, tree: Path | None, fstype: str = "ext4") -> Path:
    img = tmp_path / f"{name}.img"
    if fstype == "swap":
        with open(img, "wb") as f:
            f.truncate(8 * MiB)
        run(["mkswap", str(img)])
        return img
    empty = tmp_path / f"{name}.empty"
    empty.mkdir(exist_ok=True)
    run(["mke2fs", "-q", "-F", "-t", fstype, "-d", str(tree or empty), str(img), "96M"])
    return img


def test_no_root_filesystem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = _gpt_disk(tmp_path, [_fs(tmp_path, "data", None), _fs(tmp_path, "swap", None, "swap")])
    build_fails(capsys, disk, tmp_path, "no root filesystem found")


def test_several_candidate_roots_then_root_option(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    disk = _gpt_disk(tmp_path, [_fs(tmp_path, "a", tree), _fs(tmp_path, "b", tree)])
    msg = build_fails(capsys, disk, tmp_path, "several candidate root filesystems")
    assert "/dev/sda1 (ext4)" in msg and "/dev/sda2 (ext4)" in msg
    assert main(["build", str(disk), "-o", str(tmp_path / "out"), "--root", "/dev/sda2"]) == 0
    assert (tmp_path / "out/manifest.json").exists()
    fails(
        capsys,
        ["build", str(disk), "-o", str(tmp_path / "o2"), "--root", "/dev/sda9"],
        tmp_path / "o2",
        "no such volume",
    )


def test_no_kernel(guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "nokernel.raw"
    whole_disk(disk, tree=guest_tree_dir, boot="partition", root="lvm", kernels=[], decoys=False)
    build_fails(capsys, disk, tmp_path, "no kernel found")


def test_kernel_symlink_outside_the_guest(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "evil.raw"
    whole_disk(
        disk,
        tree=guest_tree_dir,
        boot="partition",
        root="partition",
        boot_symlinks={
            "vmlinuz-9.9.9-1-amd64": "../../../../../../etc/shadow",
            "initrd.img-9.9.9-1-amd64": "initrd.img-6.1.0-9-amd64",
        },
    )
    build_fails(capsys, disk, tmp_path, "symlink points outside the guest filesystem")


def test_kernel_symlink_leaving_boot(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "evil2.raw"
    whole_disk(
        disk,
        tree=guest_tree_dir,
        boot="partition",
        root="partition",
        boot_symlinks={"vmlinuz-9.9.9-1-amd64": "/etc/passwd"},
    )
    build_fails(capsys, disk, tmp_path, "points outside the /boot filesystem")


def test_fstab_symlink_outside_the_guest(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "evil3.raw"
    whole_disk(
        disk,
        tree=guest_tree_dir,
        boot="partition",
        root="partition",
        fstab=False,
        root_symlinks={"etc/fstab": "../../../../../../../etc/shadow"},
    )
    build_fails(capsys, disk, tmp_path, "symlink points outside the guest filesystem")


def test_dangling_fstab_symlink_is_replaced(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "dangling.raw"
    whole_disk(
        disk,
        tree=guest_tree_dir,
        boot="partition",
        root="partition",
        fstab=False,
        root_symlinks={"etc/fstab": "/run/fstab.generated"},
    )
    assert main(["build", str(disk), "-o", str(tmp_path / "out")]) == 0
    ls = run(["debugfs", "-R", "ls -p /etc", str(tmp_path / "out/rootfs.img")]).stdout.decode()
    assert "/100644/0/0/fstab/" in ls  # a regular file now, not a symlink written through


def test_qcow2_with_backing_file(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = tmp_path / "overlay.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", str(default_disk), "-F", "raw", str(q)])
    build_fails(capsys, q, tmp_path, "backing file")
    fails(capsys, ["inspect", str(q)], None, "backing file")


def test_qcow2_with_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "ext.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(q), "64M"])
    build_fails(capsys, q, tmp_path, "external data file")


def test_xfs_root_refused_by_native_backend_and_label_too_long(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "xfs.raw"
    whole_disk(disk, tree=guest_tree_dir, boot="partition", root="partition", fstype="xfs")
    msg = build_fails(capsys, disk, tmp_path, "native backend changes only ext2/3/4", "--backend", "native")
    assert "xfs" in msg
    capsys.readouterr()
    main(["build", str(disk), "-o", str(tmp_path / "out"), "--backend", "native"])
    assert "--backend guestfs" in capsys.readouterr().err
    build_fails(capsys, disk, tmp_path, "xfs labels are limited to 12 bytes")


def test_outdir_not_empty_needs_force(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["build", str(default_disk), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["build", str(default_disk), "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_disk_full(default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OUTDIR on an 8 MiB tmpfs (mounted here: the tests run as root): the kernel + initrd do not fit."""
    small = tmp_path / "small"
    small.mkdir()
    if run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small)], check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        build_fails(capsys, default_disk, small, "no space left on device")
        assert list(small.iterdir()) == []
    finally:
        run(["umount", str(small)], check=False)


def test_unsupported_format_and_bad_label(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vmdk = tmp_path / "d.vmdk"
    vmdk.write_bytes(b"KDMV" + bytes(4096))
    build_fails(capsys, vmdk, tmp_path, "vmdk images are not supported")
    build_fails(capsys, default_disk, tmp_path, "may only hold", "--label", "bad label")
    build_fails(capsys, default_disk, tmp_path, "limited to 16 bytes", "--label", "a-label-longer-than-16")


def test_unreadable_initrd_is_refused_with_its_fix(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default disk's decoy 6.1.0-9 "initrd" is text: neither cpio nor a known compression.
    capsys.readouterr()
    rc = main(["build", str(default_disk), "-o", str(tmp_path / "out"), "--kernel-version", "6.1.0-9-amd64"])
    err = capsys.readouterr().err
    assert rc == 1 and "not a cpio archive nor a known compression" in err and "--no-initrd-check" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_kernel_without_config_is_refused_with_its_fix(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    for cfg in (tree / "boot").glob("config-*"):
        cfg.unlink()
    disk = tmp_path / "noconfig.raw"
    whole_disk(disk, tree=tree, boot="dir", root="partition", kernels=[], decoys=False)
    build_fails(capsys, disk, tmp_path, "config-<version>. is missing, so vmtool cannot tell which drivers")


def test_init_vmtool_cannot_hook_is_refused(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    (tree / "sbin/init").unlink()
    (tree / "sbin/init").write_text("#!/bin/sh\nexec /opt/myinit\n")
    disk = tmp_path / "myinit.raw"
    whole_disk(disk, tree=tree, boot="dir", root="partition", kernels=[], decoys=False)
    capsys.readouterr()
    rc = main(["build", str(disk), "-o", str(tmp_path / "out"), "--agent"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot start its agent on this image's init" in err and "agent-boot" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # Without --agent the same image builds (the init is only recorded).
    assert main(["build", str(disk), "-o", str(tmp_path / "out2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["guest"]["init"]["kind"] == "unknown"
