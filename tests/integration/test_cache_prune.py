"""`vmtool cache list|prune`: LRU order, size and age limits, and bases of live overlays kept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmtool.cli.main import main
from vmtool.run import run

pytestmark = pytest.mark.integration


def vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if cap.out.strip().startswith("{") else {}), cap.err


def make_bases(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"src{i}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", os.fspath(p), f"{8 + i}M"])
        out.append(p)
    return out


def test_list_and_prune_lru_keeps_live_overlays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    srcs = make_bases(tmp_path, 4)
    shas = []
    for i, src in enumerate(srcs):
        rc, res, err = vm(
            capsys,
            "stage",
            os.fspath(src),
            "--into",
            os.fspath(jobs / f"j{i}"),
            "--cache",
            os.fspath(cache),
            "--json",
        )
        assert rc == 0, err
        shas.append(res["sha256"])
        # Make the use order explicit and far apart: base i was last used 4 - i hours ago.
        t = time.time() - (4 - i) * 3600
        os.utime(cache / "used" / res["sha256"], (t, t))
    rc, listing, _ = vm(capsys, "cache", "list", "--cache", os.fspath(cache), "--json")
    assert rc == 0
    assert [b["sha256"] for b in listing["bases"]] == shas  # least recently used first
    assert all(len(b["live_overlays"]) == 1 for b in listing["bases"])
    # Every base has a live overlay: nothing may go, whatever the limits say.
    rc, res, _ = vm(capsys, "cache", "prune", "--max-size", "0", "--cache", os.fspath(cache), "--json")
    assert rc == 0 and res["removed"] == []
    # Jobs 0 and 1 finish; job 2's sandbox is reused for an unrelated file of the same name.
    for i in (0, 1):
        for p in (jobs / f"j{i}").iterdir():
            p.unlink()
    ovl2 = next((jobs / "j2").iterdir())
    ovl2.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", os.fspath(ovl2), "1M"])
    # --older-than removes only old unused bases: 0 (4 h) and 1 (3 h), not 2 (2 h, now unused).
    rc, res, _ = vm(
        capsys, "cache", "prune", "--older-than", "150m", "--dry-run", "--cache", os.fspath(cache), "--json"
    )
    assert [b["sha256"] for b in res["removed"]] == shas[:2]
    assert len(list((cache / "bases").glob("*.qcow2"))) == 4  # dry run
    rc, res, _ = vm(capsys, "cache", "prune", "--older-than", "150m", "--cache", os.fspath(cache), "--json")
    assert [b["sha256"] for b in res["removed"]] == shas[:2]
    assert {b["sha256"] for b in res["kept"]} == set(shas[2:])
    # --max-size: the LRU unused base goes first; base 3 is still in use and stays.
    rc, res, _ = vm(capsys, "cache", "prune", "--max-size", "1", "--cache", os.fspath(cache), "--json")
    assert [b["sha256"] for b in res["removed"]] == [shas[2]]
    assert [b["sha256"] for b in res["kept"]] == [shas[3]]
    assert sorted(p.name for p in (cache / "bases").iterdir()) == sorted(
        [f"{shas[3]}.qcow2", f"{shas[3]}.json"]
    )
    assert list((cache / "index").iterdir()) and all(
        json.loads(p.read_text())["sha256"] == shas[3] for p in (cache / "index").iterdir()
    )
    # A pruned base is fetched again on the next stage.
    rc, res, err = vm(
        capsys,
        "stage",
        os.fspath(srcs[0]),
        "--into",
        os.fspath(jobs / "j0"),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0 and not res["cache_hit"], err


def test_prune_cleans_dead_fetchers_tmp_and_text_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    (src,) = make_bases(tmp_path, 1)
    assert (
        main(["stage", os.fspath(src), "--into", os.fspath(tmp_path / "j"), "--cache", os.fspath(cache)])
        == 0
    )
    stale = cache / "tmp" / f"{'0' * 64}.123.part"
    stale.write_bytes(b"partial")
    capsys.readouterr()
    assert main(["cache", "list", "--cache", os.fspath(cache)]) == 0
    out = capsys.readouterr().out
    assert "SHA256" in out and "src0.qcow2" in out
    assert main(["cache", "prune", "--cache", os.fspath(cache)]) == 0
    out = capsys.readouterr().out
    assert "0 base(s) removed, 1 kept" in out
    assert not stale.exists()


def test_prune_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = vm(capsys, "cache", "prune", "--max-size", "lots", "--cache", os.fspath(tmp_path / "c"))
    assert rc == 1 and "not a size" in err and "hint:" in err
    rc, _, err = vm(
        capsys, "cache", "prune", "--older-than", "yesterday", "--cache", os.fspath(tmp_path / "c")
    )
    assert rc == 1 and "not an age" in err
    rc, _, err = vm(capsys, "cache")
    assert rc == 2


def test_cache_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vmtool.stage.cache import default_cache_dir

    monkeypatch.setenv("VMTOOL_CACHE", os.fspath(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("VMTOOL_CACHE")
    expected = Path("/var/cache/vmtool") if os.geteuid() == 0 else Path.home() / ".cache" / "vmtool"
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == expected


def test_group_writable_cache_needs_the_sticky_bit_and_stays_shared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import stat

    cache = tmp_path / "cache"
    cache.mkdir()
    (src,) = make_bases(tmp_path, 1)
    args = ["stage", os.fspath(src), "--into", os.fspath(tmp_path / "j"), "--cache", os.fspath(cache), "--json"]
    # group-writable without sticky: any member could replace a base another member's VM boots
    os.chmod(cache, 0o2775)
    rc, _res, err = vm(capsys, *args)
    assert rc == 1 and "has unsafe permissions" in err and "chmod +t" in err, err
    assert list(cache.iterdir()) == [] and not (tmp_path / "j").exists()
    os.chmod(cache, 0o3775)
    old = os.umask(0o022)
    try:
        rc, res, err = vm(capsys, *args)
    finally:
        os.umask(old)
    assert rc == 0, err
    sha = res["sha256"]

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert all(mode(cache / d) == 0o3775 for d in ("bases", "used", "index", "refs", "locks", "tmp"))
    assert mode(cache / "refs" / sha) == 0o3775
    assert mode(cache / "used" / sha) == 0o666
    assert all(mode(p) == 0o666 for p in (cache / "locks").iterdir())
    assert all(mode(p) == 0o644 for p in (cache / "index").iterdir())
    assert mode(cache / "bases" / f"{sha}.qcow2") == 0o444
