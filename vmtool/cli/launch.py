"""`vmtool launch`: run a VM inside the slot's cgroup until it powers off, times out or is signalled."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmtool.cli.domain import add_render_options, render_options_of
from vmtool.cli.output import add_json_flag, emit, warn
from vmtool.errors import LaunchError, VmtoolError
from vmtool.launch.netns import Allow, NetOptions

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def _signals_to(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (HTCondor's vacate), SIGINT and SIGHUP set `stop` instead of killing vmtool."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda _n, _f: stop.set())
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def add_net_options(p: argparse.ArgumentParser) -> None:
    """Options of --network nat, shared by `vmtool launch` and `vmtool queue work`."""
    p.add_argument("--allow-net", action="append", default=[], metavar="CIDR[:PORT]",
                   help="with --network nat: a destination the guest may reach (repeatable); everything else "
                        "is dropped and counted. Default: every destination. DNS only to vmtool's resolver")
    p.add_argument("--lan-net", action="append", default=[], metavar="CIDR",
                   help="with --network nat: a prefix counted as LAN (repeatable; default: RFC 1918 and the "
                        "host's own subnets)")
    p.add_argument("--chirp", action="store_true",
                   help="with --network nat: put the network figures into the job's ad while it runs "
                        "(condor_chirp set_job_attr; the job needs +WantIOProxy = true)")


def net_options_of(args: argparse.Namespace, network: str) -> NetOptions:
    """The NetOptions the flags ask for; an error if they are given without --network nat."""
    if network != "nat" and (args.allow_net or args.lan_net or args.chirp):
        raise LaunchError("--allow-net, --lan-net and --chirp need --network nat",
                          hint="add --network nat (the VM's own namespace with accounting)")
    return NetOptions(allow=tuple(Allow.parse(a) for a in args.allow_net),
                      lan=tuple(NetOptions.parse_lan(n) for n in args.lan_net))


def _launch(args: argparse.Namespace) -> int:
    from vmtool.fsutil import write_atomic
    from vmtool.launch import LaunchSpec, launch

    if args.domain is None and args.manifest is None:
        raise LaunchError("nothing to launch", hint="give a DOMAIN.xml, or --manifest manifest.json --disk OVERLAY")
    if args.timeout is not None and args.timeout <= 0:
        raise LaunchError("--timeout must be positive")
    stop = threading.Event()
    try:
        net = net_options_of(args, args.network)  # before the manifest is read: bad flags fail first
        spec = LaunchSpec(
            render=render_options_of(args), domain_xml=Path(args.domain) if args.domain else None,
            timeout=args.timeout, uri=args.uri, use_cgroup=not args.no_cgroup, cgroup_parent=args.cgroup_parent,
            machine_ad=args.machine_ad, grace=args.grace, net=net,
            chirp=args.chirp,
        )
        with _signals_to(stop):
            report = launch(spec, stop=stop)
    except VmtoolError as e:
        # The job's output files are expected whatever happened (HTCondor holds a job whose
        # transfer_output_files are missing), so the report says why the VM did not run.
        if args.report is not None:
            write_atomic(args.report, json.dumps({"exit_reason": "error", "exit_code": e.exit_code,
                                                  "detail": e.message, "hint": e.hint}, indent=2) + "\n")
        raise
    data = report.to_dict()
    for w in report.warnings:
        warn(w)
    if args.report is not None:
        write_atomic(args.report, json.dumps(data, indent=2) + "\n")
    st = report.stats
    peak = f"{st.peak_memory_bytes / 2**20:.0f} MiB" if st.peak_memory_bytes is not None else "?"
    cpu = f"{st.cpu_seconds:.1f} s" if st.cpu_seconds is not None else "?"
    text = (f"{report.name}: {report.reason.label} ({report.detail}) after {report.wall_seconds:.1f} s; "
            f"CPU {cpu}, peak memory {peak}; console: {report.console_log}")
    emit(args, data, text)
    return report.exit_code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "launch", help="run a VM inside the slot's cgroup until it powers off",
        description="Start a VM through libvirt, keep qemu in a child cgroup of the job's, wait until the "
                    "guest powers off, the timeout passes or vmtool is signalled (ACPI shutdown, then destroy "
                    "after --grace). Exit status: 0 poweroff, 4 qemu crashed, 5 memory kill, 124 timeout, "
                    "143 signalled, 1 error.")
    p.add_argument("domain", nargs="?", help="domain XML to run (rendered for this host); or use --manifest")
    add_render_options(p)
    p.add_argument("--timeout", type=float, metavar="S", help="destroy the VM after S seconds")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="seconds between the ACPI shutdown request and destroy (default: %(default)s)")
    p.add_argument("--no-cgroup", action="store_true", help="do not put qemu in the job's cgroup")
    p.add_argument("--cgroup-parent", metavar="PATH",
                   help="cgroup path (relative to the hierarchy roots) to use instead of the job's own")
    p.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report of the run here")
    add_net_options(p)
    add_json_flag(p)
    p.set_defaults(func=_launch)
