"""CLI for `vmtool demo` (what `make demo` runs)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vmtool.cli.output import add_json_flag, emit


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job end to end on this machine (build, stage, queue, 2 VMs)",
        description="Build the default image as an installer-style disk, 'vmtool build --agent' it, start a "
        "local beanstalkd, stage the build, run 'vmtool queue work' with VMs under a slot cgroup, put items "
        "and print their results with what each VM used. Everything it starts or writes is removed at the end.",
    )
    p.add_argument("--items", type=int, default=10, help="items to run (default %(default)s)")
    p.add_argument("--vms", type=int, default=2, help="VMs at once (default %(default)s)")
    p.add_argument(
        "--memory", type=int, default=512, dest="memory_mib", help="MiB per VM (default %(default)s)"
    )
    p.add_argument(
        "--workdir", type=Path, help="where the demo's temporary directory goes (default: $TMPDIR)"
    )
    p.add_argument("--uri", default="qemu:///system", help="libvirt URI")
    p.add_argument("--no-cgroup", action="store_true", help="do not create a slot cgroup")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    add_json_flag(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vmtool.cli.queue import format_result_line
    from vmtool.demo import DemoOptions, run_demo
    from vmtool.queue.worker import VMRecord, WorkerReport, iter_lines

    show = not args.json and (sys.stderr.isatty() or os.environ.get("VMTOOL_PROGRESS") == "1")
    t0 = time.monotonic()

    def say(line: str) -> None:
        if show:
            sys.stderr.write(f"[{time.monotonic() - t0:6.1f}s] {line}\n")
            sys.stderr.flush()

    opts = DemoOptions(
        items=args.items,
        vms=args.vms,
        memory_mib=args.memory_mib,
        workdir=args.workdir,
        uri=args.uri,
        use_cgroup=not args.no_cgroup,
        timeout=args.timeout,
    )

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through run_demo's clean-up, like ^C

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        old = None
    try:
        data = run_demo(opts, say)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    rep = WorkerReport(data["worker"]["tube"])
    for v in data["worker"]["vms"]:
        rec = VMRecord(
            v["slot"],
            name=v["vm"],
            items=v["items"],
            failed_items=v["failed_items"],
            boot_s=v["boot_s"],
            busy_s=v["busy_s"],
            started=0.0,
            ended=v["wall_s"],
            end_reason=v["end"],
        )
        rec.usage = {k: v.get(k) for k in ("cpu_seconds", "peak_memory_bytes")}
        rep.vms.append(rec)
    lines: list[Any] = ["results:"]
    lines += ["  " + format_result_line(r) for r in data["results"]]
    if data["missing"]:
        lines.append(f"  missing: {', '.join(data['missing'])}")
    lines.append("what each VM used:")
    lines += ["  " + ln for ln in iter_lines(rep)]
    t = data["timings_s"]
    lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    emit(args, data, "\n".join(lines))
    return 0 if not data["missing"] else 1
