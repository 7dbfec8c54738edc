#!/usr/bin/env python3
"""Benchmark the work queue (issue 5). Prints ratio lines against anchors measured in the same run.

1. Queue layer on loopback (one beanstalkd, in memory): items/s through vmtool's own code path for one
   item (put_items with validation -> reserve -> parse_item + stats-job as the worker does -> result
   put -> delete, sent with the next reserve as the worker does) / items/s through raw greenstalk calls on the same JSON bodies (json.dumps -> put ->
   reserve -> json.loads -> put result -> delete). Limit: median of the paired
   rounds' ratios at least 0.7.
2. Items per minute through 2 relay-mode VMs of the demo image (trivial items, VMs already booted),
   and seconds from `put` to result for one item with a warm VM (median of 5). Printed, no limit.

Exits 1 if the limit is not met. Needs beanstalkd, and for part 2 qemu + libvirtd (started if none runs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This file is named queue.py: drop its directory from the path so `import queue` finds the stdlib.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.modules.pop("queue", None)
sys.path.insert(0, str(ROOT))

from vmtool.demo import libvirtd_running, local_beanstalkd  # noqa: E402
from vmtool.queue.beanstalk import Beanstalk, results_tube  # noqa: E402
from vmtool.queue.client import collect_results, put_items  # noqa: E402
from vmtool.queue.items import Item, Result, parse_item  # noqa: E402

N_LAYER = int(os.environ.get("BENCH_QUEUE_ITEMS", "500"))
ROUNDS = int(os.environ.get("BENCH_QUEUE_ROUNDS", "41"))
N_VM_ITEMS = int(os.environ.get("BENCH_VM_ITEMS", "60"))
LIMIT = 0.7


def _items(n: int, tag: str) -> list[Item]:
    return [Item(f"{tag}-{i}", ["sh", "-c", "echo hello; exit 0"]) for i in range(n)]


def vmtool_path(addr: tuple[str, int], tube: str, n: int) -> float:
    """items/s: one item at a time through vmtool's producer and worker-side queue calls."""
    items = _items(n, tube)
    with Beanstalk(addr) as prod, Beanstalk(addr, watch=tube) as work:
        t0 = time.perf_counter()
        for it in items:
            put_items(prod, tube, [it], ttr=60)
            job = work.reserve(timeout=5)
            assert job is not None
            item = parse_item(job.body)
            work.job_counts(job.id)  # the worker reads reserves/releases for its attempt count
            res = Result(item.id, "ok", 0, stdout="hello\n", vm="bench", duration_s=0.01)
            work.put(res.encode(), tube=results_tube(tube), ttr=60)
            work.defer_delete(job.id)  # as the worker does: sent with the next reserve
        work.flush()
        return n / (time.perf_counter() - t0)


def raw_path(addr: tuple[str, int], tube: str, n: int) -> float:
    import greenstalk

    items = _items(n, tube)
    with (
        greenstalk.Client(addr, encoding=None, use=tube) as prod,
        greenstalk.Client(addr, encoding=None, watch=tube) as work,
    ):
        work.use(results_tube(tube))
        t0 = time.perf_counter()
        for it in items:
            # The same JSON bodies, serialized and read without vmtool's validation.
            prod.put(json.dumps(it.to_dict(), separators=(",", ":")).encode(), ttr=60)
            job = work.reserve(timeout=5)
            d = json.loads(job.body)
            res = {"v": 1, "id": d["id"], "status": "ok", "exit": 0, "stdout": "hello\n", "vm": "bench"}
            work.put(json.dumps(res, separators=(",", ":")).encode(), ttr=60)
            work.delete(job)
        return n / (time.perf_counter() - t0)


def drain(addr: tuple[str, int], tube: str) -> None:
    with Beanstalk(addr, watch=tube) as bs:
        while (job := bs.reserve(timeout=0)) is not None:
            bs.delete(job.id)


def part1(addr: tuple[str, int]) -> bool:
    ours: list[float] = []
    raws: list[float] = []
    ratios: list[float] = []
    for r in range(ROUNDS):
        # Alternate which goes first, so a burst of load elsewhere on the machine hits both alike.
        if r % 2:
            raw = raw_path(addr, f"bench-r{r}", N_LAYER)
            our = vmtool_path(addr, f"bench-v{r}", N_LAYER)
        else:
            our = vmtool_path(addr, f"bench-v{r}", N_LAYER)
            raw = raw_path(addr, f"bench-r{r}", N_LAYER)
        ours.append(our)
        raws.append(raw)
        ratios.append(our / raw)
        drain(addr, f"bench-v{r}.results")
        drain(addr, f"bench-r{r}.results")
    ratio = statistics.median(ratios)
    ok = ratio >= LIMIT
    print(
        f"queue layer: vmtool put->reserve->result->delete {statistics.median(ours):.0f} items/s / raw "
        f"greenstalk {statistics.median(raws):.0f} items/s = {ratio:.2f} (median of {ROUNDS} paired rounds "
        f"of {N_LAYER}; limit >= {LIMIT}) {'OK' if ok else 'FAIL'}"
    )
    return ok


def part2(addr: tuple[str, int], top: Path) -> None:
    from vmtool.image.build import build
    from vmtool.image.options import BuildOptions
    from vmtool.queue.agent import AgentMode
    from vmtool.queue.vms import VMFactory, resolve_image
    from vmtool.queue.worker import Worker, WorkerOptions
    from vmtool.recipe.create import make_default_disk

    disk = top / "default.raw"
    make_default_disk(disk)
    res = build(BuildOptions(source=disk, outdir=top / "build", agent=AgentMode.RELAY))
    tube = "bench-vm"
    ready: list[float] = []
    results: list[float] = []
    lock = threading.Lock()

    def on_event(what: str, data: dict[str, Any]) -> None:
        with lock:
            if what == "ready":
                ready.append(time.monotonic())
            elif what == "result":
                results.append(time.monotonic())

    factory = VMFactory(
        resolve_image(res.outdir / "manifest.json"),
        top / "work",
        memory_mib=512,
        name_prefix="vmtool-bench-",
    )
    worker = Worker(WorkerOptions(addr, tube, vms=2, idle_timeout=120), factory, on_event=on_event)
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 600
        while len(ready) < 2:
            if time.monotonic() > end or not t.is_alive():
                raise SystemExit(f"bench: VMs did not boot: {worker.report.errors}")
            time.sleep(0.2)
        with Beanstalk(addr) as bs:
            t0 = time.monotonic()
            put_items(bs, tube, _items(N_VM_ITEMS, "vm"), ttr=60)
        with Beanstalk(addr, watch=results_tube(tube)) as rb:
            got = collect_results(rb, want=N_VM_ITEMS, timeout=600)
        t1 = max(results)
        assert len(got.results) == N_VM_ITEMS
        per_min = N_VM_ITEMS / (t1 - t0) * 60
        per_vm = {v.name: v.items for v in worker.report.vms}
        print(
            f"2 relay-mode VMs (TCG): {per_min:.0f} items/minute ({N_VM_ITEMS} trivial items, VMs warm; "
            f"per VM {sorted(per_vm.values())})"
        )
        lat = []
        with Beanstalk(addr) as bs, Beanstalk(addr, watch=results_tube(tube)) as rb:
            for i in range(5):
                t0 = time.monotonic()
                put_items(bs, tube, [Item(f"one-{i}", ["true"])], ttr=60)
                one = collect_results(rb, want=1, timeout=120)
                assert len(one.results) == 1
                lat.append(time.monotonic() - t0)
                time.sleep(0.5)
        print(
            f"put -> result for one item with a warm VM: {statistics.median(lat):.3f} s (median of 5, "
            f"min {min(lat):.3f} s)"
        )
    finally:
        worker.stop()
        t.join(120)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vmtool-bench-queue-") as d:
        top = Path(d)
        # Part 1 uses an in-memory beanstalkd (no binlog), like the published numbers.
        from vmtool.run import DEVNULL, find_tool, spawn

        port = _port()
        proc = spawn(
            [find_tool("beanstalkd"), "-l", "127.0.0.1", "-p", str(port)], stdout=DEVNULL, stderr=DEVNULL
        )
        try:
            _wait_port(port)
            ok = part1(("127.0.0.1", port))
        finally:
            proc.terminate()
            proc.wait(10)
        if os.environ.get("BENCH_QUEUE_SKIP_VMS") != "1":
            with (
                libvirtd_running("qemu:///system", lambda s: None, top),
                local_beanstalkd(top / "binlog") as addr,
            ):
                part2(addr, top)
    return 0 if ok else 1


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    import socket

    end = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
