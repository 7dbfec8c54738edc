"""Real processes racing for one uncached base: exactly one fetch; a SIGKILLed fetcher blocks nobody."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.stage import HttpServer, StageImages
from vmtool.run import PIPE, Popen, spawn

pytestmark = pytest.mark.integration


def stager(url: str, into: Path, name: str, cache: Path) -> Popen[bytes]:
    return spawn(
        [
            sys.executable,
            "-m",
            "vmtool",
            "stage",
            url,
            "--into",
            os.fspath(into),
            "--name",
            name,
            "--cache",
            os.fspath(cache),
            "--json",
        ],
        stdout=PIPE,
        stderr=PIPE,
    )


def test_many_stagers_one_fetch(tmp_path: Path, stage_images: StageImages, http_server: HttpServer) -> None:
    shutil.copy(stage_images.raw_ext4, http_server.root / "root.img")
    http_server.slow["/root.img"] = 0.04  # 8 MiB in 64 KiB steps: the fetch lasts about 5 s
    cache, into = tmp_path / "cache", tmp_path / "job"
    url = http_server.url("root.img")
    procs = [stager(url, into, f"vm{i}.qcow2", cache) for i in range(8)]
    deadline = time.monotonic() + 60
    while http_server.heads["/root.img"] < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    # Every stager has asked for the base while it is still being fetched: they wait on the lock.
    assert http_server.heads["/root.img"] == 8
    assert all(p.poll() is None for p in procs)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert http_server.gets["/root.img"] == 1
    assert len({r["sha256"] for r in results}) == 1
    assert sum(1 for r in results if not r["cache_hit"]) == 1
    assert sorted(p.name for p in into.iterdir()) == sorted(f"vm{i}.qcow2" for i in range(8))
    assert len(list((cache / "bases").glob("*.raw"))) == 1
    assert list((cache / "tmp").iterdir()) == []


def test_sigkilled_fetcher_leaves_nothing_that_blocks(
    tmp_path: Path, stage_images: StageImages, http_server: HttpServer
) -> None:
    shutil.copy(stage_images.raw_ext4, http_server.root / "root.img")
    http_server.slow["/root.img"] = 0.05  # 8 MiB in 64 KiB steps: about 6 s
    cache, into = tmp_path / "cache", tmp_path / "job"
    url = http_server.url("root.img")
    p = stager(url, into, "a.qcow2", cache)
    deadline = time.monotonic() + 30
    while http_server.gets["/root.img"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert p.poll() is None, "the fetch finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    # Nothing partial is visible: no base, no index entry, no overlay.
    assert list((cache / "bases").iterdir()) == []
    assert list((cache / "index").iterdir()) == []
    assert not into.exists() or list(into.iterdir()) == []
    # The dead fetcher's part file and its sidecar (validators), kept for the next fetch to resume.
    assert sorted(p.name.split(".", 1)[1] for p in (cache / "tmp").iterdir()) == ["part", "part.json"]
    http_server.slow.clear()
    q = stager(url, into, "b.qcow2", cache)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 0, err.decode()
    res = json.loads(out)
    assert not res["cache_hit"] and res["format"] == "raw"
    assert list((cache / "tmp").iterdir()) == []  # cleaned by the next holder of the lock
    assert http_server.gets["/root.img"] == 2
