"""Real images from `qemu-img create`, good and hostile, through every caller of vmtool.image.formats.

Each hostile image gives one clear error with a hint in each path: a build's source, a stage base, a
disk in a job's domain XML (removed with a warning) or given as its overlay, and a queue worker's VM disk.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmtool.cli.main import main
from vmtool.domain.policy import RenderOptions, render
from vmtool.domain.slot import Slot
from vmtool.errors import DomainError, QueueError
from vmtool.image import formats
from vmtool.launch.host import HostFacts
from vmtool.queue.vms import resolve_image
from vmtool.run import run

pytestmark = pytest.mark.integration

MiB = 1 << 20
SECRET = ["--object", "secret,id=k,data=not-a-real-key"]


def qemu_img(*args: str) -> None:
    run(["qemu-img", *args])


@dataclass(frozen=True)
class Case:
    name: str
    needle: str  # a regular expression the one error line matches


def make_images(d: Path) -> dict[str, Path]:
    """Every format qemu-img writes, and the hostile images; name -> path."""
    out: dict[str, Path] = {}
    for fmt in ("qcow2", "raw", "qed", "vmdk", "vpc", "vhdx", "vdi", "parallels"):
        p = d / f"disk.{fmt}"
        qemu_img("create", "-q", "-f", fmt, str(p), "1M")
        out[fmt] = p
    out["luks"] = d / "disk.luks"
    qemu_img("create", "-q", "-f", "luks", *SECRET, "-o", "key-secret=k,iter-time=10", str(out["luks"]), "1M")
    out["qcow2-encrypted"] = d / "encrypted.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *SECRET, "-o", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
             str(out["qcow2-encrypted"]), "1M")
    # A monolithicFlat vmdk is a text descriptor naming its extent: rewritten to name /etc/shadow.
    flat = d / "flat.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "1M")
    text = re.sub(r'FLAT "[^"]*"', 'FLAT "/etc/shadow"', flat.read_text())
    assert "/etc/shadow" in text
    out["vmdk-shadow"] = d / "shadow.vmdk"
    out["vmdk-shadow"].write_text(text)
    out["qcow2-data-file"] = d / "datafile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.bin'}", str(out["qcow2-data-file"]), "1M")
    out["qcow2-json-backing"] = d / "json.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b",
             'json:{"driver":"file","filename":"/etc/shadow"}', str(out["qcow2-json-backing"]), "1M")
    out["qcow2-nbd-backing"] = d / "nbd.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", "nbd:127.0.0.1:10809",
             str(out["qcow2-nbd-backing"]), "1M")
    out["qcow2-shadow-backing"] = d / "shadow.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(out["qcow2-shadow-backing"]),
             "1M")
    # Bit 20 of the incompatible features: nothing qemu knows, so nothing vmtool may open.
    unknown = d / "unknown-features.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(unknown), "1M")
    with open(unknown, "r+b") as f:
        f.seek(72)
        f.write((1 << 20).to_bytes(8, "big"))
    out["qcow2-unknown-features"] = unknown
    truncated = d / "truncated.qcow2"
    truncated.write_bytes(out["qcow2"].read_bytes()[:64])
    out["qcow2-truncated-header"] = truncated
    return out


HOSTILE = [
    Case("vmdk-shadow", r"vmdk images are not supported \(its descriptor names the extent files '/etc/shadow'"),
    Case("qcow2-data-file", r"has an external data file \('.*data.bin'\), which vmtool never follows"),
    Case("qcow2-json-backing", r"names the backing file 'json:\{.*, a json: pseudo-filename"),
    Case("qcow2-nbd-backing", r"names the backing file 'nbd:127.0.0.1:10809', a nbd: pseudo-filename"),
    Case("qcow2-shadow-backing", r"has a backing file \('/etc/shadow'\)|backed by '/etc/shadow'"),
    Case("luks", r"LUKS-encrypted images are not supported"),
    Case("qcow2-encrypted", r"is an encrypted qcow2 image"),
    Case("qcow2-unknown-features", r"incompatible features qemu does not know \(bits 0x100000\)"),
    Case("qcow2-truncated-header", r"damaged qcow2 image: its qcow2 header is truncated \(64 of 72 bytes\)"),
    Case("qed", "qed images are not supported"),
    Case("vmdk", "vmdk images are not supported"),
    Case("vpc", "vhd images are not supported"),
    Case("vhdx", "vhdx images are not supported"),
    Case("vdi", "vdi images are not supported"),
    Case("parallels", "parallels images are not supported"),
]
IDS = [c.name for c in HOSTILE]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("formats"))


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("vmtool: error: ") and lines[1].startswith("hint: "), err
    return lines[0]


def test_good_images_and_what_qemu_img_says(images: dict[str, Path]) -> None:
    for fmt in ("raw", "qcow2"):
        info = formats.check(images[fmt], None, formats.Policy(qemu_check=True))
        assert (info.format, info.virtual_size) == (fmt, MiB)
        q = formats.qemu_img_info(images[fmt], fmt)
        assert (q.format, q.virtual_size, q.backing, q.data_file, q.encrypted) == (fmt, MiB, None, None, False)
    q = formats.qemu_img_info(images["qcow2-data-file"], "qcow2")  # qemu's view agrees with the header's
    assert q.data_file == str(images["qcow2-data-file"].parent / "data.bin")
    assert formats.qemu_img_info(images["qcow2-encrypted"], "qcow2").encrypted
    assert formats.qemu_img_info(images["qcow2-shadow-backing"], "qcow2").backing == "/etc/shadow"
    for fmt in ("qed", "vmdk", "vpc", "vhdx", "vdi", "luks", "parallels"):
        assert formats.inspect(images[fmt]).format == fmt


@pytest.mark.parametrize("case", HOSTILE, ids=IDS)
def test_build_source(case: Case, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    line = one_error(capsys, ["build", str(images[case.name]), "-o", str(out)])
    assert re.search(case.needle, line), line
    assert not out.exists()


@pytest.mark.parametrize("case", HOSTILE, ids=IDS)
def test_stage_base(case: Case, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    line = one_error(capsys, ["stage", str(images[case.name]), "--into", str(into), "--cache", str(cache)])
    assert re.search(case.needle, line), line
    assert not list((cache / "bases").glob("*")) if (cache / "bases").exists() else True
    assert not into.exists() or not list(into.iterdir())


TCG = HostFacts("/usr/bin/qemu-system-x86_64", "x86_64", ("pc", "q35"), ("qemu", "kvm"), False, "test")
SLOT = Slot(cpus=1, memory_mib=1024, source="machine-ad")


@pytest.mark.parametrize("case", HOSTILE, ids=IDS)
def test_domain_sandbox_disk_and_overlay(case: Case, images: dict[str, Path], tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "in.img").write_bytes(images[case.name].read_bytes())
    (sandbox / "data.raw").write_bytes(images["raw"].read_bytes())
    ovl = sandbox / "root.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(images["raw"]), str(ovl))
    xml = b"""<domain type='qemu'><name>x</name><devices>
<disk type='file' device='disk'><source file='replaced.img'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='in.img'/><target dev='vdb'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='data.raw'/><target dev='vdc'/></disk>
</devices></domain>"""
    r = render(xml, RenderOptions(sandbox=sandbox, disks=(ovl,)), TCG, SLOT)
    assert "in.img" not in r.xml and "data.raw" in r.xml and str(ovl) in r.xml
    warned = [w for w in r.warnings if "in.img" in w]
    assert len(warned) == 1 and re.search(case.needle, warned[0]), r.warnings
    # As the --disk overlay itself. Overlays are vmtool's own, staged on a base in a cache render does
    # not know: a plain base named with its format is accepted (qemu then runs as the job's user).
    if formats.inspect(images[case.name]).format == "qcow2" and case.name != "qcow2-shadow-backing":
        with pytest.raises(DomainError) as ei:
            render(None, RenderOptions(sandbox=sandbox, disks=(sandbox / "in.img",)), TCG, SLOT)
        assert re.search(case.needle, ei.value.message) and ei.value.hint, ei.value.message


def agent_manifest(d: Path, rootfs: str, fmt: str) -> Path:
    (d / "vmlinuz").write_bytes(b"k")
    (d / "initrd.img").write_bytes(b"i")
    data = {
        "schema": "vmtool.manifest/1",
        "source": {"path": rootfs, "format": fmt, "size": 1, "sha256": ""},
        "rootfs": {"path": rootfs, "format": fmt, "fstype": "ext4", "label": "root", "uuid": "",
                   "virtual_size": MiB, "allocated_size": MiB, "sha256": ""},
        "kernel": {"path": "vmlinuz", "version": "6.1.0", "sha256": ""},
        "initrd": {"path": "initrd.img", "version": "6.1.0", "sha256": ""},
        "cmdline": "root=LABEL=root ro",
        "fstab": {"before": None, "after": ""},
        "agent": {"mode": "relay"},
    }
    (d / "manifest.json").write_text(json.dumps(data))
    return d / "manifest.json"


@pytest.mark.parametrize("case", HOSTILE, ids=IDS)
def test_queue_vm_disk(case: Case, images: dict[str, Path], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(images[case.name].read_bytes())
    for declared in ("raw", "qcow2"):  # as the build's rootfs, whatever format the manifest claims
        with pytest.raises(QueueError) as ei:
            resolve_image(agent_manifest(tmp_path, "disk.img", declared))
        assert ei.value.hint and str(disk) in ei.value.message
    with pytest.raises(QueueError) as ei:  # as an overlay with --manifest
        resolve_image(disk, manifest=tmp_path / "manifest.json")
    assert re.search(case.needle, ei.value.message) and ei.value.hint, ei.value.message


def test_queue_vm_disk_may_be_a_staged_overlay(images: dict[str, Path], tmp_path: Path) -> None:
    bases = tmp_path / "cache" / "bases"
    bases.mkdir(parents=True)
    base = bases / f"{'ab' * 32}.raw"
    base.write_bytes(images["raw"].read_bytes())
    ovl = tmp_path / "root.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(ovl), "2M")
    ref = resolve_image(ovl, manifest=agent_manifest(tmp_path, "root.qcow2", "qcow2"))
    assert (ref.base, ref.base_format, ref.virtual_size) == (ovl, "qcow2", 2 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(images["raw"]), str(ovl), "2M")
    with pytest.raises(QueueError, match="which is not a base in a vmtool cache"):
        resolve_image(ovl, manifest=tmp_path / "manifest.json")
    os.truncate(ovl, 0)
    with pytest.raises(QueueError, match="is empty, not a disk image"):
        resolve_image(ovl, manifest=tmp_path / "manifest.json")
