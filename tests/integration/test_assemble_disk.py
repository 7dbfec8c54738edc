"""vmtool disk assemble: a GPT whole-disk image with an ESP holding a unified kernel image, and the root."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.image.assemble import ESP_TYPE, ROOT_X86_64_TYPE, SECTOR, plan_layout
from vmtool.run import run

pytestmark = pytest.mark.integration


def _sha256_range(path: Path, offset: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            b = f.read(min(left, 1 << 20))
            assert b, "disk image is shorter than its partition table says"
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _partitions(disk: Path) -> list[dict[str, object]]:
    table = json.loads(run(["sfdisk", "--json", os.fspath(disk)]).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    return list(table["partitions"])


def test_assemble_raw_records_disk_and_lays_out_partitions(
    build_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["disk", "assemble", os.fspath(build_copy), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = manifest_mod.load(build_copy)
    assert m.disk is not None and m.disk.path == "disk.raw" and m.disk.format == "raw"
    assert m.disk.firmware == "uefi" and m.disk.boot == "uki"
    assert out["disk"]["sha256"] == m.disk.sha256
    disk = build_copy.parent / "disk.raw"
    assert disk.stat().st_size == m.disk.virtual_size
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == m.disk.sha256
    # Nothing else left beside it (work directories are removed).
    assert sorted(p.name for p in build_copy.parent.iterdir() if p.name.startswith(".")) == []

    esp, root = _partitions(disk)
    assert esp["type"] == ESP_TYPE and root["type"] == ROOT_X86_64_TYPE
    assert int(str(esp["start"])) % 2048 == 0 and int(str(root["start"])) % 2048 == 0
    # The root partition holds the build's root filesystem byte for byte.
    rootfs = m.rootfs_path
    assert _sha256_range(disk, int(str(root["start"])) * SECTOR, rootfs.stat().st_size) == m.rootfs.sha256

    # The ESP is FAT with \EFI\BOOT\BOOTX64.EFI; that file is the stub plus our sections.
    esp_off = int(str(esp["start"])) * SECTOR
    listing = run(["mdir", "-i", f"{disk}@@{esp_off}", "::/EFI/BOOT"], env={"MTOOLS_SKIP_CHECK": "1"})
    assert b"BOOTX64" in listing.stdout
    uki = build_copy.parent / "uki.efi"
    run(
        ["mcopy", "-i", f"{disk}@@{esp_off}", "::/EFI/BOOT/BOOTX64.EFI", os.fspath(uki)],
        env={"MTOOLS_SKIP_CHECK": "1"},
    )
    try:
        headers = run(["objdump", "-h", os.fspath(uki)]).stdout.decode()
        sections = {}
        for line in headers.splitlines():
            f = line.split()
            if len(f) >= 7 and f[0].isdigit():
                sections[f[1]] = (int(f[3], 16), int(f[2], 16))
        for name in (".text", ".osrel", ".cmdline", ".initrd", ".linux"):
            assert name in sections, headers
        spans = sorted(sections.values())
        for (a, alen), (b, _) in zip(spans, spans[1:], strict=False):
            assert a + alen <= b, f"sections overlap:\n{headers}"
        assert sections[".linux"][1] == m.kernel_path.stat().st_size
        assert sections[".initrd"][1] == m.initrd_path.stat().st_size
        cmdline = run(
            ["objcopy", "-O", "binary", "--only-section=.cmdline", os.fspath(uki), "/dev/stdout"]
        ).stdout
        assert cmdline.rstrip(b"\0").decode() == m.cmdline
    finally:
        uki.unlink()


def test_assemble_is_reproducible_and_qcow2_matches_raw(build_copy: Path, tmp_path: Path) -> None:
    assert main(["disk", "assemble", os.fspath(build_copy)]) == 0
    first = manifest_mod.load(build_copy).disk
    assert first is not None
    first_raw = build_copy.parent / "disk.raw"
    keep = tmp_path / "first.raw"
    os.replace(first_raw, keep)
    assert main(["disk", "assemble", os.fspath(build_copy)]) == 0
    again = manifest_mod.load(build_copy).disk
    assert again is not None and again.sha256 == first.sha256

    assert main(["disk", "assemble", os.fspath(build_copy), "--format", "qcow2"]) == 0
    q = manifest_mod.load(build_copy).disk
    assert q is not None and q.format == "qcow2" and q.path == "disk.qcow2"
    qpath = build_copy.parent / "disk.qcow2"
    info = json.loads(run(["qemu-img", "info", "--output=json", os.fspath(qpath)]).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == first.virtual_size
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", os.fspath(qpath), os.fspath(keep)])


def test_assemble_refuses_output_outside_build_and_missing_files(
    build_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["disk", "assemble", os.fspath(build_copy), "-o", os.fspath(tmp_path / "elsewhere.raw")]) == 1
    )
    err = capsys.readouterr().err
    assert "inside the build directory" in err and "Traceback" not in err
    assert not (tmp_path / "elsewhere.raw").exists()

    m = manifest_mod.load(build_copy)
    m.kernel_path.unlink()
    assert main(["disk", "assemble", os.fspath(build_copy)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"kernel .* is missing", err) and "hint:" in err
    assert not (build_copy.parent / "disk.raw").exists()
    assert manifest_mod.load(build_copy).disk is None


def test_assemble_rejects_a_file_that_is_not_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "manifest.json"
    bogus.write_text('{"schema": "something-else"}')
    assert main(["disk", "assemble", os.fspath(bogus)]) == 1
    assert "not a vmtool manifest" in capsys.readouterr().err


@pytest.mark.unit
def test_layout_is_aligned_and_leaves_room_for_the_backup_gpt() -> None:
    lay = plan_layout(esp_bytes=64 << 20, root_bytes=(100 << 20) + 1)
    assert lay.esp_start == 2048 and lay.esp_sectors == (64 << 20) // 512
    assert lay.root_start % 2048 == 0 and lay.root_start >= lay.esp_start + lay.esp_sectors
    assert lay.root_sectors * 512 >= (100 << 20) + 1
    assert lay.total_sectors - (lay.root_start + lay.root_sectors) >= 33


def test_build_with_disk_flag_records_an_assembled_disk(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The build command calls assemble_disk() inside its temporary OUTDIR (the interface with the
    # build area); the disk it records must hold that build's root filesystem.
    out = tmp_path / "out"
    rc = main(["build", os.fspath(default_disk), "-o", os.fspath(out), "--disk", "--disk-format", "qcow2"])
    assert rc == 0, capsys.readouterr().err
    m = manifest_mod.load(out / "manifest.json")
    assert m.disk is not None and m.disk.format == "qcow2" and m.disk.firmware == "uefi"
    disk = m.resolve(m.disk.path)
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == m.disk.sha256
    raw = tmp_path / "disk.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.fspath(disk), os.fspath(raw)])
    _, root = _partitions(raw)
    assert _sha256_range(raw, int(str(root["start"])) * SECTOR, m.rootfs.virtual_size) == m.rootfs.sha256


def test_qcow2_rootfs_is_placed_by_qemu_img(build_copy: Path, tmp_path: Path) -> None:
    m = manifest_mod.load(build_copy)
    raw_root = m.rootfs_path
    q = build_copy.parent / "rootfs.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw_root), os.fspath(q)])
    want = m.rootfs.sha256
    size = raw_root.stat().st_size
    raw_root.unlink()
    replace(m, rootfs=replace(m.rootfs, path=q.name, format="qcow2")).save(build_copy)
    assert main(["disk", "assemble", os.fspath(build_copy)]) == 0
    disk = build_copy.parent / "disk.raw"
    _, root = _partitions(disk)
    assert _sha256_range(disk, int(str(root["start"])) * SECTOR, size) == want
