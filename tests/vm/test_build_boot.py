"""The default build boots: its kernel + initrd find the rootfs by LABEL and run its init (one TCG boot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmtool.run import run

pytestmark = pytest.mark.vm


def test_default_build_boots(default_build: Path) -> None:
    m = json.loads((default_build / "manifest.json").read_text())
    proc = run(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(default_build / m["kernel"]["path"]),
            "-initrd",
            str(default_build / m["initrd"]["path"]),
            "-append",
            m["cmdline"] + " panic=-1",
            "-drive",
            f"file={default_build / m['rootfs']['path']},format=raw,if=virtio,snapshot=on",
        ],
        timeout=300,
        check=False,
    )
    console = proc.stdout.decode(errors="replace")
    assert "vmtool-guest: booted " + m["kernel"]["version"] in console, console[-3000:]
    assert "vmtool-guest: powering off" in console
