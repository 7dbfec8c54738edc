#!/usr/bin/env python3
"""A discrete-event model (simpy) of a whole pool staging one VM image, fed by figures measured here.

Measured in this run (the model has no other inputs; the image size and the item length are settings):
  * one warm `vmtool stage` process (median of 5): startup, HEAD, index hit, overlay;
  * fetch throughput of whole `vmtool stage` processes: one alone (median of 3), from the origin
    directly and from a real Squid holding the image (Debian's squid, tests/fixtures/squid.py); and
    8 at once (--nodes), each round on a new image, directly and through the Squid (where the 8
    misses collapse into one origin fetch). The aggregate is taken at the validation's number of
    fetchers because on this shared 2-core machine the CPU share a group of processes gets grows
    with its size (CFS shares the cores among every runnable task, other people's included);
  * the queue layer's operations per second: a real beanstalkd driven by vmtool's queue client the
    way a worker drives it (put, reserve, stats-job, put result, delete);
  * the boot time of a real guest under qemu (TCG here), once; `--boot-seconds S` gives it instead.

Validation: in each round, right after the calibration, a real run here - 8 caches ("nodes") x 2
slots, 16 `vmtool stage` processes started at once on a new image, through one Squid from a real
origin, and the same directly - against the model of that run on this machine (origin, Squid and
nodes all share its cores, so the model's one "host" link is the machine). What it checks beyond
the calibration: the per-node lock (the second slot waits, then stages warm), the stagers' own work
competing for the cores, the collapsed miss, and the origin's body bytes. The model's error (median
over rounds) is printed; it must be within 25 %.

Prediction: N nodes x M slots (10, 100, 1000 x 8), with and without a site Squid: the time until
every slot runs a VM, the bytes served by the origin and by Squid, and beanstalkd operations per
second at the peak (each VM takes an item every --item-seconds; the peak is the busiest second once
all VMs run). Nodes are separate machines: each fetches at most as fast as one stager did here. The
first table keeps the origin and the Squid at what they served 8 stagers here; the second puts them
on a site's links (--origin-gbit, default a 1 Gbit/s WAN share; --squid-gbit, default 10). Prints
lines for bench/RESULTS.md and the tables of docs/scale.md. Exits 1 if the validation error is over
25 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simpy  # noqa: E402

from tests.fixtures.squid import Origin, Squid, env_for, run_origin  # noqa: E402
from vmtool.errors import VmtoolError  # noqa: E402
from vmtool.run import PIPE, Popen, spawn  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
LIMIT = 0.25
BOOT_FALLBACK = 13.7  # s: bench/launch.py's qemu-direct median under TCG (bench/RESULTS.md, launch)
ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "3"))
OPS_PER_ITEM = 5  # reserve, stats-job, put result, delete, and the producer's put


# --- measurements ----------------------------------------------------------------------------------


def random_image(path: Path, size: int) -> Path:
    """Random data with an MBR signature: no holes, so every byte costs what a real image's data costs."""
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


def stager(url: str, cache: Path, env: dict[str, str], name: str = "vm.qcow2") -> Popen[bytes]:
    argv = [sys.executable, "-m", "vmtool", "stage", url, "--format", "raw", "--force", "--json"]
    argv += ["--into", os.fspath(cache.parent / f"job-{cache.name}"), "--name", name]
    argv += ["--cache", os.fspath(cache)]
    return spawn(argv, env=env, stdout=PIPE, stderr=PIPE, cwd=ROOT)


def run_stagers(url: str, caches: list[Path], env: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
    """Start one stager per cache at once; wall time until the last one is done, and their results."""
    t0 = time.monotonic()
    procs = [stager(url, c, env) for c in caches]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"stage failed: {e.decode().strip()}")
        out.append(json.loads(o))
    return time.monotonic() - t0, out


@dataclass
class Figures:
    size: int  # bytes of the measured image
    ncores: int
    t_warm: float  # s, one warm stage process
    r1_direct: float  # B/s, one stager alone from the origin (fetch part only)
    agg_direct: float  # B/s, what the origin delivered to --nodes stagers at once
    r1_squid: float  # B/s, one stager alone from a Squid holding the image
    agg_squid: float  # B/s, what the Squid delivered to --nodes stagers at once
    queue_ops: float  # beanstalkd operations/s through vmtool's client
    boot: float  # s, one guest boot
    boot_how: str


class Bench:
    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.size = size
        self.n = 0

    def caches(self, k: int) -> list[Path]:
        out = []
        for _ in range(k):
            self.n += 1
            out.append(self.work / f"cache{self.n}")
        return out

    def drop(self) -> None:
        """Remove the caches made so far (GiBs of bases), keeping the numbering."""
        for p in self.work.glob("cache*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.work.glob("job-cache*"):
            shutil.rmtree(p, ignore_errors=True)

    def fetch_rate(self, url: str, env: dict[str, str], k: int, t_warm: float, ncores: int) -> float:
        """B/s the fetch itself ran at: wall time minus the stagers' own work (t_warm each, on ncores)."""
        wall, res = run_stagers(url, self.caches(k), env)
        assert all(not r["cache_hit"] for r in res)
        self.drop()
        own = t_warm * (1 if k == 1 else k / min(k, ncores))
        return k * self.size / max(wall - own, 1e-3)


def measure_warm(b: Bench, url: str) -> float:
    (cache,) = b.caches(1)
    run_stagers(url, [cache], env_for(None))
    times = []
    for _ in range(5):
        wall, res = run_stagers(url, [cache], env_for(None))
        assert res[0]["cache_hit"]
        times.append(wall)
    b.drop()
    return statistics.median(times)


def measure_queue(work: Path, n: int = 400) -> float:
    from vmtool.demo import local_beanstalkd
    from vmtool.queue.beanstalk import Beanstalk, results_tube
    from vmtool.queue.client import put_items
    from vmtool.queue.items import Item, ItemResult, parse_item

    rates = []
    with local_beanstalkd(work / "binlog") as addr:
        for r in range(3):
            tube = f"scale{r}"
            items = [Item(f"i{i}", ["true"]) for i in range(n)]
            with Beanstalk(addr) as prod, Beanstalk(addr, watch=tube) as wk:
                t0 = time.perf_counter()
                for it in items:
                    put_items(prod, tube, [it], ttr=60)
                    job = wk.reserve(timeout=5)
                    assert job is not None
                    item = parse_item(job.body)
                    wk.job_counts(job.id)
                    wk.put(ItemResult(item.id, "ok", 0, vm="scale").encode(), tube=results_tube(tube), ttr=60)
                    wk.defer_delete(job.id)
                wk.flush()
                rates.append(OPS_PER_ITEM * n / (time.perf_counter() - t0))
    return statistics.median(rates)


def measure_boot(work: Path) -> float:
    """Wall time of one real boot-to-poweroff of a small guest (host kernel, busybox root) under qemu."""
    import importlib.util

    from tests.fixtures.libvirtd import make_guest

    spec = importlib.util.spec_from_file_location("bench_launch", ROOT / "bench" / "launch.py")
    assert spec and spec.loader
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    manifest, img = make_guest(work / "guest", "scale", {"10-hello": "#!/bin/sh\necho hello\n"})
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    emulator = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    try:
        return float(launch.time_qemu(None, emulator, accel, manifest, img, work / "guest"))
    except (SystemExit, VmtoolError):
        if accel == "kvm":  # /dev/kvm exists but does not work for guests here (nested, no MSRs)
            return float(launch.time_qemu(None, emulator, "tcg", manifest, img, work / "guest"))
        raise


# --- the model ---------------------------------------------------------------------------------------


class Link:
    """A capacity shared equally by the flows crossing it (each flow also has its own cap)."""

    def __init__(self, name: str, capacity: float) -> None:
        self.name = name
        self.capacity = capacity
        self.flows: set[Flow] = set()
        self.carried = 0.0
        self.busy = 0.0  # seconds at which its flows used all of it


@dataclass(eq=False)
class Flow:
    work: float  # in the units of its links' capacities (bytes, or host-seconds)
    cap: float
    links: list[Link]
    done: simpy.Event
    rate: float = 0.0


class Network:
    """Fluid max-min-like sharing: a flow runs at min(its cap, each link's capacity / its flow count)."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.flows: set[Flow] = set()
        self.last = 0.0
        self.wake = env.event()
        env.process(self._run())

    def transfer(self, work: float, cap: float, links: list[Link]) -> simpy.Event:
        self._advance()
        f = Flow(work, cap, links, self.env.event())
        self.flows.add(f)
        for ln in links:
            ln.flows.add(f)
        self._poke()
        return f.done

    def _advance(self) -> None:
        dt = self.env.now - self.last
        self.last = self.env.now
        if dt <= 0:
            return
        for f in self.flows:
            f.work -= f.rate * dt
            for ln in f.links:
                ln.carried += f.rate * dt
        links = {ln for f in self.flows for ln in f.links}
        for ln in links:
            if sum(f.rate for f in ln.flows) >= ln.capacity * 0.999:
                ln.busy += dt

    def _rates(self) -> None:
        for f in self.flows:
            f.rate = min([f.cap] + [ln.capacity / len(ln.flows) for ln in f.links])

    def _poke(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def _run(self) -> Generator[simpy.Event, Any, None]:
        while True:
            finished = [f for f in self.flows if f.work <= 1e-9 * max(1.0, f.cap)]
            for f in finished:
                self.flows.discard(f)
                for ln in f.links:
                    ln.flows.discard(f)
                f.done.succeed()
            self._rates()
            self.wake = self.env.event()
            if not self.flows:
                yield self.wake
                self._advance()
                continue
            nxt = min(f.work / f.rate for f in self.flows if f.rate > 0)
            yield self.wake | self.env.timeout(nxt)
            self._advance()


@dataclass
class Scenario:
    nodes: int
    slots: int
    squid: bool
    size: int  # image bytes
    host_mode: bool  # True: everything runs on this one machine (validation); False: a real pool
    item_seconds: float = 10.0
    queue_window: float = 0.0  # seconds of queue traffic simulated after the last VM is up


@dataclass
class Outcome:
    all_staged: float
    all_running: float
    origin_bytes: float
    squid_bytes: float
    peak_ops: float
    queue_saturated: bool
    busiest: str
    utilisation: dict[str, float] = field(default_factory=dict)


def simulate(sc: Scenario, fig: Figures) -> Outcome:
    env = simpy.Environment()
    net = Network(env)
    if sc.host_mode:
        # One machine: every process shares its cores; a fetch costs 1/agg host-seconds per byte.
        host = Link("this machine", 1.0)
        origin_l, squid_l = host, host
        direct = (1.0 / fig.agg_direct, fig.r1_direct / fig.agg_direct)
        via_squid = (1.0 / fig.agg_squid, fig.r1_squid / fig.agg_squid)
    else:
        origin_l = Link("origin", fig.agg_direct)
        squid_l = Link("site squid", fig.agg_squid)
        direct = (1.0, fig.r1_direct)
        via_squid = (1.0, fig.r1_squid)
    origin_bytes = 0.0
    squid_bytes = 0.0
    upstream: dict[str, simpy.Event] = {}
    staged: list[float] = []
    running: list[float] = []
    queue = simpy.Resource(env, capacity=1)
    served_ops: list[float] = []

    def startup() -> Generator[simpy.Event, Any, None]:
        if sc.host_mode:
            # A stager process is single-threaded: at most one core of the machine, t_warm of work.
            c = 1.0 / fig.ncores
            yield net.transfer(fig.t_warm * c, c, [host])
        else:
            yield env.timeout(fig.t_warm)  # on the node's own cores

    def fetch(node: int) -> Generator[simpy.Event, Any, None]:
        nonlocal origin_bytes, squid_bytes
        size = float(sc.size)
        if not sc.squid:
            origin_bytes += size
            per, cap = direct
            yield net.transfer(size * per, cap, [origin_l])
            return
        squid_bytes += size
        first = "image" not in upstream
        if first:
            # The first miss: Squid fetches from the origin once; concurrent misses collapse onto it.
            # On this one machine that fetch is part of the calibrated through-squid rate already.
            origin_bytes += size
            per, cap = direct
            upstream["image"] = (
                net.transfer(size * per, cap, [origin_l]) if not sc.host_mode else env.timeout(0)
            )
        per, cap = via_squid
        own = net.transfer(size * per, cap, [squid_l])
        yield own & upstream["image"]

    def queue_op() -> Generator[simpy.Event, Any, None]:
        with queue.request() as req:
            yield req
            yield env.timeout(1.0 / fig.queue_ops)
            served_ops.append(env.now)

    def vm(end: float) -> Generator[simpy.Event, Any, None]:
        # A booted VM's worker: reserve, then per item its ops, one item every item_seconds.
        while env.now < end:
            for _ in range(OPS_PER_ITEM):
                yield env.process(queue_op())
            yield env.timeout(sc.item_seconds)

    def node(i: int, node_done: list[simpy.Event]) -> Generator[simpy.Event, Any, None]:
        locked = env.event()

        def slot(j: int) -> Generator[simpy.Event, Any, None]:
            yield env.process(startup())
            if j == 0:
                yield env.process(fetch(i))  # takes the source lock; the others wait for it
                locked.succeed()
            else:
                yield locked  # then an index hit and an overlay, inside their own startup work
            staged.append(env.now)
            if sc.host_mode:
                return
            yield env.timeout(fig.boot)
            running.append(env.now)

        procs = [env.process(slot(j)) for j in range(sc.slots)]
        yield simpy.AllOf(env, procs)
        node_done[i].succeed()

    done = [env.event() for _ in range(sc.nodes)]
    for i in range(sc.nodes):
        env.process(node(i, done))
    env.run(until=simpy.AllOf(env, done))
    all_staged = max(staged)
    all_running = max(running) if running else all_staged
    peak = 0.0
    saturated = False
    if not sc.host_mode and sc.queue_window > 0:
        end = all_running + sc.queue_window
        # Steady state once every VM is up: each worker at a random phase within its item period.
        rng = random.Random(1)
        for _ in running:
            env.process(_delayed(env, rng.uniform(0, sc.item_seconds), vm, end))
        env.run(until=end)
        if served_ops:
            buckets: dict[int, int] = {}
            for t in served_ops:
                buckets[int(t)] = buckets.get(int(t), 0) + 1
            peak = float(max(buckets.values()))
        demand = sc.nodes * sc.slots * OPS_PER_ITEM / sc.item_seconds
        saturated = demand > fig.queue_ops * 0.95
    links = [origin_l] if sc.host_mode else ([origin_l, squid_l] if sc.squid else [origin_l])
    util = {ln.name: ln.busy / all_staged for ln in links}
    busiest = max(util, key=lambda k: util[k])
    return Outcome(all_staged, all_running, origin_bytes, squid_bytes, peak, saturated, busiest, util)


def _delayed(
    env: simpy.Environment,
    delay: float,
    fn: Callable[[float], Generator[simpy.Event, Any, None]],
    end: float,
) -> Generator[simpy.Event, Any, None]:
    yield env.timeout(max(0.0, delay))
    yield env.process(fn(end))


# --- the run ------------------------------------------------------------------------------------------


def measure_and_validate(
    work: Path, origin: Origin, squid: Squid, size: int, boot: float | None, nodes: int, slots: int
) -> tuple[Figures, list[tuple[str, float, float]]]:
    """The figures, then rounds of (calibrate, validate) side by side so the machine's load drifts
    little between a figure and the run it predicts. Every calibration and validation image is new
    bytes, so each is a miss in the Squid as well as in the caches."""
    ncores = os.cpu_count() or 1
    b = Bench(work, size)
    random_image(origin.root / "cal.img", size)
    url = origin.url("cal.img")
    t_warm = measure_warm(b, url)
    direct, sq = env_for(None), env_for(squid.location)
    run_stagers(url, b.caches(1), sq)  # the Squid now holds cal.img
    b.drop()
    r1_direct = statistics.median(b.fetch_rate(url, direct, 1, t_warm, ncores) for _ in range(3))
    r1_squid = statistics.median(b.fetch_rate(url, sq, 1, t_warm, ncores) for _ in range(3))
    agg: dict[bool, list[float]] = {True: [], False: []}
    walls: dict[bool, list[float]] = {True: [], False: []}
    served: dict[bool, list[int]] = {True: [], False: []}
    n_img = 0

    def fresh() -> str:
        nonlocal n_img
        n_img += 1
        name = f"img{n_img}.img"
        random_image(origin.root / name, size)
        origin.reset()
        return name

    for r in range(ROUNDS):
        for use_squid in (True, False) if r % 2 == 0 else (False, True):
            env = sq if use_squid else direct
            # Calibrate: `nodes` stagers at once, one slot each (through Squid their misses collapse).
            name = fresh()
            agg[use_squid].append(b.fetch_rate(origin.url(name), env, nodes, t_warm, ncores))
            (origin.root / name).unlink()
            # Validate: `nodes` caches x `slots` stagers each, all started at once.
            name = fresh()
            caches = b.caches(nodes)
            wall, res = run_stagers(origin.url(name), [c for c in caches for _ in range(slots)], env)
            want = f"proxy http://{squid.location} (OSG_SQUID_LOCATION)" if use_squid else "direct"
            assert all(x["fetched_via"] in (want, "") for x in res), res
            assert sum(not x["cache_hit"] for x in res) == nodes, res
            walls[use_squid].append(wall)
            served[use_squid].append(origin.body_bytes(name))
            b.drop()
            (origin.root / name).unlink()
    queue_ops = measure_queue(work)
    how = "given with --boot-seconds"
    if boot is None:
        try:
            boot, how = (
                measure_boot(work),
                "one real boot-to-poweroff of a busybox guest under qemu, measured here",
            )
        except (SystemExit, VmtoolError) as e:
            boot = BOOT_FALLBACK
            how = f"the boot here failed ({e}); bench/RESULTS.md's TCG qemu-direct median used instead"
    fig = Figures(
        size,
        ncores,
        t_warm,
        r1_direct,
        statistics.median(agg[False]),
        r1_squid,
        statistics.median(agg[True]),
        queue_ops,
        boot,
        how,
    )
    out = []
    for use_squid in (True, False):
        model = simulate(Scenario(nodes, slots, use_squid, size, host_mode=True), fig)
        tag = "through squid" if use_squid else "direct"
        rounds = "/".join(f"{w:.1f}" for w in walls[use_squid])
        out.append(
            (
                f"time until all {nodes}x{slots} slots staged, {tag} (s; rounds {rounds})",
                statistics.median(walls[use_squid]),
                model.all_staged,
            )
        )
        out.append(
            (f"origin body bytes, {tag} (MiB)", max(served[use_squid]) / MiB, model.origin_bytes / MiB)
        )
    return fig, out


def predict(fig: Figures, size: int, item_seconds: float) -> list[tuple[Scenario, Outcome]]:
    rows = []
    for n in (10, 100, 1000):
        for use_squid in (False, True):
            sc = Scenario(
                n,
                8,
                use_squid,
                size,
                host_mode=False,
                item_seconds=item_seconds,
                queue_window=3 * item_seconds,
            )
            rows.append((sc, simulate(sc, fig)))
    return rows


def fmt_rate(r: float) -> str:
    return f"{r / MiB:.0f} MiB/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--image-mib",
        type=int,
        default=int(os.environ.get("BENCH_SCALE_IMAGE_MIB", "256")),
        help="size of the measured and validated image (default 256)",
    )
    ap.add_argument(
        "--predict-gib", type=float, default=2.0, help="image size in the predictions (default 2)"
    )
    ap.add_argument(
        "--item-seconds", type=float, default=10.0, help="one queue item per VM every S s (default 10)"
    )
    ap.add_argument("--nodes", type=int, default=8, help="caches in the validation run (default 8)")
    ap.add_argument(
        "--slots", type=int, default=2, help="stagers per cache in the validation run (default 2)"
    )
    ap.add_argument("--boot-seconds", type=float, help="use this boot time instead of booting a guest")
    ap.add_argument(
        "--origin-gbit",
        type=float,
        default=1.0,
        help="second prediction table: the site's share of the origin, Gbit/s (default 1)",
    )
    ap.add_argument(
        "--squid-gbit",
        type=float,
        default=10.0,
        help="second prediction table: the site squid's link, Gbit/s (default 10)",
    )
    args = ap.parse_args(argv)
    if shutil.which("squid") is None:
        print("scale: squid is not installed (make deps)", file=sys.stderr)
        return 2
    base = Path(os.environ.get("VMTOOL_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="vmtool-bench-scale.", dir=base))
    squid = Squid()
    try:
        squid.start()
        with run_origin(work / "origin") as origin:
            fig, checks = measure_and_validate(
                work, origin, squid, args.image_mib * MiB, args.boot_seconds, args.nodes, args.slots
            )
    finally:
        squid.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    size = int(args.predict_gib * GiB)
    site = dataclasses.replace(
        fig, agg_direct=args.origin_gbit * 1e9 / 8, agg_squid=args.squid_gbit * 1e9 / 8
    )
    tables = [
        ("links as measured on this machine", predict(fig, size, args.item_seconds)),
        (
            f"origin reached over a {args.origin_gbit:g} Gbit/s WAN share, site squid on a {args.squid_gbit:g} Gbit/s "
            "link, nodes as measured here",
            predict(site, size, args.item_seconds),
        ),
    ]
    return report(fig, checks, tables, args)


def report(
    fig: Figures,
    checks: list[tuple[str, float, float]],
    tables: list[tuple[str, list[tuple[Scenario, Outcome]]]],
    args: argparse.Namespace,
) -> int:
    load = os.getloadavg()[0]
    print(
        f"scale: measured: warm stage {fig.t_warm:.2f} s; fetch 1 stager direct {fmt_rate(fig.r1_direct)}, "
        f"{args.nodes} at once {fmt_rate(fig.agg_direct)}; through squid 1 alone (hit) {fmt_rate(fig.r1_squid)}, "
        f"{args.nodes} at once (one collapsed miss) {fmt_rate(fig.agg_squid)}; beanstalkd {fig.queue_ops:.0f} ops/s via vmtool's client; "
        f"boot {fig.boot:.1f} s ({fig.boot_how}) [{fig.size // MiB} MiB image, {fig.ncores} cores, "
        f"load {load:.1f}]"
    )
    worst = 0.0
    for what, real, model in checks:
        err = abs(model - real) / real if real else math.inf
        worst = max(worst, err)
        print(f"scale: validation: {what}: real {real:.2f}, model {model:.2f}, error {100 * err:.0f}%")
    ok = worst <= LIMIT
    print(f"scale: model error {100 * worst:.0f}% (limit {100 * LIMIT:.0f}%) {'OK' if ok else 'FAIL'}")
    print(
        f"scale: prediction, {args.predict_gib:g} GiB image, 8 slots per node, one queue item per VM every "
        f"{args.item_seconds:g} s ({OPS_PER_ITEM} beanstalkd ops each); all jobs start at t=0"
    )
    for title, rows in tables:
        print_table(title, rows)
    return 0 if ok else 1


def print_table(title: str, rows: list[tuple[Scenario, Outcome]]) -> None:
    print(f"scale: {title}:")
    head = "| nodes x slots | site squid | every slot runs a VM | origin served | squid served | beanstalkd peak | first bottleneck |"
    print("scale: " + head)
    print("scale: |---|---|---|---|---|---|---|")
    for sc, o in rows:
        demand = sc.nodes * sc.slots * OPS_PER_ITEM / sc.item_seconds
        q = f"{o.peak_ops:.0f} ops/s (demand {demand:.0f}{', saturated' if o.queue_saturated else ''})"
        neck = o.busiest + (f" ({100 * o.utilisation[o.busiest]:.0f}% busy)")
        if o.queue_saturated:
            neck = f"beanstalkd, then {neck}"
        print(
            f"scale: | {sc.nodes} x {sc.slots} | {'yes' if sc.squid else 'no'} | {o.all_running:.0f} s "
            f"(staged {o.all_staged:.0f} s) | {o.origin_bytes / GiB:.0f} GiB | {o.squid_bytes / GiB:.0f} GiB | "
            f"{q} | {neck} |"
        )


if __name__ == "__main__":
    sys.exit(main())
