"""Filesystem signatures read by vmtool.image.fs agree with blkid on images made by the real mkfs tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmtool.image.fs import probe
from vmtool.run import run

pytestmark = pytest.mark.integration

MiB = 1 << 20

MAKERS = {
    "ext2": ["mke2fs", "-q", "-F", "-t", "ext2", "-L", "lab-ext2"],
    "ext3": ["mke2fs", "-q", "-F", "-t", "ext3", "-L", "lab-ext3"],
    "ext4": ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "lab-ext4"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-L", "lab-xfs"],
    "swap": ["mkswap", "-L", "lab-swap"],
    "vfat": ["mkfs.vfat", "-n", "LABVFAT"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-L", "lab-btrfs"],
}


@pytest.mark.parametrize("fstype", sorted(MAKERS))
def test_probe_agrees_with_blkid(fstype: str, tmp_path: Path) -> None:
    argv = MAKERS[fstype]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate({"xfs": 320, "btrfs": 160}.get(fstype, 64) * MiB)
    run([*argv, str(img)], env={"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"})
    out = run(["blkid", "-p", "-o", "export", str(img)]).stdout.decode()
    want = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    with open(img, "rb") as f:
        fs = probe(f, 0, os.path.getsize(img))
    assert fs is not None
    assert fs.type == want["TYPE"]
    assert fs.label == want.get("LABEL", "")
    assert fs.uuid.lower() == want["UUID"].lower()
