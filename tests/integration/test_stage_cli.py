"""`vmtool stage` from local sources: overlays, the warm path, hostile images and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fixtures.stage import StageImages
from vmtool.cli.main import main
from vmtool.run import run

pytestmark = pytest.mark.integration


def vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def info(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        run(["qemu-img", "info", "--output=json", "-U", os.fspath(path)]).stdout
    )
    return data


def assert_clean_failure(rc: int, err: str, cache: Path, into: Path) -> None:
    assert rc != 0
    assert "vmtool: error:" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("vmtool: error:")]) == 1
    if (cache / "bases").is_dir():
        assert [p.name for p in (cache / "bases").iterdir()] == []
    if (cache / "tmp").is_dir():
        assert list((cache / "tmp").iterdir()) == []
    assert not into.exists()  # not even an empty DIR


def test_stage_qcow2_makes_overlay_with_explicit_backing_format(
    tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(
        capsys,
        "stage",
        os.fspath(stage_images.qcow2),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    res = json.loads(out)
    ovl = into / "base.qcow2"
    assert res["overlay"] == os.fspath(ovl) and not res["cache_hit"] and res["format"] == "qcow2"
    i = info(ovl)
    assert i["format"] == "qcow2"
    assert i["backing-filename"] == res["base"]
    assert i["backing-filename-format"] == "qcow2"
    assert i["virtual-size"] == 32 << 20
    base = Path(res["base"])
    assert base.parent == cache / "bases" and base.name == f"{res['sha256']}.qcow2"
    assert stat.S_IMODE(base.stat().st_mode) == 0o444
    assert list((cache / "tmp").iterdir()) == []
    # The guest sees the base's bytes through the overlay.
    run(["qemu-img", "compare", "-q", os.fspath(stage_images.qcow2), os.fspath(ovl)])


def test_warm_stage_reuses_cache_without_fetching(
    tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    src = tmp_path / "src.qcow2"
    shutil.copy(stage_images.qcow2, src)
    rc, out, _ = vm(
        capsys, "stage", os.fspath(src), "--into", os.fspath(into), "--cache", os.fspath(cache), "--json"
    )
    first = json.loads(out)
    rc, out, err = vm(
        capsys,
        "stage",
        os.fspath(src),
        "--into",
        os.fspath(into),
        "--name",
        "second.qcow2",
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    second = json.loads(out)
    assert second["cache_hit"] and second["fetched_bytes"] == 0 and second["sha256"] == first["sha256"]
    # With --sha256 the base is found by content alone: the source need not even exist any more.
    src.unlink()
    rc, out, err = vm(
        capsys,
        "stage",
        os.fspath(src),
        "--sha256",
        first["sha256"],
        "--into",
        os.fspath(into),
        "--name",
        "third.qcow2",
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["cache_hit"]
    assert len(list((cache / "bases").glob("*.qcow2"))) == 1
    # Existing overlays are not replaced silently.
    rc, _, err = vm(
        capsys,
        "stage",
        os.fspath(stage_images.qcow2),
        "--into",
        os.fspath(into),
        "--name",
        "third.qcow2",
        "--cache",
        os.fspath(cache),
    )
    assert rc != 0 and "already exists" in err


def test_changed_source_is_fetched_again(
    tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    src = tmp_path / "disk.img"
    shutil.copy(stage_images.raw_ext4, src)
    rc, out, _ = vm(
        capsys, "stage", os.fspath(src), "--into", os.fspath(into), "--cache", os.fspath(cache), "--json"
    )
    assert rc == 0 and json.loads(out)["format"] == "raw"
    with open(src, "r+b") as f:
        f.seek(4 << 20)
        f.write(b"changed")
    rc, out, _ = vm(
        capsys,
        "stage",
        os.fspath(src),
        "--into",
        os.fspath(into),
        "--name",
        "b.qcow2",
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0 and not json.loads(out)["cache_hit"]
    assert len(list((cache / "bases").glob("*.raw"))) == 2


def test_raw_base_and_file_url(
    tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(
        capsys,
        "stage",
        f"file://{stage_images.raw_ext4}",
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    res = json.loads(out)
    assert res["format"] == "raw" and res["overlay"].endswith("/root.qcow2")
    assert info(Path(res["overlay"]))["backing-filename-format"] == "raw"
    # Holes stay holes in the cache.
    base = Path(res["base"])
    assert base.stat().st_blocks * 512 <= stage_images.raw_ext4.stat().st_blocks * 512 + (1 << 20)


def test_manifest_source(
    tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmtool.manifest import BootFile, Manifest, RootfsInfo, SourceInfo
    from vmtool.stage.fetch import Sink

    out_dir = tmp_path / "build"
    out_dir.mkdir()
    shutil.copy(stage_images.raw_ext4, out_dir / "root.img")
    with open(out_dir / "root.img", "rb") as f, open(os.devnull, "wb") as null:
        sink = Sink(null)  # type: ignore[arg-type]
        sink.write(f.read())
        sha = sink.hash.hexdigest()
    size = (out_dir / "root.img").stat().st_size
    man = Manifest(
        source=SourceInfo(path="src.qcow2", format="qcow2", size=1, sha256="0" * 64),
        rootfs=RootfsInfo(
            path="root.img",
            format="raw",
            fstype="ext4",
            label="root",
            uuid="u",
            virtual_size=size,
            allocated_size=size,
            sha256=sha,
        ),
        kernel=BootFile(path="vmlinuz", version="6.1", sha256="0" * 64),
        initrd=BootFile(path="initrd.img", version="6.1", sha256="0" * 64),
        cmdline="root=LABEL=root",
        fstab_before=None,
        fstab_after="LABEL=root / ext4 defaults 0 1\n",
    )
    man.save(out_dir / "manifest.json")
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(
        capsys,
        "stage",
        os.fspath(out_dir / "manifest.json"),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    res = json.loads(out)
    assert res["sha256"] == sha and res["format"] == "raw" and res["overlay"].endswith("/root.qcow2")
    # A manifest whose recorded checksum does not match its rootfs is refused.
    man = replace(man, rootfs=replace(man.rootfs, sha256="1" * 64))
    man.save(out_dir / "manifest.json")
    cache2 = tmp_path / "cache2"
    rc, _, err = vm(
        capsys,
        "stage",
        os.fspath(out_dir / "manifest.json"),
        "--into",
        os.fspath(tmp_path / "j2"),
        "--cache",
        os.fspath(cache2),
    )
    assert_clean_failure(rc, err, cache2, tmp_path / "j2")
    assert "checksum mismatch" in err


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("text", "not a disk image"),
        ("text-as-raw", "not a whole number of 512-byte sectors"),
        ("backing", "has a backing file"),
        ("datafile", "external data file"),
        ("vmdk", "vmdk"),
        ("checksum", "checksum mismatch"),
        ("missing", "no such file"),
        ("scheme", "unknown source scheme"),
        ("qcow2-as-raw", "is a qcow2 image but --format raw"),
    ],
)
def test_bad_sources_fail_cleanly(
    case: str, needle: str, tmp_path: Path, stage_images: StageImages, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    src = {
        "text": [os.fspath(stage_images.text)],
        "text-as-raw": [os.fspath(stage_images.text), "--format", "raw"],
        "backing": [os.fspath(stage_images.backing_qcow2)],
        "datafile": [os.fspath(stage_images.datafile_qcow2)],
        "vmdk": [os.fspath(stage_images.vmdk)],
        "checksum": [os.fspath(stage_images.qcow2), "--sha256", "ab" * 32],
        "missing": [os.fspath(tmp_path / "nope.qcow2")],
        "scheme": ["gopher://example.org/base.qcow2"],
        "qcow2-as-raw": [os.fspath(stage_images.qcow2), "--format", "raw"],
    }[case]
    rc, _, err = vm(capsys, "stage", *src, "--into", os.fspath(into), "--cache", os.fspath(cache))
    assert_clean_failure(rc, err, cache, into)
    assert needle in err
    assert "hint:" in err or case in ("backing-none",)


def test_missing_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = vm(capsys, "stage")
    assert rc == 2 and "required" in err and "Traceback" not in err
    rc, _, err = vm(capsys, "stage", "x.qcow2")
    assert rc == 2 and "--into" in err
    rc, _, err = vm(capsys, "stage", "x.qcow2", "--into", "/tmp", "--sha256", "xyz")
    assert rc == 1 and "not a sha256" in err


def test_cache_not_writable(
    tmp_path: Path,
    stage_images: StageImages,
    tmpfs: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    mnt = tmpfs("ro,size=1m")
    into = tmp_path / "job"
    rc, _, err = vm(
        capsys,
        "stage",
        os.fspath(stage_images.qcow2),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(mnt / "cache"),
    )
    assert_clean_failure(rc, err, mnt / "cache", into)
    assert "not writable" in err and "--cache" in err


def test_disk_full_during_fetch(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mnt = tmpfs("size=4m")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:  # an MBR-signed raw disk with 8 MiB of non-zero data
        f.write(os.urandom(8 << 20))
        f.seek(510)
        f.write(b"\x55\xaa")
    into = tmp_path / "job"
    rc, _, err = vm(
        capsys, "stage", os.fspath(big), "--into", os.fspath(into), "--cache", os.fspath(mnt / "c")
    )
    assert_clean_failure(rc, err, mnt / "c", into)
    assert "no space left" in err
    assert os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize > 3 << 20  # the partial file is gone


def test_manifest_from_vmtool_build(
    tmp_path: Path, default_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmtool.manifest import load

    man = load(default_build / "manifest.json")
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(
        capsys,
        "stage",
        os.fspath(default_build / "manifest.json"),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    res = json.loads(out)
    assert res["sha256"] == man.rootfs.sha256 and res["format"] == man.rootfs.format
    i = info(Path(res["overlay"]))
    assert i["backing-filename-format"] == man.rootfs.format
    assert i["virtual-size"] == man.rootfs.virtual_size
