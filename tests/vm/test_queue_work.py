"""The worker with real beanstalkd (binlog), real libvirtd and real VMs of the default image built with
--agent: at-least-once delivery, one result per item, poison and malformed items buried with reasons,
beanstalkd restarted mid-run, SIGTERM and SIGKILL of the worker. Boots are few: one in-process worker
with two VMs covers the faults that happen inside the VMs, one test covers the worker's own death.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.beanstalk import BeanstalkServer, destroy_domains, domains
from vmtool.cli.main import main
from vmtool.queue.beanstalk import Beanstalk, results_tube
from vmtool.queue.client import collect_results, put_items
from vmtool.queue.items import Item
from vmtool.queue.vms import VMFactory, resolve_image
from vmtool.queue.worker import Worker, WorkerOptions
from vmtool.run import PIPE, Popen, run, spawn

pytestmark = [pytest.mark.vm, pytest.mark.queue, pytest.mark.libvirt]

MEMORY_MIB = 512


def _tube_counts(bs: Beanstalk, tube: str) -> dict[str, int]:
    st = bs.stats_tube(tube) or {}
    return {k: int(st.get(f"current-jobs-{k}", 0)) for k in ("ready", "reserved", "buried", "delayed")}


def test_worker_survives_vm_deaths_poison_and_a_beanstalkd_restart(
    beanstalkd: BeanstalkServer,
    agent_build: Path,
    libvirt_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tube = "rel"
    prefix = f"vmtool-qt{os.getpid()}-"
    www = tmp_path / "www"
    www.mkdir()
    (www / "data.txt").write_text("fetched by the worker on the host\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.fspath(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    items = [
        Item("url-ok", ["cat", "data.txt"], {"data.txt": {"url": f"{base}/data.txt"}}),
        Item("url-bad", ["cat", "data.txt"], {"data.txt": {"url": f"{base}/missing.txt"}}),
        Item("slow", ["sh", "-c", "sleep 6; echo slow done"]),
        Item(
            "n1",
            ["sh", "-c", "tr a-z A-Z < in.txt > $VMTOOL_OUTDIR/up.txt; cat in.txt"],
            {"in.txt": {"data": "aGVsbG8K"}},
        ),
        Item("n2", ["uname", "-r"]),
        Item("victim", ["sh", "-c", "sleep 25; echo survived"]),
        Item("n3", ["sh", "-c", "echo err >&2; exit 3"]),
        Item("n4", ["true"]),
        Item("late", ["sleep", "60"], timeout_s=2),
        Item("poison", ["poweroff", "-f"]),
    ]
    with Beanstalk(beanstalkd.address) as bs:
        put_items(bs, tube, items, ttr=20)
        bs.put(b"{this is not json", tube=tube)
        bs.put(json.dumps({"v": 1, "id": "huge", "cmd": ["true"], "pad": "x" * 62000}).encode(), tube=tube)

    killed: dict[str, str] = {}
    restarted = threading.Event()
    events: list[tuple[str, dict[str, Any]]] = []

    def later(fn: Any) -> None:
        threading.Thread(target=fn, daemon=True).start()

    def on_event(what: str, data: dict[str, Any]) -> None:
        events.append((what, data))
        if what == "item" and data["item"] == "slow" and not restarted.is_set():
            restarted.set()

            def restart() -> None:
                time.sleep(1)
                beanstalkd.restart()  # kill -9; the binlog brings every job back

            later(restart)
        if what == "item" and data["item"] == "victim" and "victim" not in killed:
            killed["victim"] = data["vm"]

            def kill() -> None:
                time.sleep(2)
                run(["virsh", "-c", libvirt_uri, "destroy", data["vm"]], check=False)

            later(kill)

    workdir = tmp_path / "work"
    factory = VMFactory(
        resolve_image(agent_build), workdir, memory_mib=MEMORY_MIB, uri=libvirt_uri, name_prefix=prefix
    )
    opts = WorkerOptions(beanstalkd.address, tube, vms=2, idle_timeout=10, max_attempts=2)
    worker = Worker(opts, factory, on_event=on_event)
    try:
        report = worker.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
        destroy_domains(libvirt_uri, prefix)
    assert not report.errors, report.errors

    # Exactly one result per valid item (duplicates from retries dropped by id).
    with Beanstalk(beanstalkd.address, watch=results_tube(tube)) as bs:
        got = collect_results(bs, want=9, timeout=5)
    res = got.results
    assert sorted(res) == ["late", "n1", "n2", "n3", "n4", "slow", "url-bad", "url-ok", "victim"], events
    assert res["late"]["status"] == "timeout" and res["late"]["duration_s"] < 30
    # URL inputs are fetched on the host (the guest has no network); a failed fetch is an error result.
    assert res["url-ok"]["stdout"] == "fetched by the worker on the host\n"
    assert res["url-bad"]["status"] == "error" and "404" in res["url-bad"]["error"]
    assert res["n1"]["stdout"] == "hello\n" and res["n1"]["outputs"] == {"up.txt": "SEVMTE8K"}
    assert res["n3"]["status"] == "failed" and res["n3"]["exit"] == 3 and res["n3"]["stderr"] == "err\n"
    assert res["slow"]["stdout"] == "slow done\n"
    # The VM running `victim` was destroyed mid-item; another VM completed it.
    assert res["victim"]["stdout"] == "survived\n" and res["victim"]["attempt"] >= 2
    assert res["victim"]["vm"] != killed["victim"]
    assert restarted.is_set() and report.retried >= 3

    # Poison, malformed and oversized items are buried, each with its reason.
    assert main(["queue", "stats", "--server", beanstalkd.server, "--tube", tube, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    reasons = {b["item_id"]: b for b in st["buried"]}
    assert "failed 2 times" in reasons["poison"]["reason"] and "went away" in reasons["poison"]["reason"]
    assert reasons["poison"]["state"] == "buried" and reasons["poison"]["stats"]["buries"] == 1
    malformed = [b["reason"] for b in st["buried"] if b["item_id"] is None]
    assert len(malformed) == 2
    assert any("not valid UTF-8 JSON" in r for r in malformed) and any("more than" in r for r in malformed)
    counts = {k: st["tubes"][tube][k] for k in ("ready", "reserved", "delayed", "buried")}
    assert counts == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 3}

    # Nothing left behind: no domain, no overlay.
    assert domains(libvirt_uri, prefix) == []
    assert not workdir.exists() or list(workdir.iterdir()) == []


def _spawn_worker(server: str, tube: str, image: Path, workdir: Path, uri: str, *extra: str) -> Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    return spawn(
        [
            sys.executable,
            "-m",
            "vmtool",
            "queue",
            "work",
            "--server",
            server,
            "--tube",
            tube,
            "--image",
            os.fspath(image),
            "--vms",
            "1",
            "--memory",
            str(MEMORY_MIB),
            "--workdir",
            os.fspath(workdir),
            "--uri",
            uri,
            "--json",
            *extra,
        ],
        stdout=PIPE,
        stderr=PIPE,
        new_session=True,
    )


def _wait_reserved(bs: Beanstalk, tube: str, proc: Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while _tube_counts(bs, tube)["reserved"] != 1:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < end, "the worker never reserved the item"
        time.sleep(0.3)
    # Reserved happens after the VM said hello; give the item a moment to start in the guest.
    time.sleep(1.5)


def _leftover_cgroups(prefix: str) -> list[Path]:
    from vmtool.launch import cgroups

    layout = cgroups.detect()
    return [p for d in layout.slot.values() if d.is_dir() for p in d.iterdir() if p.name.startswith(prefix)]


def test_worker_sigterm_releases_and_sigkill_requeues(
    beanstalkd: BeanstalkServer, agent_build: Path, libvirt_uri: str, tmp_path: Path
) -> None:
    tube = "sig"
    with Beanstalk(beanstalkd.address, watch=tube) as bs:
        put_items(bs, tube, [Item("job", ["sh", "-c", "sleep 8; echo finished"])], ttr=30)

        # SIGTERM: the item is released at once, the VM shut down, nothing left.
        w1 = _spawn_worker(beanstalkd.server, tube, agent_build, tmp_path / "w1", libvirt_uri)
        prefix1 = f"vmtool-q{w1.pid}-"
        try:
            _wait_reserved(bs, tube, w1)
            w1.send_signal(signal.SIGTERM)
            out, err = w1.communicate(timeout=90)
        finally:
            if w1.poll() is None:
                w1.kill()
                w1.wait()
        assert w1.returncode == 143, err.decode()
        rep = json.loads(out)
        assert rep["terminated"] is True and rep["released"] == 1 and rep["done"] == 0
        assert _tube_counts(bs, tube)["ready"] == 1
        assert domains(libvirt_uri, prefix1) == []
        assert list((tmp_path / "w1").iterdir()) == []
        assert _leftover_cgroups(prefix1) == []

        # SIGKILL: nobody releases anything, but the dropped connection returns the item at once.
        w2 = _spawn_worker(beanstalkd.server, tube, agent_build, tmp_path / "w2", libvirt_uri)
        prefix2 = f"vmtool-q{w2.pid}-"
        try:
            _wait_reserved(bs, tube, w2)
            w2.send_signal(signal.SIGKILL)
            w2.wait(10)
            t0 = time.monotonic()
            while _tube_counts(bs, tube)["ready"] != 1:
                assert time.monotonic() - t0 < 5, "the item did not come back after the worker died"
                time.sleep(0.1)
        finally:
            if w2.poll() is None:
                w2.kill()
                w2.wait()
            for s in (w2.stdout, w2.stderr):
                if s:
                    s.close()
            # The orphaned VM powers itself off once its host is silent; do not wait for that here.
            destroy_domains(libvirt_uri, prefix2)
            for p in _leftover_cgroups(prefix2):
                p.rmdir()

        # Another worker completes it: exactly one result, the lost reservation counted as an attempt.
        w3 = _spawn_worker(
            beanstalkd.server,
            tube,
            agent_build,
            tmp_path / "w3",
            libvirt_uri,
            "--max-items",
            "1",
            "--idle-timeout",
            "1",
        )
        try:
            out, err = w3.communicate(timeout=300)
        finally:
            if w3.poll() is None:
                w3.kill()
                w3.wait()
        assert w3.returncode == 0, err.decode()
        assert json.loads(out)["done"] == 1
    with Beanstalk(beanstalkd.address, watch=results_tube(tube)) as rb:
        got = collect_results(rb, want=1, timeout=5)
    assert list(got.results) == ["job"] and got.duplicates == 0
    r = got.results["job"]
    assert r["status"] == "ok" and r["stdout"] == "finished\n" and r["attempt"] == 2


def test_direct_mode_guest_talks_to_beanstalkd(
    beanstalkd: BeanstalkServer,
    libvirt_uri: str,
    tmp_path: Path,
    default_disk: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The seed's way: the guest agent reserves from beanstalkd itself over user-mode networking."""
    out = tmp_path / "direct-build"
    assert main(["build", os.fspath(default_disk), "-o", os.fspath(out), "--agent", "direct"]) == 0
    capsys.readouterr()
    tube = "dir"
    with Beanstalk(beanstalkd.address) as bs:
        put_items(
            bs,
            tube,
            [
                Item("a", ["uname", "-r"]),
                Item("b", ["sh", "-c", "cat x; echo e >&2; exit 4"], {"x": {"data": "eHl6"}}),
            ],
            ttr=20,
        )
        bs.put(b'{"v":1,"id":"m","cmd":[]}', tube=tube)
    prefix = f"vmtool-qd{os.getpid()}-"
    factory = VMFactory(
        resolve_image(out / "manifest.json"),
        tmp_path / "work",
        memory_mib=MEMORY_MIB,
        uri=libvirt_uri,
        name_prefix=prefix,
        network="user",
    )
    worker = Worker(WorkerOptions(beanstalkd.address, tube, vms=1, idle_timeout=3, mode="direct"), factory)
    try:
        report = worker.run()
    finally:
        destroy_domains(libvirt_uri, prefix)
    assert not report.errors and report.done == 2 and report.vms[0].end_reason == "idle"
    with Beanstalk(beanstalkd.address, watch=results_tube(tube)) as rb:
        got = collect_results(rb, want=2, timeout=5)
    assert got.results["a"]["status"] == "ok" and got.results["a"]["stdout"].strip()
    assert (got.results["b"]["exit"], got.results["b"]["stdout"], got.results["b"]["stderr"]) == (
        4,
        "xyz",
        "e\n",
    )
    with Beanstalk(beanstalkd.address) as bs:
        assert _tube_counts(bs, tube) == {"ready": 0, "reserved": 0, "buried": 1, "delayed": 0}
    assert domains(libvirt_uri, prefix) == []
