"""The real KVM probe on this host: it must give an answer that can be trusted, and cache it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmtool.launch import host

pytestmark = pytest.mark.vm


def test_probe_boots_a_guest_or_explains(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VMTOOL_KVM", raising=False)
    monkeypatch.setenv("VMTOOL_CACHE_DIR", str(tmp_path))
    emulator = "/usr/bin/qemu-system-x86_64"
    t0 = time.monotonic()
    first = host.probe_kvm(emulator, refresh=True)
    took = time.monotonic() - t0
    assert took < host.PROBE_DEADLINE + 10
    assert first.reason and not first.cached
    if not os.path.exists("/dev/kvm"):
        assert not first.usable and "does not exist" in first.reason
        return
    cached = json.loads((tmp_path / "kvm-probe.json").read_text())
    assert cached == {"usable": first.usable, "reason": first.reason, "key": host.probe_key(emulator)}
    again = host.probe_kvm(emulator)
    assert again.cached and again.usable == first.usable
    if not first.usable:
        # the reason names what happened: qemu's own error, or the hang
        assert "kvm" in first.reason


def test_boot_sector_probe_guest_for_nodes_without_a_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A node with /dev/kvm but no kernel in /boot (a container) probes with a boot sector instead.
    # Under TCG it must print its mark (so the payload is right); under KVM it must agree with the
    # kernel-booting probe on this host.
    emulator = "/usr/bin/qemu-system-x86_64"
    sector = host.boot_sector()
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa"
    ok, reason = host._run_probe(emulator, None, 30, accel="tcg")
    assert ok, reason
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        monkeypatch.setenv("VMTOOL_CACHE_DIR", str(tmp_path))
        monkeypatch.delenv("VMTOOL_KVM", raising=False)
        with_kernel = host.probe_kvm(emulator, refresh=True)
        usable, why = host._run_probe(emulator, None, host.PROBE_DEADLINE)
        assert usable == with_kernel.usable, (why, with_kernel.reason)
