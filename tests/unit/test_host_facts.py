"""Host facts: libvirt capabilities parsing and the KVM probe's cache and override."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmtool.errors import LaunchError
from vmtool.launch import host

pytestmark = pytest.mark.unit

CAPS = Path(__file__).resolve().parent.parent / "data" / "domain" / "capabilities.xml"


def test_parse_capabilities() -> None:
    emulator, machines, types, arch = host.parse_capabilities(CAPS.read_text())
    assert emulator == "/usr/bin/qemu-system-x86_64" and arch == "x86_64"
    assert {"pc", "q35", "pc-i440fx-7.2"} <= set(machines)
    assert types == ("qemu", "kvm")
    with pytest.raises(LaunchError, match="cannot run aarch64"):
        host.parse_capabilities(CAPS.read_text(), arch="aarch64")


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMTOOL_KVM", "0")
    p = host.probe_kvm("/usr/bin/qemu-system-x86_64")
    assert not p.usable and "VMTOOL_KVM=0" in p.reason
    monkeypatch.setenv("VMTOOL_KVM", "1")
    assert host.probe_kvm("/usr/bin/qemu-system-x86_64").usable


def test_cached_answer_is_used_only_for_the_same_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not os.path.exists("/dev/kvm") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm node: the probe answers without the cache")
    emulator = "/usr/bin/qemu-system-x86_64"
    if not os.path.exists(emulator):
        pytest.skip("qemu-system-x86_64 is not installed")
    monkeypatch.delenv("VMTOOL_KVM", raising=False)
    monkeypatch.setenv("VMTOOL_CACHE_DIR", str(tmp_path))
    key = host.probe_key(emulator)
    (tmp_path / "kvm-probe.json").write_text(json.dumps({"usable": True, "reason": "cached yes", "key": key}))
    p = host.probe_kvm(emulator)
    assert p.cached and p.usable and p.reason == "cached yes"
    assert "kernel=" + os.uname().release in key
