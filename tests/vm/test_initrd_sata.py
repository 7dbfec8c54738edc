"""A hostonly-style initrd without virtio disk drivers (as dracut makes on a machine with SATA disks):
the build records that it boots from SATA only, says how to fix it, and `vmtool launch` puts the disk
on the SATA bus, where the guest boots (one TCG boot through a real libvirtd)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.fixtures.images import tree_with_host_kernel, whole_disk
from tests.fixtures.libvirtd import overlay
from vmtool.cli.main import main
from vmtool.launch.host import newest_host_kernel
from vmtool.run import run

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

HELLO = "#!/bin/sh\necho \"vmtool-test: root on $(cat /proc/cmdline | tr ' ' '\\n' | grep ^root=) via $(ls /sys/block)\"\n"


def _initrd_without_virtio(src: Path, work: Path) -> bytes:
    """The host's initrd unpacked, its virtio block and PCI modules removed, repacked with gzip."""
    root = work / "initrd"
    root.mkdir()
    data = src.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":
        data = run(["zstd", "-dcq"], input=data).stdout
    else:
        import gzip

        data = gzip.decompress(data)
    run(["cpio", "-idm", "--quiet"], input=data, cwd=root)
    gone = [
        p
        for p in root.rglob("*.ko*")
        if p.name.split(".ko")[0]
        in ("virtio_blk", "virtio_pci", "virtio_pci_modern_dev", "virtio_pci_legacy_dev")
    ]
    assert gone, "the host's initrd has no virtio modules to remove"
    for p in gone:
        p.unlink()
    names = run(["sh", "-c", "find . -mindepth 1 | LC_ALL=C sort"], cwd=root).stdout
    packed = run(["cpio", "-o", "-H", "newc", "--quiet"], input=names, cwd=root).stdout
    return run(["gzip", "-c", "-n"], input=packed).stdout


def test_hostonly_initrd_without_virtio_boots_on_sata(
    guest_tree_dir: Path, libvirt_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _k, initrd, ver = newest_host_kernel()
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    (tree / f"boot/initrd.img-{ver}").write_bytes(_initrd_without_virtio(initrd, tmp_path))
    (tree / "etc/vmtool/rc.d/10-hello").write_text(HELLO)
    (tree / "etc/vmtool/rc.d/10-hello").chmod(0o755)
    disk = tmp_path / "sata.raw"
    whole_disk(disk, tree=tree, table="gpt", boot="dir", root="partition", kernels=[], decoys=False)
    capsys.readouterr()
    assert main(["build", str(disk), "-o", str(tmp_path / "out"), "--json"]) == 0
    out = capsys.readouterr()
    m = json.loads(out.out)
    ird = m["guest"]["initrd"]
    assert ird["archives"] == ["gzip+cpio"] and ird["generator"] == "initramfs-tools"
    assert ird["drivers"]["virtio_blk"] == "missing" and ird["drivers"]["ahci"] == "initrd"
    assert ird["buses"] == ["sata", "ide"]
    assert "cannot use virtio disks" in out.err and "update-initramfs -u" in out.err

    # Rendered for launch: the disk is on the SATA bus.
    build = tmp_path / "out"
    ovl = overlay(build / m["rootfs"]["path"], tmp_path / "root.qcow2")
    report = tmp_path / "report.json"
    console = tmp_path / "console.log"
    rc = run(
        [
            sys.executable,
            "-m",
            "vmtool",
            "launch",
            "--manifest",
            str(build / "manifest.json"),
            "--disk",
            str(ovl),
            "--sandbox",
            str(tmp_path),
            "--uri",
            libvirt_uri,
            "--memory",
            "512",
            "--timeout",
            "600",
            "--report",
            str(report),
            "--console-log",
            str(console),
        ],
        check=False,
        timeout=900,
    ).returncode
    text = console.read_text(errors="replace") if console.exists() else ""
    assert rc == 0, (rc, report.read_text() if report.exists() else "", text[-3000:])
    assert "vmtool-test: root on root=LABEL=cloudimg-rootfs via sda" in text, text[-3000:]
