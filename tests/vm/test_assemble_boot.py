"""The assembled whole-disk image boots under qemu with OVMF (UEFI, TCG) to the guest's init."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.fixtures.cloud import ovmf_paths
from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.run import PIPE, STDOUT, spawn

pytestmark = pytest.mark.vm

BOOT_DEADLINE = 420  # OVMF under TCG: ~20 s here, but CI shares two cores with other boots


def test_whole_disk_boots_with_ovmf(build_copy: Path, tmp_path: Path) -> None:
    fw = ovmf_paths()
    if fw is None:
        pytest.skip("vm tier: no OVMF firmware in /usr/share/OVMF (install the Debian package ovmf)")
    code, vars_template = fw
    assert main(["disk", "assemble", os.fspath(build_copy)]) == 0
    m = manifest_mod.load(build_copy)
    assert m.disk is not None
    vars_ = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(vars_template, vars_)
    log = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-cpu",
        "qemu64",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-net",
        "none",
        "-drive",
        f"if=pflash,format=raw,readonly=on,file={code}",
        "-drive",
        f"if=pflash,format=raw,file={vars_}",
        "-drive",
        f"file={m.resolve(m.disk.path)},format=raw,if=virtio",
    ]
    with open(log, "wb") as lf:
        proc = spawn(argv, stdin=PIPE, stdout=lf, stderr=STDOUT)
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            if b"vmtool-guest: booted" in log.read_bytes():
                break
            time.sleep(0.5)
        text = log.read_bytes().decode(errors="replace")
        assert "vmtool-guest: booted" in text, text[-4000:]
        # It came up through the stub (no GRUB, no direct kernel boot) with the label-based root.
        assert "EFI stub" in text or "EFI v" in text or "efi:" in text
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
