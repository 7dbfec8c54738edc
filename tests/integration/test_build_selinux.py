"""SELinux-enforcing guests: every file a build writes or replaces carries a security.selinux label, from
the file it replaces or from the guest's file_contexts (an ext4 image carrying real SELinux xattrs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.images import tree_with_host_kernel, whole_disk
from vmtool.cli.main import main
from vmtool.run import run

pytestmark = pytest.mark.integration

FILE_CONTEXTS = """\
/.*\tsystem_u:object_r:default_t:s0
/etc(/.*)?\tsystem_u:object_r:etc_t:s0
/etc/systemd/system(/.*)?\tsystem_u:object_r:systemd_unit_file_t:s0
/usr/lib/vmtool(/.*)?\t--\tsystem_u:object_r:bin_t:s0
/root/\\.ssh(/.*)?\tsystem_u:object_r:ssh_home_t:s0
"""
KEPT = b"unconfined_u:object_r:ssh_home_t:s0:c1"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000 t@vmtool\n"


def _selinux_disk(guest_tree_dir: Path, tmp_path: Path, *, file_contexts: bool = True) -> Path:
    tree = tree_with_host_kernel(guest_tree_dir, tmp_path / "tree")
    (tree / "etc/selinux/targeted/contexts/files").mkdir(parents=True)
    (tree / "etc/selinux/config").write_text("# SELinux\nSELINUX=enforcing\nSELINUXTYPE=targeted\n")
    if file_contexts:
        (tree / "etc/selinux/targeted/contexts/files/file_contexts").write_text(FILE_CONTEXTS)
    ssh = tree / "root/.ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text("ssh-ed25519 AAAAexisting old@host\n")
    os.setxattr(ssh / "authorized_keys", "security.selinux", KEPT + b"\0")
    disk = tmp_path / "selinux.raw"
    whole_disk(
        disk, tree=tree, table="gpt", boot="dir", root="partition", fstype="ext4", kernels=[], decoys=False
    )
    return disk


def _label(rootfs: Path, path: str) -> bytes:
    out = rootfs.parent / ".label"
    run(["debugfs", "-R", f"ea_get -f {out} {path} security.selinux", os.fspath(rootfs)])
    data = out.read_bytes()
    out.unlink()
    return data


def test_every_written_file_is_labelled(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = _selinux_disk(guest_tree_dir, tmp_path)
    key = tmp_path / "k.pub"
    key.write_text(KEY)
    capsys.readouterr()
    rc = main(["build", str(disk), "-o", str(tmp_path / "out"), "--agent", "--ssh-key", str(key), "--json"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(capsys.readouterr().out)
    rootfs = tmp_path / "out/rootfs.img"
    # Replaced: keeps the label of the file it replaces. New: the guest's policy's label for its path.
    assert _label(rootfs, "/root/.ssh/authorized_keys") == KEPT + b"\0"
    assert _label(rootfs, "/etc/fstab") == b"system_u:object_r:etc_t:s0\0"
    assert _label(rootfs, "/usr/lib/vmtool/agent.sh") == b"system_u:object_r:bin_t:s0\0"
    assert _label(rootfs, "/etc/vmtool/agent.conf") == b"system_u:object_r:etc_t:s0\0"
    said = m["guest"]["selinux"]
    assert any(
        s.startswith("/root/.ssh/authorized_keys: ") and "kept from the file it replaces" in s for s in said
    )
    assert any(s == "/etc/fstab: system_u:object_r:etc_t:s0 (from file_contexts)" for s in said)
    assert len(said) == len({s.split(": ")[0] for s in said}) >= 6  # one line per file written
    run(["e2fsck", "-fn", os.fspath(rootfs)])


def test_policy_without_file_contexts_is_refused(
    guest_tree_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = _selinux_disk(guest_tree_dir, tmp_path, file_contexts=False)
    capsys.readouterr()
    assert main(["build", str(disk), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "has no /etc/selinux/targeted/contexts/files/file_contexts" in err and "SELINUX=disabled" in err
    assert "Traceback" not in err
    assert (
        not (tmp_path / "out").exists()
        and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    )
