"""`vmtool demo` / `make demo`: the main job end to end on this machine, then everything removed.

Builds the embedded default image as an installer-style whole disk (GPT, /boot partition, LVM root),
runs `vmtool build --agent relay` on it, starts a private beanstalkd (loopback, binlog), stages the
build as a qcow2 overlay (private cache), creates a slot cgroup, runs the queue worker with two VMs in
it, puts ten items, and reports the results and what each VM used. libvirtd is started (and stopped
again) only if none answers. Progress lines go to stderr on a terminal.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmtool.errors import VmtoolError
from vmtool.run import DEVNULL, PIPE, Popen, find_tool, run, spawn

Say = Callable[[str], None]

WORDS = (
    "At least once, never silently lost: the worker touches reserved items while the VM works.\n"
    "The VM never needs credentials or a route to the queue.\n"
)

# Ten small items that show inputs, outputs, stdout/stderr, exit codes and the guest's view.
DEMO_ITEMS: list[dict[str, Any]] = [
    {"id": "hello", "cmd": ["sh", "-c", "echo hello from $(hostname), kernel $(uname -r)"]},
    {"id": "cpus", "cmd": ["sh", "-c", "grep -c ^processor /proc/cpuinfo"]},
    {"id": "memory", "cmd": ["sh", "-c", "grep MemTotal /proc/meminfo"]},
    {
        "id": "wordcount",
        "cmd": ["wc", "-w", "words.txt"],
        "inputs": {"words.txt": {"data": base64.b64encode(WORDS.encode()).decode()}},
    },
    {
        "id": "checksum",
        "cmd": ["sh", "-c", "sha256sum words.txt | cut -c1-16"],
        "inputs": {"words.txt": {"data": base64.b64encode(WORDS.encode()).decode()}},
    },
    {
        "id": "primes",
        "cmd": [
            "sh",
            "-c",
            "n=2; c=0; while [ $n -lt 300 ]; do d=2; p=1; "
            "while [ $((d*d)) -le $n ]; do [ $((n%d)) -eq 0 ] && p=0 && break; d=$((d+1)); done; "
            "c=$((c+p)); n=$((n+1)); done; echo $c primes below 300",
        ],
    },
    {"id": "output-file", "cmd": ["sh", "-c", "seq 1 5 > $VMTOOL_OUTDIR/seq.txt; echo wrote seq.txt"]},
    {"id": "stderr", "cmd": ["sh", "-c", "echo to stderr >&2; exit 3"]},
    {"id": "no-network", "cmd": ["sh", "-c", "ls /sys/class/net | tr '\\n' ' '; echo"]},
    {"id": "root-fs", "cmd": ["sh", "-c", "df -h / | tail -1"]},
]


# The seed's flow ("Virtual Machines for OSG"): download a file, process it, upload the result. The
# input comes from an HTTP server on loopback, the output goes to moto's S3 server on loopback (or to a
# file:// directory when moto is not installed); the VM itself has no network.
SEED_INPUT_BYTES = 4 << 20
SEED_CMD = [
    "sh",
    "-c",
    "gzip -c survey.dat > $VMTOOL_OUTDIR/survey.dat.gz && sha256sum survey.dat | cut -c1-16 && "
    "cd $VMTOOL_OUTDIR && stat -c '%s %n' survey.dat.gz",
]


@dataclass
class DemoOptions:
    items: int = 10
    vms: int = 2
    memory_mib: int = 512
    workdir: Path | None = None
    uri: str = "qemu:///system"
    use_cgroup: bool = True
    timeout: float = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _virsh_answers(uri: str) -> bool:
    try:
        return run(["virsh", "-c", uri, "version"], check=False, timeout=20).returncode == 0
    except VmtoolError:
        return False


@contextlib.contextmanager
def libvirtd_running(uri: str, say: Say, logdir: Path) -> Iterator[None]:
    """Use the running libvirtd, or start virtlogd + libvirtd for the demo and stop them afterwards."""
    if _virsh_answers(uri):
        yield
        return
    if uri != "qemu:///system":
        raise VmtoolError(
            f"libvirt at {uri} does not answer", hint="start libvirtd, or use the default --uri"
        )
    say("starting libvirtd (none is running)")
    procs: list[Popen[bytes]] = []
    try:
        for name in ("virtlogd", "libvirtd"):
            log = open(logdir / f"{name}.log", "wb")
            procs.append(spawn([find_tool(name)], stdout=log, stderr=log, new_session=True))
            log.close()
        end = time.monotonic() + 60
        while not _virsh_answers(uri):
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                raise VmtoolError("libvirtd did not start", hint=f"see {logdir}/libvirtd.log")
            time.sleep(0.5)
        yield
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except Exception:
                    p.kill()
                    p.wait()


@contextlib.contextmanager
def local_beanstalkd(binlog: Path) -> Iterator[tuple[str, int]]:
    port = _free_port()
    binlog.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        [find_tool("beanstalkd"), "-l", "127.0.0.1", "-p", str(port), "-b", os.fspath(binlog)],
        stdout=DEVNULL,
        stderr=PIPE,
    )
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise VmtoolError(f"beanstalkd did not start: {err.strip()[-200:]}") from None
                time.sleep(0.05)
        yield ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def _slot_cgroup(opts: DemoOptions, say: Say) -> Iterator[str | None]:
    """A slot cgroup like the one a batch system gives a job, holding the VMs' own groups."""
    if not opts.use_cgroup:
        yield None
        return
    from vmtool.errors import CgroupError
    from vmtool.launch import cgroups

    name = f"vmtool-demo-{os.getpid()}"
    try:
        slot = cgroups.create(
            name, memory_bytes=opts.vms * (opts.memory_mib + 512) << 20, cpus=opts.vms, parent="/"
        )
    except CgroupError as e:
        say(f"no slot cgroup ({e.message}); the VMs stay where libvirt puts them")
        yield None
        return
    say(f"slot cgroup: {slot.describe()}")
    try:
        yield "/" + name
    finally:
        slot.remove()


@contextlib.contextmanager
def _http_server(root: Path) -> Iterator[str]:
    """A read-only HTTP server for `root` on a loopback port (the seed's file-sharing service)."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=os.fspath(root))
    )
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def _seed_output(top: Path, say: Say) -> Iterator[tuple[str, str | None, Path]]:
    """(output_url, S3 endpoint, file:// root): moto's S3 server on loopback if moto is installed (the
    dev extras), else a directory in the demo's workdir."""
    out_root = top / "outputs"
    out_root.mkdir()
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        say(
            "moto is not installed (pip install 'moto[server]'): the seed item uploads to a file:// directory"
        )
        yield f"file://{out_root}/{{id}}/", None, out_root
        return
    import boto3

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto takes any credentials; only set them (for this process, while the demo runs) if none are.
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vmtool-demo")
        say(f"moto's S3 server on {endpoint} (bucket vmtool-demo)")
        yield "s3://vmtool-demo/results/{id}/", endpoint, out_root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def run_demo(opts: DemoOptions, say: Say) -> dict[str, Any]:
    from vmtool.image.build import build
    from vmtool.image.options import BuildOptions
    from vmtool.queue.agent import AgentMode
    from vmtool.queue.beanstalk import Beanstalk, results_tube
    from vmtool.queue.client import collect_results, put_items
    from vmtool.queue.items import item_from_dict
    from vmtool.queue.vms import VMFactory, resolve_image
    from vmtool.queue.worker import Worker, WorkerOptions
    from vmtool.recipe.create import make_default_disk
    from vmtool.stage.cache import Cache
    from vmtool.stage.sources import parse_source
    from vmtool.stage.stage import stage

    if not 1 <= opts.items <= 1000 or not 1 <= opts.vms <= 8:
        raise VmtoolError("the demo runs 1-1000 items on 1-8 VMs")
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    def timed(label: str, t0: float) -> None:
        timings[label] = round(time.monotonic() - t0, 2)

    items = [
        item_from_dict(
            dict(
                DEMO_ITEMS[i % len(DEMO_ITEMS)],
                v=1,
                id=f"{i + 1:02d}-{DEMO_ITEMS[i % len(DEMO_ITEMS)]['id']}",
            )
        )
        for i in range(opts.items)
    ]
    with contextlib.ExitStack() as stack:
        if opts.workdir is not None:
            opts.workdir.mkdir(parents=True, exist_ok=True)
        top = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmtool-demo-", dir=opts.workdir)))

        t0 = time.monotonic()
        say("building the default image as an installer-style disk (GPT, /boot partition, LVM root)")
        disk = top / "default.raw"
        facts = make_default_disk(disk)
        timed("disk", t0)

        t0 = time.monotonic()
        say("vmtool build --agent relay: extracting the root filesystem, installing the guest agent")
        res = build(BuildOptions(source=disk, outdir=top / "build", agent=AgentMode.RELAY))
        manifest = res.outdir / "manifest.json"
        disk.unlink()  # the build holds all the VMs need
        timed("build", t0)

        t0 = time.monotonic()
        say("staging the build as a qcow2 overlay (node-local cache)")
        staged = stage(
            parse_source(os.fspath(manifest)),
            top / "sandbox",
            Cache.open(os.fspath(top / "cache")),
            name="root.qcow2",
            progress=False,
        )
        timed("stage", t0)

        stack.enter_context(libvirtd_running(opts.uri, say, top))
        addr = stack.enter_context(local_beanstalkd(top / "binlog"))
        say(f"beanstalkd on {addr[0]}:{addr[1]} (binlog in the demo directory)")
        parent = stack.enter_context(_slot_cgroup(opts, say))

        seed_in = top / "www" / "survey.dat"
        seed_in.parent.mkdir()
        # Compressible but not trivial: lines of numbers.
        with open(seed_in, "w") as f:
            n = 0
            while f.tell() < SEED_INPUT_BYTES:
                f.write(f"{n} {n * n % 9973} {n * 7919 % 104729}\n")
                n += 1
        www = stack.enter_context(_http_server(seed_in.parent))
        out_url, s3_endpoint, out_root = stack.enter_context(_seed_output(top, say))
        seed = item_from_dict(
            {
                "v": 1,
                "id": f"{len(items) + 1:02d}-seed-flow",
                "cmd": SEED_CMD,
                "inputs": {"survey.dat": {"url": f"{www}/survey.dat"}},
                "output_url": out_url,
            }
        )
        items.append(seed)
        seed_info = {
            "item": seed.id,
            "input_url": f"{www}/survey.dat",
            "input_bytes": seed_in.stat().st_size,
            "output_url": out_url.replace("{id}", seed.id),
            "store": "s3 (moto)" if s3_endpoint else "file",
        }
        say(f"seed flow: {www}/survey.dat -> VM (gzip) -> {out_url.replace('{id}', seed.id)}")

        tube = "demo"
        with Beanstalk(addr) as bs:
            put_items(bs, tube, items, ttr=60)
        say(
            f"put {len(items)} items on tube {tube!r}; starting the worker with {opts.vms} VMs (TCG boots take a while)"
        )

        factory = VMFactory(
            resolve_image(staged.overlay, manifest=manifest),
            top / "work",
            memory_mib=opts.memory_mib,
            use_cgroup=opts.use_cgroup and parent is not None,
            cgroup_parent=parent,
            uri=opts.uri,
            name_prefix="vmtool-demo-",
        )
        wopts = WorkerOptions(
            addr,
            tube,
            vms=opts.vms,
            idle_timeout=30,
            max_attempts=2,
            cache_dir=top / "cache",
            output_roots=(out_root,),
            spool_dir=top / "spool",
            s3_endpoint_url=s3_endpoint,
        )
        done = 0
        worker: Worker | None = None

        def on_event(what: str, data: dict[str, Any]) -> None:
            nonlocal done
            if what == "ready":
                say(f"  {data['vm']} booted in {data['boot_s']:.0f} s, taking items")
            elif what == "result":
                done += 1
                say(
                    f"  [{done}/{len(items)}] {data['item']}: {data['status']} (exit {data['exit']}) "
                    f"on {data['vm']}"
                )
                if done >= len(items) and worker is not None:
                    worker.stop()
            elif what in ("retry", "buried", "vm-failed", "error"):
                say(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in data.items()))

        worker = Worker(wopts, factory, on_event=on_event)
        t0 = time.monotonic()
        watchdog = threading.Timer(opts.timeout, worker.terminate)
        watchdog.daemon = True
        watchdog.start()
        try:
            report = worker.run()
        finally:
            watchdog.cancel()
        timed("work", t0)

        with Beanstalk(addr, watch=results_tube(tube)) as bs:
            got = collect_results(bs, want=len(items), timeout=5)
        if report.terminated and len(got.results) < len(items):
            raise VmtoolError(
                f"the demo did not finish within {opts.timeout:.0f} s "
                f"({len(got.results)} of {len(items)} results)"
            )
    timings["total"] = round(time.monotonic() - t_start, 2)
    results = [got.results[it.id] for it in items if it.id in got.results]
    return {
        "disk": {k: facts[k] for k in ("table", "boot", "root_kind", "fstype") if k in facts},
        "build": {"backend": res.backend, "agent": res.manifest.agent},
        "results": results,
        "missing": [it.id for it in items if it.id not in got.results],
        "seed_flow": seed_info,
        "duplicates_dropped": got.duplicates,
        "worker": report.to_dict(),
        "timings_s": timings,
    }
