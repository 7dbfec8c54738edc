"""Frozen Manifest and BuildOptions: changed only by replace(), choices checked when they are made."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest

from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.errors import VmtoolError
from vmtool.image.options import Backend, BuildOptions
from vmtool.manifest import BootFile, DiskInfo, ImageFormat, Manifest, RootfsInfo, SourceInfo
from vmtool.queue.agent import AgentMode

pytestmark = pytest.mark.unit


def _manifest(base: Path) -> Manifest:
    return Manifest(
        source=SourceInfo(path="/src.img", format="raw", size=1 << 20, sha256="a" * 64),
        rootfs=RootfsInfo("rootfs.img", "raw", "ext4", "root", "u-u-i-d", 1 << 20, 4096, "b" * 64),
        kernel=BootFile("vmlinuz-6.1", "6.1", "c" * 64),
        initrd=BootFile("initrd.img-6.1", "6.1", "d" * 64),
        cmdline="root=LABEL=root ro console=ttyS0",
        fstab_before=None,
        fstab_after="LABEL=root / ext4 defaults 0 1\n",
        agent={"mode": "relay", "version": "1"},
        extra={"build": {"backend": "native", "notes": ["a", {"b": 1}]}},
        base_dir=base,
    )


def test_manifest_and_its_parts_are_frozen(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.cmdline = "init=/bin/sh"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.rootfs.sha256 = "0" * 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.kernel.path = "/etc/shadow"  # type: ignore[misc]
    with pytest.raises(TypeError, match="frozen"):
        m.extra["build"]["backend"] = "guestfs"
    with pytest.raises(TypeError, match="frozen"):
        m.agent["mode"] = "direct"  # type: ignore[index]
    with pytest.raises(TypeError, match="frozen"):
        m.extra.update({"x": 1})  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        m.extra["build"]["notes"].append("c")
    assert m.to_dict()["build"]["backend"] == "native"


def test_a_callers_dict_cannot_change_the_manifest_later(tmp_path: Path) -> None:
    agent = {"mode": "relay", "version": "1"}
    m = dataclasses.replace(_manifest(tmp_path), agent=agent)
    agent["mode"] = "direct"
    assert m.agent is not None and m.agent["mode"] == "relay"


def test_replace_makes_a_new_manifest_and_leaves_the_old_one(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    disk = DiskInfo("disk.img", "raw", "uefi", 2 << 20, "e" * 64, boot="uki")
    m2 = dataclasses.replace(m, disk=disk)
    assert m.disk is None and m2.disk == disk and m2.base_dir == tmp_path
    m3 = dataclasses.replace(m2, rootfs=dataclasses.replace(m2.rootfs, format="qcow2"))
    assert m2.rootfs.format == "raw" and m3.rootfs.format == "qcow2" and m3.disk == disk


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    path = tmp_path / "manifest.json"
    m.save(path)
    again = manifest_mod.load(path)
    assert again == m and again.base_dir == tmp_path
    data = json.loads(path.read_text())
    assert data["agent"] == {"mode": "relay", "version": "1"}
    assert data["build"] == {"backend": "native", "notes": ["a", {"b": 1}]}
    # The plain JSON a caller gets can be edited freely; the manifest stays as it was.
    d = again.to_dict()
    d["build"]["backend"] = "guestfs"
    d["build"]["notes"].append("c")
    assert again.extra["build"]["backend"] == "native" and len(again.extra["build"]["notes"]) == 2


def test_copies_and_pickles_of_a_frozen_manifest_are_equal(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    for other in (copy.copy(m), copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other == m and other.to_dict() == m.to_dict()
    assert hash(m) == hash(copy.deepcopy(m))


def test_build_options_are_frozen_and_take_enum_values(tmp_path: Path) -> None:
    o = BuildOptions(
        source=tmp_path / "disk.img",  # type: ignore[arg-type]
        outdir=str(tmp_path / "out"),  # type: ignore[arg-type]
        format="qcow2",  # type: ignore[arg-type]
        rootfs_format="qcow2",  # type: ignore[arg-type]
        backend="native",  # type: ignore[arg-type]
        agent="direct",  # type: ignore[arg-type]
        disk_format="qcow2",  # type: ignore[arg-type]
        ssh_keys=[tmp_path / "k.pub"],  # type: ignore[arg-type]
    )
    assert o.format is ImageFormat.QCOW2 and o.rootfs_format is ImageFormat.QCOW2
    assert o.backend is Backend.NATIVE and o.agent is AgentMode.DIRECT and o.disk_format is ImageFormat.QCOW2
    assert o.outdir == tmp_path / "out" and o.ssh_keys == (tmp_path / "k.pub",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.backend = Backend.GUESTFS  # type: ignore[misc]
    d = BuildOptions(source=tmp_path, outdir=tmp_path / "out")
    assert (d.format, d.rootfs_format, d.backend, d.agent) == (None, ImageFormat.RAW, Backend.AUTO, None)
    assert dataclasses.replace(d, backend=Backend.GUESTFS).backend is Backend.GUESTFS


@pytest.mark.parametrize(
    ("field", "option", "valid"),
    [
        ("format", "--format", "raw, qcow2"),
        ("rootfs_format", "--rootfs-format", "raw, qcow2"),
        ("backend", "--backend", "auto, native, guestfs"),
        ("agent", "--agent", "relay, direct"),
        ("disk_format", "--disk-format", "raw, qcow2"),
    ],
)
def test_a_bad_choice_is_refused_when_the_options_are_made(
    tmp_path: Path, field: str, option: str, valid: str
) -> None:
    with pytest.raises(VmtoolError) as e:
        BuildOptions(source=tmp_path, outdir=tmp_path / "out", **{field: "vhdx"})
    assert e.value.message == f"unknown {option} 'vhdx'"
    assert e.value.hint == f"use one of: {valid}"
    # replace() runs the same check.
    with pytest.raises(VmtoolError, match=f"unknown {option}"):
        dataclasses.replace(BuildOptions(source=tmp_path, outdir=tmp_path / "out"), **{field: "vhdx"})


def test_a_bad_label_is_refused_when_the_options_are_made(tmp_path: Path) -> None:
    with pytest.raises(VmtoolError, match="may only hold"):
        BuildOptions(source=tmp_path, outdir=tmp_path / "out", label="a b")


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--backend", "fast"], "unknown --backend 'fast'"),
        (["--rootfs-format", "vmdk"], "unknown --rootfs-format 'vmdk'"),
        (["--format", "vdi"], "unknown --format 'vdi'"),
        (["--agent", "ssh"], "unknown --agent 'ssh'"),
        (["--disk", "--disk-format", "vhd"], "unknown --disk-format 'vhd'"),
    ],
)
def test_cli_reports_a_bad_choice_cleanly_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    out = tmp_path / "out"
    assert main(["build", os.fspath(disk), "-o", os.fspath(out), *args]) == 1
    err = capsys.readouterr().err
    assert expect in err and "hint: use one of:" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


@pytest.mark.parametrize(
    "command",
    [
        ["disk", "assemble", "{m}"],
        ["publish", "openstack", "{m}", "--endpoint", "http://127.0.0.1:9"],
        ["publish", "ec2", "{m}", "--bucket", "b", "--endpoint-url", "http://127.0.0.1:9"],
    ],
)
def test_cli_given_a_directory_as_manifest_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    build = tmp_path / "build"
    build.mkdir()
    argv = [a.replace("{m}", os.fspath(build)) for a in command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"manifest {build} is a directory" in err and "hint:" in err
    assert "Traceback" not in err and "internal error" not in err
    # With a manifest.json inside, the hint names it.
    _manifest(build).save(build / "manifest.json")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"hint: give the manifest file in it: {build / 'manifest.json'}" in err
    assert "Traceback" not in err


def test_load_refuses_what_is_not_a_regular_manifest_file(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)  # would block a plain open(): it must be refused without waiting for a writer
    with pytest.raises(VmtoolError, match="not a regular file"):
        manifest_mod.load(fifo)
    with pytest.raises(VmtoolError, match="does not exist") as e:
        manifest_mod.load(tmp_path / "missing.json")
    assert e.value.hint
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(manifest_mod.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(VmtoolError, match="too large"):
        manifest_mod.load(big)
