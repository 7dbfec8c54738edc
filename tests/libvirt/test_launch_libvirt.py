"""`vmtool domain render` and `vmtool launch` against a real libvirtd, without booting a guest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from tests.fixtures.libvirtd import FakeSlot
from vmtool.cli.main import main
from vmtool.launch.host import host_facts
from vmtool.run import run

pytestmark = pytest.mark.libvirt


def _overlay(tmp: Path) -> Path:
    p = tmp / "root.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"])
    return p


def test_render_with_host_facts_from_libvirt(libvirt_uri: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    facts = host_facts(libvirt_uri)
    assert Path(facts.emulator).exists() and "pc" in facts.machines and "qemu" in facts.domain_types
    rc = main(["domain", "render", "--uri", libvirt_uri, "--disk", str(_overlay(tmp_path)), "--sandbox",
               str(tmp_path), "--cpus", "1", "--memory", "256", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    root = etree.fromstring(data["xml"].encode())
    assert root.get("type") == ("kvm" if facts.kvm else "qemu")
    assert root.findtext("devices/emulator") == facts.emulator
    assert data["accel"] == facts.accel and data["kvm_reason"] == facts.kvm_reason


def test_libvirt_refusal_leaves_nothing(libvirt_uri: str, tmp_path: Path, fake_slot: FakeSlot,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    name = f"vmtool-refused-{fake_slot.name[-6:]}"
    rc = main(["launch", "--manifest", str(_fake_manifest(tmp_path)), "--disk", str(_overlay(tmp_path)),
               "--sandbox", str(tmp_path), "--uri", libvirt_uri, "--network", "no-such-network", "--name", name,
               "--cgroup-parent", fake_slot.rel])
    err = capsys.readouterr().err
    assert rc == 1 and "vmtool: error: libvirt could not start the domain" in err and "no-such-network" in err
    assert "Traceback" not in err
    assert fake_slot.children() == []
    names = run(["virsh", "-c", libvirt_uri, "list", "--all", "--name"]).stdout.decode().split()
    assert name not in names


def test_cgroup_failure_is_exact_and_no_cgroup_skips_it(libvirt_uri: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    rc = main(["launch", "--manifest", str(_fake_manifest(tmp_path)), "--disk", str(_overlay(tmp_path)),
               "--sandbox", str(tmp_path), "--uri", libvirt_uri, "--cgroup-parent", "/vmtool-no-such-slot",
               "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 1 and "the slot's cgroup" in err and "/vmtool-no-such-slot" in err and "--no-cgroup" in err
    # the report exists even so (a job's output files must), saying why
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "error" and data["exit_code"] == 1 and "/vmtool-no-such-slot" in data["detail"]


def _fake_manifest(d: Path) -> Path:
    """A manifest naming stand-in boot files: libvirt refuses the domain before anything boots them."""
    (d / "vmlinuz").write_bytes(b"k")
    (d / "initrd.img").write_bytes(b"i")
    data = {
        "schema": "vmtool.manifest/1",
        "source": {"path": "root.img", "format": "raw", "size": 1, "sha256": ""},
        "rootfs": {"path": "root.img", "format": "raw", "fstype": "ext4", "label": "cloudimg-rootfs", "uuid": "",
                   "virtual_size": 1, "allocated_size": 1, "sha256": ""},
        "kernel": {"path": "vmlinuz", "version": "6.1.0", "sha256": ""},
        "initrd": {"path": "initrd.img", "version": "6.1.0", "sha256": ""},
        "cmdline": "root=LABEL=cloudimg-rootfs ro quiet",
        "fstab": {"before": None, "after": ""},
    }
    (d / "manifest.json").write_text(json.dumps(data))
    return d / "manifest.json"
