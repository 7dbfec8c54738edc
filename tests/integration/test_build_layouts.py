"""`vmtool build` and `vmtool inspect` on the layouts installers make (real sfdisk, mke2fs, LVM, qemu-img)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import tree_with_host_kernel, whole_disk
from vmtool.cli.main import main
from vmtool.launch.host import newest_host_kernel
from vmtool.run import run

pytestmark = pytest.mark.integration


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(["build", *argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    data: dict[str, Any] = json.loads(out.out)
    return data


def debugfs_cat(img: Path, path: str) -> bytes:
    return run(["debugfs", "-R", f"cat {path}", os.fspath(img)]).stdout


def same_files(rootfs: Path, tree: Path, work: Path) -> None:
    """Every regular file of the tree the disk was made from is in the rootfs, byte for byte."""
    dump = work / "rdump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", os.fspath(rootfs)])
    checked = 0
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            src = Path(dirpath) / name
            rel = src.relative_to(tree)
            if src.is_symlink() or not src.is_file() or str(rel) == "etc/fstab":
                continue
            assert (dump / rel).read_bytes() == src.read_bytes(), rel
            checked += 1
    assert checked > 3


def check_ext_output(
    out: Path,
    m: dict[str, Any],
    facts: dict[str, Any],
    *,
    label: str = "cloudimg-rootfs",
    tree: Path | None = None,
) -> None:
    rootfs = out / m["rootfs"]["path"]
    if tree is not None and m["rootfs"]["format"] == "raw":
        same_files(rootfs, tree, out.parent)
    assert m["rootfs"]["fstype"] == facts["fstype"]
    assert run(["e2label", os.fspath(rootfs)]).stdout.decode().strip() == label
    assert m["rootfs"]["label"] == label
    assert m["rootfs"]["uuid"] == facts["root"]["uuid"]
    # e2fsck finds the filesystem clean after vmtool's debugfs edits
    run(["e2fsck", "-fn", os.fspath(rootfs)])
    fstab_in = debugfs_cat(rootfs, "/etc/fstab").decode()
    assert fstab_in == m["fstab"]["after"]
    assert m["fstab"]["before"] == facts["fstab"]
    active = [ln for ln in fstab_in.splitlines() if ln and not ln.startswith("#")]
    assert active[0] == f"LABEL={label}\t/\t{facts['fstype']}\tdefaults\t0 1"
    assert not any(ln.split()[1] in ("/boot", "swap") for ln in active)
    k, i, ver = newest_host_kernel()
    assert m["kernel"]["version"] == ver and m["initrd"]["version"] == ver
    assert sha(out / m["kernel"]["path"]) == sha(k) == m["kernel"]["sha256"]
    assert sha(out / m["initrd"]["path"]) == sha(i) == m["initrd"]["sha256"]
    assert m["cmdline"] == f"root=LABEL={label} ro console=ttyS0"
    # sparse: no more allocated than the filesystem's used blocks (+10 %, + 1 MiB of slack)
    if m["rootfs"]["format"] == "raw":
        assert m["rootfs"]["allocated_size"] <= used_bytes(rootfs) * 1.1 + (1 << 20)
        assert m["rootfs"]["allocated_size"] < m["rootfs"]["virtual_size"]


def used_bytes(img: Path) -> int:
    hdr = run(["dumpe2fs", "-h", os.fspath(img)]).stdout.decode()
    f = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in hdr.splitlines())}
    return (int(f["Block count"]) - int(f["Free blocks"])) * int(f["Block size"])


def test_default_build(default_build: Path, default_disk_facts: dict[str, Any]) -> None:
    m = json.loads((default_build / "manifest.json").read_text())
    check_ext_output(default_build, m, default_disk_facts)
    assert m["build"]["backend"] == "native" and m["build"]["root"] == "/dev/vg0/lv_root"
    assert m["build"]["boot"] == "/dev/sda1"
    assert sorted(p.name for p in default_build.iterdir()) == sorted(
        ["manifest.json", "rootfs.img", m["kernel"]["path"], m["initrd"]["path"]]
    )
    rootfs = default_build / "rootfs.img"
    assert m["rootfs"]["sha256"] == sha(rootfs)
    assert m["rootfs"]["allocated_size"] == os.stat(rootfs).st_blocks * 512


def test_inspect_default_disk(
    default_disk: Path, default_disk_facts: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(default_disk), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["partition_table"]["kind"] == "gpt"
    assert [p["number"] for p in d["partition_table"]["partitions"]] == [1, 2]
    assert d["volume_groups"][0]["name"] == "vg0"
    assert [lv["name"] for lv in d["volume_groups"][0]["lvs"]] == ["lv_swap", "lv_root"]
    fs = {v["name"]: v for v in d["filesystems"]}
    assert fs["/dev/vg0/lv_root"]["uuid"] == default_disk_facts["root"]["uuid"]
    assert fs["/dev/vg0/lv_root"]["role"] == "root" and fs["/dev/sda1"]["role"] == "boot"
    assert fs["/dev/vg0/lv_swap"]["fstype"] == "swap"
    assert d["newest_kernel"] == newest_host_kernel()[2]
    assert {k["version"] for k in d["kernels"]} == {
        newest_host_kernel()[2],
        "6.1.0-9-amd64",
        "5.10.0-28-amd64",
    }
    assert main(["inspect", str(default_disk)]) == 0
    text = capsys.readouterr().out
    assert "root: /dev/vg0/lv_root" in text and "(newest)" in text and "/dev/sda1" in text


LAYOUTS = [
    dict(table="mbr", boot="dir", root="partition", fstab_style="uuid"),
    dict(table="mbr", boot="partition", root="lvm", fstab_style="label"),
    dict(table="gpt", boot="dir", root="lvm", fstab_style="uuid", split_root=True),
    dict(table="gpt", boot="partition", root="partition", fstab_style="label", fstype="ext3"),
    dict(table="gpt", boot="partition", root="lvm", fstab_style="mapper", swap_lv_first=False),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_build_layouts(
    layout: dict[str, Any], guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = whole_disk(tmp_path / "disk.raw", tree=guest_tree_dir, **layout)
    m = build(capsys, str(tmp_path / "disk.raw"), "-o", str(tmp_path / "out"))
    check_ext_output(tmp_path / "out", m, facts, tree=guest_tree_dir)
    want_root = (
        f"/dev/{facts['vg']}/lv_root" if layout["root"] == "lvm" else f"/dev/sda{facts['root']['partition']}"
    )
    assert m["build"]["root"] == want_root
    assert (m["build"]["boot"] is None) == (layout["boot"] == "dir")


def test_qcow2_source_rootfs_qcow2_and_ssh_keys(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = whole_disk(
        tmp_path / "disk.qcow2", tree=guest_tree_dir, table="gpt", boot="partition", root="lvm", fmt="qcow2"
    )
    k1 = tmp_path / "a.pub"
    k1.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 one@example\n")
    k2 = tmp_path / "b.pub"
    k2.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQKey2 two@example")
    m = build(
        capsys,
        str(tmp_path / "disk.qcow2"),
        "-o",
        str(tmp_path / "out"),
        "--rootfs-format",
        "qcow2",
        "--ssh-key",
        str(k1),
        "--ssh-key",
        str(k2),
        "--label",
        "myroot",
    )
    out = tmp_path / "out"
    assert m["source"]["format"] == "qcow2" and m["rootfs"]["format"] == "qcow2"
    assert m["rootfs"]["path"] == "rootfs.qcow2" and not (out / "rootfs.img").exists()
    assert not any(p.name.startswith(".") for p in out.iterdir())
    info = json.loads(
        run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(out / "rootfs.qcow2")]).stdout
    )
    assert info["virtual-size"] == m["rootfs"]["virtual_size"]
    raw = tmp_path / "check.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out / "rootfs.qcow2"), str(raw)])
    assert run(["e2label", str(raw)]).stdout.decode().strip() == "myroot"
    keys = debugfs_cat(raw, "/root/.ssh/authorized_keys").decode()
    assert keys == k1.read_text() + k2.read_text() + "\n"
    ls = run(["debugfs", "-R", "ls -p /root/.ssh", str(raw)]).stdout.decode()
    assert "/100600/0/0/authorized_keys/" in ls
    st = run(["debugfs", "-R", "stat /root/.ssh", str(raw)]).stdout.decode()
    assert "Mode:  0700" in st
    assert m["cmdline"] == "root=LABEL=myroot ro console=ttyS0"
    assert m["rootfs"]["uuid"] == facts["root"]["uuid"]
    assert m["source"]["sha256"] == sha(tmp_path / "disk.qcow2")


def test_kernel_version_selects_an_older_kernel(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The decoy's "initrd" is a line of text: the initrd check is turned off to select it.
    m = build(
        capsys,
        str(default_disk),
        "-o",
        str(tmp_path / "out"),
        "--kernel-version",
        "6.1.0-9-amd64",
        "--no-initrd-check",
    )
    assert m["kernel"]["path"] == "vmlinuz-6.1.0-9-amd64"
    assert m["guest"]["initrd"] is None
    assert (tmp_path / "out/vmlinuz-6.1.0-9-amd64").read_bytes() == b"decoy kernel 6.1.0-9-amd64\n"


def test_kernel_symlinks_resolved_inside_the_guest(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/boot/vmlinuz-7.0.0-1-amd64 -> vmlinuz-6.1.0-9-amd64 (relative, inside /boot): followed in the guest."""
    whole_disk(
        tmp_path / "disk.raw",
        tree=guest_tree_dir,
        boot="partition",
        root="partition",
        boot_symlinks={
            "vmlinuz-7.0.0-1-amd64": "/boot/vmlinuz-6.1.0-9-amd64",
            "initrd.img-7.0.0-1-amd64": "initrd.img-6.1.0-9-amd64",
        },
    )
    m = build(capsys, str(tmp_path / "disk.raw"), "-o", str(tmp_path / "out"), "--no-initrd-check")
    assert m["kernel"]["version"] == "7.0.0-1-amd64"
    assert (tmp_path / "out/vmlinuz-7.0.0-1-amd64").read_bytes() == b"decoy kernel 6.1.0-9-amd64\n"
    assert not (tmp_path / "out/vmlinuz-7.0.0-1-amd64").is_symlink()


def test_missing_fstab_is_created(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole_disk(tmp_path / "disk.raw", tree=guest_tree_dir, boot="dir", root="partition", fstab=False)
    m = build(capsys, str(tmp_path / "disk.raw"), "-o", str(tmp_path / "out"))
    assert m["fstab"]["before"] is None
    text = debugfs_cat(tmp_path / "out/rootfs.img", "/etc/fstab").decode()
    assert "LABEL=cloudimg-rootfs\t/\text4\tdefaults\t0 1" in text.splitlines()


def test_bare_filesystem_disk(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that is one filesystem with no partition table (root with /boot inside)."""
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(tmp_path / "fs.img"), "96M"])
    m = build(capsys, str(tmp_path / "fs.img"), "-o", str(tmp_path / "out"))
    assert m["build"]["root"] == "/dev/sda" and m["kernel"]["version"] == newest_host_kernel()[2]


def test_sparse_extraction_keeps_holes(
    default_disk: Path, default_disk_facts: dict[str, Any], default_build: Path
) -> None:
    """Allocated bytes of rootfs.img stay close to the allocated bytes of the LV's region in the source."""
    from vmtool.image.extract import _data_runs

    off, n = default_disk_facts["root"]["offset"], default_disk_facts["root"]["size"]
    fd = os.open(default_disk, os.O_RDONLY)
    try:
        src_data = sum(length for _, length in _data_runs(fd, off, off + n))
    finally:
        os.close(fd)
    out_alloc = os.stat(default_build / "rootfs.img").st_blocks * 512
    assert out_alloc <= src_data * 1.1 + (1 << 20)


def test_the_initrd_report_is_remembered_by_content(
    capsys: pytest.CaptureFixture[str], default_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebuild with the same initrd, kernel config and root filesystem type takes the report it made
    # before (the check unpacks the whole initrd); an entry that is not a report is made again.
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMTOOL_CACHE_DIR", os.fspath(cache))
    first = build(capsys, str(default_disk), "-o", str(tmp_path / "a"))["guest"]["initrd"]
    assert first["buses"][0] == "virtio" and first["archives"]
    entries = list((cache / "initrd").iterdir())
    assert len(entries) == 1 and json.loads(entries[0].read_text()) == first
    # another label and keys: the same initrd
    second = build(capsys, str(default_disk), "-o", str(tmp_path / "b"), "--label", "other")
    assert second["guest"]["initrd"] == first
    assert list((cache / "initrd").iterdir()) == entries
    entries[0].write_text('{"buses": ["floppy"]}')
    third = build(capsys, str(default_disk), "-o", str(tmp_path / "c"))["guest"]["initrd"]
    assert third == first and json.loads(entries[0].read_text()) == first
