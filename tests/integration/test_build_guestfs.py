"""The guestfs backend on an xfs root (one appliance launch per build; ~30-60 s each under TCG)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.fixtures.images import whole_disk
from vmtool.cli.main import main
from vmtool.image.fs import probe
from vmtool.launch.host import newest_host_kernel

pytestmark = pytest.mark.integration

guestfs = pytest.importorskip(
    "guestfs", reason="the libguestfs Python binding (python3-guestfs) is not installed"
)


def _data(img: Path) -> bytes:
    """The allocated bytes of a sparse file, concatenated (enough to find small files written into it)."""
    out = bytearray()
    fd = os.open(img, os.O_RDONLY)
    try:
        pos, size = 0, os.fstat(fd).st_size
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out += os.pread(fd, h - d, d)
            pos = h
    finally:
        os.close(fd)
    return bytes(out)


def test_xfs_root_on_lvm_through_guestfs(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "xfs.qcow2"
    facts = whole_disk(
        disk,
        tree=guest_tree_dir,
        table="gpt",
        boot="partition",
        root="lvm",
        fstype="xfs",
        fstab_style="uuid",
        fmt="qcow2",
    )
    assert main(["inspect", str(disk), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["root"] == "/dev/vg0/lv_root" and "guestfs" in d["root_reason"]
    assert d["newest_kernel"] == newest_host_kernel()[2]  # read natively from the ext4 /boot partition

    key = tmp_path / "k.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIXfsKey xfs@example\n")
    out = tmp_path / "out"
    rc = main(["build", str(disk), "-o", str(out), "--label", "img-rootfs", "--ssh-key", str(key), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    m = json.loads(cap.out)
    assert m["build"]["backend"] == "guestfs" and "xfs" in m["build"]["backend_reason"]
    assert m["rootfs"]["fstype"] == "xfs" and m["rootfs"]["label"] == "img-rootfs"
    rootfs = out / "rootfs.img"
    with open(rootfs, "rb") as f:
        fs = probe(f, 0, os.path.getsize(rootfs))
    assert (
        fs is not None and fs.type == "xfs" and fs.label == "img-rootfs" and fs.uuid == facts["root"]["uuid"]
    )
    assert m["fstab"]["before"] == facts["fstab"]
    assert "LABEL=img-rootfs\t/\txfs\tdefaults\t0 1" in m["fstab"]["after"].splitlines()
    data = _data(rootfs)
    assert m["fstab"]["after"].encode() in data
    assert key.read_bytes() in data
    k, _i, ver = newest_host_kernel()
    assert m["kernel"]["version"] == ver
    assert (
        hashlib.sha256((out / m["kernel"]["path"]).read_bytes()).hexdigest()
        == hashlib.sha256(k.read_bytes()).hexdigest()
    )
    assert m["rootfs"]["allocated_size"] < m["rootfs"]["virtual_size"] / 4
