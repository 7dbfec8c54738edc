"""Staging through a site proxy (a real Squid, and proxies that misbehave) and resuming cut fetches.

Every stager is a real `vmtool stage` process with its own cache (one "node" each); the origin is a
real HTTP server on loopback that counts requests and body bytes (tests/fixtures/squid.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.servers import free_port
from tests.fixtures.squid import Origin, Squid, env_for, run_bad_proxy, silent_proxy
from tests.fixtures.stage import StageImages
from vmtool.run import PIPE, Popen, spawn

pytestmark = pytest.mark.integration


@dataclass
class Staged:
    rc: int
    result: dict[str, Any]
    stderr: str

    @property
    def warnings(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if "WARNING" in ln]


def start(url: str, cache: Path, env: dict[str, str], name: str = "vm.qcow2") -> Popen[bytes]:
    argv = [sys.executable, "-m", "vmtool", "stage", url, "--format", "raw"]
    argv += ["--into", os.fspath(cache.parent / f"job-{cache.name}"), "--name", name, "--force"]
    argv += ["--cache", os.fspath(cache), "--json"]
    return spawn(argv, env=env, stdout=PIPE, stderr=PIPE)


def finish(p: Popen[bytes], timeout: float = 180) -> Staged:
    out, err = p.communicate(timeout=timeout)
    res = json.loads(out) if p.returncode == 0 and out.strip() else {}
    return Staged(p.returncode, res, err.decode())


def stage(url: str, cache: Path, env: dict[str, str]) -> Staged:
    return finish(start(url, cache, env))


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def meta(cache: Path, sha: str) -> dict[str, Any]:
    return dict(json.loads((cache / "bases" / f"{sha}.json").read_text()))


def parts(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").glob("*.part"))


@pytest.fixture
def image(origin: Origin) -> Path:
    """8 MiB of random data with an MBR signature: no zero runs, so a part file's size is what arrived."""
    p = origin.root / "root.img"
    data = bytearray(os.urandom(8 << 20))
    data[510:512] = b"\x55\xaa"
    p.write_bytes(bytes(data))
    return p


def interrupted(origin: Origin, image: Path, cache: Path, at: float = 0.5) -> int:
    """A first stage whose connection the origin cuts at `at` of the image: returns the part's size."""
    cut = origin.cut_at = int(image.stat().st_size * at)
    first = stage(origin.url(image.name), cache, env_for(None))
    assert first.rc == 1
    assert "connection closed after" in first.stderr and "resumes" in first.stderr
    (part,) = parts(cache)
    assert part.stat().st_size == cut
    assert not list((cache / "bases").iterdir())
    origin.reset()
    return part.stat().st_size


# --- a real Squid --------------------------------------------------------------------------------


def test_eight_nodes_through_squid_origin_serves_the_body_once(
    tmp_path: Path, squid: Squid, origin: Origin, image: Path
) -> None:
    size = image.stat().st_size
    env = env_for(squid.location)
    procs = [start(origin.url("root.img"), tmp_path / f"node{i}", env) for i in range(8)]
    results = [finish(p) for p in procs]
    for r in results:
        assert r.rc == 0, r.stderr
        assert r.warnings == []
        assert r.result["sha256"] == sha256(image)
        assert r.result["fetched_via"] == f"proxy http://{squid.location} (OSG_SQUID_LOCATION)"
    assert origin.body_bytes("root.img") == size, origin.log
    assert origin.count("root.img", status=200) == 1
    assert all(s.via for s in origin.log), "a request reached the origin without the proxy"
    for i in range(8):
        m = meta(tmp_path / f"node{i}", sha256(image))
        assert m["fetched_via"] == f"proxy http://{squid.location} (OSG_SQUID_LOCATION)"
    gets = [ln for ln in squid.access() if " GET " in ln]
    assert len(gets) == 8
    assert sum("HIT" in ln or "REFRESH_UNMODIFIED" in ln for ln in gets) >= 7, gets


def test_squid_stopped_falls_back_to_the_origin_with_one_warning(
    tmp_path: Path, squid: Squid, origin: Origin, image: Path
) -> None:
    squid.stop()
    r = stage(origin.url("root.img"), tmp_path / "node", env_for(squid.location))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1, r.stderr
    assert f"proxy http://{squid.location} (from OSG_SQUID_LOCATION) failed" in r.warnings[0]
    assert "fetching from the origin" in r.warnings[0]
    assert r.result["fetched_via"] == "direct"
    assert meta(tmp_path / "node", r.result["sha256"])["fetched_via"] == "direct"
    assert origin.body_bytes("root.img") == image.stat().st_size
    assert all(s.via is None for s in origin.log)


@pytest.mark.parametrize("through_squid", [False, True], ids=["direct", "squid"])
def test_sigkilled_fetch_is_resumed(
    tmp_path: Path, squid: Squid, origin: Origin, image: Path, through_squid: bool
) -> None:
    size = image.stat().st_size
    env = env_for(squid.location if through_squid else None)
    cache = tmp_path / "node"
    origin.slow = 0.03  # 8 MiB in 64 KiB steps: about 4 s
    p = start(origin.url("root.img"), cache, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = parts(cache)
        if got and got[0].stat().st_size >= size // 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the fetch finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    (part,) = parts(cache)
    have = part.stat().st_size
    assert 0 < have < size
    origin.slow = 0.0
    time.sleep(0.5)  # let the origin finish what it was sending when the client died
    origin.reset()
    r = stage(origin.url("root.img"), cache, env)
    assert r.rc == 0, r.stderr
    assert r.result["sha256"] == sha256(image)
    assert r.result["fetched_bytes"] == size - have
    assert meta(cache, r.result["sha256"])["resumed_from"] == have
    assert parts(cache) == [] and list((cache / "tmp").iterdir()) == []
    if not through_squid:
        assert [(s.range, s.status, s.body) for s in origin.log if s.method == "GET"] == [
            (f"bytes={have}-", 206, size - have)
        ]
    else:
        # Squid passes the open-ended range on (the object was never complete in its cache).
        assert origin.body_bytes("root.img") == size - have


def test_cut_at_90_percent_fetches_only_the_last_10(tmp_path: Path, origin: Origin, image: Path) -> None:
    size = image.stat().st_size
    cache = tmp_path / "node"
    have = interrupted(origin, image, cache, at=0.9)
    r = stage(origin.url("root.img"), cache, env_for(None))
    assert r.rc == 0, r.stderr
    assert r.warnings == []
    assert r.result["sha256"] == sha256(image)
    assert origin.body_bytes("root.img") == size - have == r.result["fetched_bytes"]
    (get,) = [s for s in origin.log if s.method == "GET"]
    assert (get.range, get.status) == (f"bytes={have}-", 206)


def test_https_through_a_proxy_is_a_connect_tunnel(
    tmp_path: Path, squid: Squid, https_server: Any, stage_images: StageImages
) -> None:
    shutil.copy(stage_images.raw_ext4, https_server.server.root / "root.img")
    env = env_for(squid.location, https_proxy=f"http://{squid.location}", SSL_CERT_FILE=str(https_server.ca))
    r = stage(https_server.server.url("root.img", "https"), tmp_path / "node", env)
    assert r.rc == 0, r.stderr
    assert r.result["fetched_via"] == f"proxy http://{squid.location} (https_proxy)"
    assert any(" CONNECT " in ln for ln in squid.access())
    # OSG_SQUID_LOCATION alone never routes https (a tunnel caches nothing).
    r2 = stage(
        https_server.server.url("root.img", "https"),
        tmp_path / "node2",
        env_for(squid.location, SSL_CERT_FILE=str(https_server.ca)),
    )
    assert r2.rc == 0, r2.stderr
    assert r2.result["fetched_via"] == "direct"


# --- proxies that fail or misbehave ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["html", "html-sniff", "error"])
def test_proxy_answering_html_falls_back(tmp_path: Path, origin: Origin, image: Path, mode: str) -> None:
    with run_bad_proxy(mode) as bp:
        r = stage(origin.url("root.img"), tmp_path / "node", env_for(bp.location))
    assert r.rc == 0, r.stderr
    assert bp.requests >= 1
    assert len(r.warnings) == 1, r.stderr
    why = "HTTP 503" if mode == "error" else "it answered with an HTML page"
    assert why in r.warnings[0] and "fetching from the origin" in r.warnings[0]
    assert r.result["sha256"] == sha256(image) and r.result["fetched_via"] == "direct"


def test_proxy_refusing_or_hung_falls_back(tmp_path: Path, origin: Origin, image: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    r = stage(origin.url("root.img"), tmp_path / "a", env_for(closed))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1 and "Connection refused" in r.warnings[0], r.stderr
    with silent_proxy() as hung:
        t = time.monotonic()
        r = stage(origin.url("root.img"), tmp_path / "b", env_for(hung, VMTOOL_PROXY_TIMEOUT="1"))
        assert time.monotonic() - t < 30
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1 and "timed out" in r.warnings[0], r.stderr
    assert r.result["sha256"] == sha256(image)


def test_proxy_truncating_the_body_is_completed_from_the_origin(
    tmp_path: Path, origin: Origin, image: Path
) -> None:
    size = image.stat().st_size
    cut = 3 << 20
    with run_bad_proxy("truncate", cut=cut) as bp:
        r = stage(origin.url("root.img"), tmp_path / "node", env_for(bp.location))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1, r.stderr
    assert f"connection closed after {cut} of {size} bytes" in r.warnings[0]
    assert r.result["sha256"] == sha256(image)
    assert r.result["fetched_via"] == "direct"
    direct = [s for s in origin.log if s.method == "GET" and s.via is None]
    assert [(s.range, s.status, s.body) for s in direct] == [(f"bytes={cut}-", 206, size - cut)]


def test_proxy_with_a_wrong_content_range_falls_back(tmp_path: Path, origin: Origin, image: Path) -> None:
    cache = tmp_path / "node"
    have = interrupted(origin, image, cache)
    with run_bad_proxy("badrange") as bp:
        r = stage(origin.url("root.img"), cache, env_for(bp.location))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1, r.stderr
    assert f"asked for bytes {have}-" in r.warnings[0] and "answered bytes 0-" in r.warnings[0]
    assert r.result["sha256"] == sha256(image)
    assert meta(cache, r.result["sha256"])["resumed_from"] == have


def test_origin_with_a_wrong_content_range_starts_again(tmp_path: Path, origin: Origin, image: Path) -> None:
    cache = tmp_path / "node"
    interrupted(origin, image, cache)
    origin.bad_range_shift = 4096
    r = stage(origin.url("root.img"), cache, env_for(None))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1 and "fetching it again from the start" in r.warnings[0], r.stderr
    assert r.result["sha256"] == sha256(image)
    assert r.result["fetched_bytes"] == image.stat().st_size


@pytest.mark.parametrize("honours_if_range", [True, False])
def test_origin_changed_between_the_parts_starts_again(
    tmp_path: Path, origin: Origin, image: Path, honours_if_range: bool
) -> None:
    # With HEAD refused the source's identity has no version in it, so the new version meets the
    # old part under the same lock: only the validator tells them apart.
    origin.refuse_head = True
    origin.ignore_if_range = not honours_if_range
    cache = tmp_path / "node"
    interrupted(origin, image, cache)
    data = bytearray(image.read_bytes())
    data[-4096:] = os.urandom(4096)
    image.write_bytes(bytes(data))
    os.utime(image, (time.time() + 5, time.time() + 5))
    r = stage(origin.url("root.img"), cache, env_for(None))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1, r.stderr
    why = (
        "the origin changed since the interrupted fetch"
        if honours_if_range
        else "ETag changed between the parts"
    )
    assert why in r.warnings[0] and "fetching it again from the start" in r.warnings[0]
    assert r.result["sha256"] == sha256(image)
    assert r.result["fetched_bytes"] == image.stat().st_size


def test_stale_proxy_part_then_changed_origin_starts_again(
    tmp_path: Path, origin: Origin, image: Path
) -> None:
    with run_bad_proxy("truncate", cut=2 << 20, etag='"an-older-copy"') as bp:
        r = stage(origin.url("root.img"), tmp_path / "node", env_for(bp.location))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 2, r.stderr
    assert "connection closed after" in r.warnings[0]
    assert "the origin changed since the interrupted fetch" in r.warnings[1]
    assert r.result["sha256"] == sha256(image)


@pytest.mark.parametrize(
    "value", ["not-a-proxy", "squid.example.org", "127.0.0.1:99999", "a b:3128", ":3128"]
)
def test_osg_squid_location_garbage_is_a_warning(
    tmp_path: Path, origin: Origin, image: Path, value: str
) -> None:
    r = stage(origin.url("root.img"), tmp_path / "node", env_for(value))
    assert r.rc == 0, r.stderr
    assert len(r.warnings) == 1, r.stderr
    assert f"OSG_SQUID_LOCATION={value!r} is not host:port or UNAVAILABLE" in r.warnings[0]
    assert r.result["fetched_via"] == "direct"
    assert r.result["sha256"] == sha256(image)


def test_osg_squid_location_unavailable_is_direct_without_warning(
    tmp_path: Path, origin: Origin, image: Path
) -> None:
    r = stage(origin.url("root.img"), tmp_path / "node", env_for("UNAVAILABLE"))
    assert r.rc == 0 and r.warnings == [], r.stderr
    assert r.result["fetched_via"] == "direct"


def test_queue_inputs_go_through_the_site_squid(
    tmp_path: Path, squid: Squid, origin: Origin, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue worker's URL inputs use stage's fetch: two nodes' workers, one body from the origin.
    from vmtool.queue.data import Inputs
    from vmtool.stage.cache import Cache

    monkeypatch.setenv("OSG_SQUID_LOCATION", squid.location)
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    got = [
        Inputs(Cache.open(tmp_path / f"node{i}")).get("i", "in.img", {"url": origin.url("root.img")}, max_bytes=1 << 30)
        for i in range(2)
    ]
    assert {g.sha256 for g in got} == {sha256(image)}
    assert origin.body_bytes("root.img") == image.stat().st_size
    assert all(s.via for s in origin.log), "a request reached the origin without the proxy"
    assert len([ln for ln in squid.access() if " GET " in ln]) == 2
