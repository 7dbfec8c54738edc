"""CLI for `vmtool queue put | results | stats | work`."""

from __future__ import annotations

import argparse
import base64
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmtool.cli.launch import add_net_options, net_options_of
from vmtool.cli.output import add_json_flag, emit, warn
from vmtool.errors import QueueError

EXIT_TERMINATED = 143


def _common(p: argparse.ArgumentParser, *, tube_required: bool = True) -> None:
    p.add_argument(
        "--server",
        default="127.0.0.1:11300",
        metavar="HOST:PORT",
        help="beanstalkd address (as seen from the --via host when tunnelling; default %(default)s)",
    )
    p.add_argument("--tube", required=tube_required, help="work tube (results go to TUBE.results)")
    p.add_argument(
        "--via",
        metavar="ssh://USER@HOST[:PORT]",
        help="reach the server through an SSH tunnel (host key must be in known_hosts)",
    )
    p.add_argument(
        "--known-hosts", type=Path, help="known_hosts file for --via (default ~/.ssh/known_hosts)"
    )
    p.add_argument("--identity", type=Path, help="SSH private key for --via")
    add_json_flag(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="work items into VMs through beanstalkd, results back")
    qs = q.add_subparsers(dest="queue_command", metavar="SUBCOMMAND")

    p = qs.add_parser(
        "put",
        help="put work items on a tube",
        description="Put items from a JSON-lines file, or one item running CMD ARGS.",
    )
    _common(p)
    p.add_argument("--file", type=Path, help="JSON lines, one item per line ('-' = stdin)")
    p.add_argument("--id", help="item id (single command; default: random)")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="inline input file for a single command (repeatable)",
    )
    p.add_argument(
        "--input-url",
        action="append",
        default=[],
        metavar="NAME=URL[#sha256=HEX]",
        help="URL input (http(s), s3, sftp, file) fetched by the worker, any size (repeatable)",
    )
    p.add_argument(
        "--output-url",
        metavar="URL",
        help="upload every output to URL<name>: s3://b/p/{id}/, sftp://h/p/{id}/, http(s) PUT prefix, file:///d/{id}/",
    )
    p.add_argument("--max-input-bytes", type=int, default=None, help="limit on the item's input bytes")
    p.add_argument("--max-output-bytes", type=int, default=None, help="limit on its uploaded output bytes")
    p.add_argument("--scratch-bytes", type=int, default=None, help="guest scratch space (tmpfs) for the item")
    p.add_argument("--timeout-s", type=int, default=None, help="per-item run time limit in seconds")
    p.add_argument("--max-output", type=int, default=None, help="bytes of stdout/stderr tail kept")
    p.add_argument(
        "--ttr", type=int, default=60, help="beanstalkd time-to-run; the worker touches it (%(default)s)"
    )
    p.add_argument("--priority", type=int, default=1024)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=_put)

    r = qs.add_parser("results", help="collect results (one per item id; duplicates dropped)")
    _common(r)
    r.add_argument("--wait", type=int, default=0, metavar="N", help="wait until N distinct results arrived")
    r.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds")
    r.add_argument("--keep", action="store_true", help="leave the results on the tube")
    r.set_defaults(func=_results)

    s = qs.add_parser("stats", help="tube counts and buried items with their reasons")
    _common(s)
    s.set_defaults(func=_stats)

    w = qs.add_parser("work", help="run items in VMs (inside a batch job)")
    _common(w)
    w.add_argument(
        "--image", type=Path, required=True, help="manifest.json of 'vmtool build', or a staged overlay"
    )
    w.add_argument("--manifest", type=Path, help="the build's manifest.json when --image is an overlay")
    w.add_argument("--vms", type=int, default=1, help="VMs to run at once (default 1)")
    w.add_argument("--max-items", type=int, help="stop after taking this many items")
    w.add_argument("--idle-timeout", type=float, default=60.0, help="stop a VM after this many idle seconds")
    w.add_argument(
        "--max-attempts", type=int, default=3, help="bury an item after this many failed attempts"
    )
    w.add_argument(
        "--mode",
        choices=("relay", "direct"),
        default="relay",
        help="relay (default): items pass over virtio-serial and the guest has no network; direct: the guest "
        "agent talks to beanstalkd itself over user-mode networking (unsafe unless the server is only "
        "reachable through a tunnel, see docs/queue.md)",
    )
    w.add_argument("--memory", type=int, dest="memory_mib", help="MiB per VM (default: from the slot)")
    w.add_argument("--cpus", type=int, help="vCPUs per VM (default: from the slot)")
    w.add_argument("--workdir", type=Path, help="where overlays and sockets live (default: a temp dir here)")
    w.add_argument("--no-cgroup", action="store_true", help="leave the VMs where libvirt puts them")
    w.add_argument("--cgroup-parent", help="slot cgroup for the VMs (default: this process's own)")
    w.add_argument("--uri", help="libvirt URI (default: qemu:///system for root, qemu:///session otherwise)")
    w.add_argument(
        "--network",
        default=None,
        help="guest network: 'none' (relay default: no route anywhere), 'user' (direct default), 'nat' "
        "(each VM in its own network namespace, counted and limited by --allow-net; root), or a libvirt network",
    )
    add_net_options(w)
    w.add_argument(
        "--input-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="file:// inputs may be read under DIR (repeatable; none: file:// inputs are refused)",
    )
    w.add_argument(
        "--output-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="file:// output_urls may be written under DIR (repeatable; none: refused)",
    )
    w.add_argument("--cache", type=Path, help="node cache for URL inputs (default: vmtool's, see docs/stage.md)")
    w.add_argument("--spool", type=Path, help="where outputs wait for their upload (default: $TMPDIR)")
    w.add_argument("--endpoint-url", help="S3 endpoint for s3:// inputs and outputs (default: AWS_ENDPOINT_URL)")
    w.set_defaults(func=_work)

    def usage(a: argparse.Namespace) -> int:
        q.print_help(sys.stderr)
        return 2

    q.set_defaults(func=usage)


@contextlib.contextmanager
def _address(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    from vmtool.queue.beanstalk import parse_server

    addr = parse_server(args.server)
    if not args.via:
        yield addr
        return
    from vmtool.queue.tunnel import SSHTunnel

    with SSHTunnel(args.via, addr, known_hosts=args.known_hosts, identity=args.identity) as local:
        yield local


def _put(args: argparse.Namespace) -> int:
    from vmtool.queue.beanstalk import Beanstalk
    from vmtool.queue.client import put_items
    from vmtool.queue.items import item_from_dict, read_items_jsonl

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if bool(args.file) == bool(cmd):
        raise QueueError(
            "give either --file ITEMS.jsonl or -- CMD ARGS", hint="see 'vmtool queue put --help'"
        )
    if args.file:
        if args.input or args.id or args.input_url or args.output_url:
            raise QueueError("--input, --input-url, --output-url and --id go with a single command, not --file")
        try:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise QueueError(f"cannot read {args.file}: {e}") from None
        items = read_items_jsonl(text, source=str(args.file))
        for it in items:
            if args.timeout_s is not None:
                it.timeout_s = args.timeout_s
            if args.max_output is not None:
                it.max_output = args.max_output
        items = [item_from_dict(it.to_dict()) for it in items]
    else:
        inputs: dict[str, dict[str, str]] = {}
        for spec in args.input:
            name, sep, path = spec.partition("=")
            if not sep:
                raise QueueError(f"--input {spec!r}: use NAME=PATH")
            try:
                inputs[name] = {"data": base64.b64encode(Path(path).read_bytes()).decode()}
            except OSError as e:
                raise QueueError(f"--input {name}: cannot read {path}: {e.strerror}") from None
        for spec in args.input_url:
            name, sep, url = spec.partition("=")
            if not sep:
                raise QueueError(f"--input-url {spec!r}: use NAME=URL")
            url, _, frag = url.partition("#")
            entry = {"url": url}
            if frag:
                if not frag.startswith("sha256="):
                    raise QueueError(f"--input-url {name}: the fragment may only be #sha256=HEX")
                entry["sha256"] = frag[len("sha256=") :].lower()
            inputs[name] = entry
        d: dict[str, Any] = {"cmd": cmd, "inputs": inputs, "limits": {}}
        if args.output_url:
            d["output_url"] = args.output_url
        for k in ("max_input_bytes", "max_output_bytes", "scratch_bytes"):
            if getattr(args, k) is not None:
                d["limits"][k] = getattr(args, k)
        if args.id:
            d["id"] = args.id
        if args.timeout_s is not None:
            d["limits"]["timeout_s"] = args.timeout_s
        if args.max_output is not None:
            d["limits"]["max_output"] = args.max_output
        items = [item_from_dict(d, default_id=True)]
    with _address(args) as addr, Beanstalk(addr) as bs:
        put = put_items(bs, args.tube, items, ttr=args.ttr, priority=args.priority)
    emit(args, {"tube": args.tube, "items": put}, "\n".join(f"{p['id']}\tjob {p['job']}" for p in put))
    return 0


def _results(args: argparse.Namespace) -> int:
    from vmtool.queue.beanstalk import Beanstalk, check_tube, results_tube
    from vmtool.queue.client import collect_results

    check_tube(args.tube)
    with _address(args) as addr, Beanstalk(addr, watch=results_tube(args.tube)) as bs:
        c = collect_results(bs, want=args.wait, timeout=args.timeout, keep=args.keep)
    res = sorted(c.results.values(), key=lambda d: str(d.get("id")))
    data = {"tube": args.tube, "results": res, "duplicates_dropped": c.duplicates, "invalid": c.invalid}
    lines = [format_result_line(d) for d in res]
    if c.duplicates:
        lines.append(f"({c.duplicates} duplicate result(s) from retries dropped)")
    emit(args, data, "\n".join(lines) if lines else "no results")
    if args.wait and len(res) < args.wait:
        warn(f"only {len(res)} of {args.wait} results arrived within {args.timeout:.0f} s")
        return 1
    return 0


def format_result_line(d: dict[str, Any]) -> str:
    out = str(d.get("stdout", "")).strip().replace("\n", " | ")
    if len(out) > 60:
        out = out[:57] + "..."
    ex = d.get("exit")
    extra = ""
    if d.get("error"):
        extra = f"\terror: {str(d['error'])[:200]}"
    ups = {k: v for k, v in (d.get("outputs") or {}).items() if isinstance(v, dict)}
    if ups:
        extra += "\t" + ", ".join(f"{v.get('url')} ({v.get('size')} B)" for v in ups.values())
    return (
        f"{d.get('id')}\t{d.get('status')}\texit={'-' if ex is None else ex}\t"
        f"{float(d.get('duration_s') or 0):.2f}s\t{d.get('vm') or '-'}\t{out}{extra}"
    )


def _stats(args: argparse.Namespace) -> int:
    from vmtool.queue.beanstalk import Beanstalk, check_tube
    from vmtool.queue.client import tube_stats

    check_tube(args.tube)
    with _address(args) as addr, Beanstalk(addr) as bs:
        st = tube_stats(bs, args.tube)
    lines = [f"{'tube':<40} {'ready':>6} {'reserved':>8} {'delayed':>7} {'buried':>6} {'total':>6}"]
    for t, v in st["tubes"].items():
        lines.append(
            f"{t:<40} {v['ready']:>6} {v['reserved']:>8} {v['delayed']:>7} {v['buried']:>6} {v['total-jobs']:>6}"
        )
    tr = st["transfer"]
    lines.append(
        f"data over the {tr['results']} results not yet collected: {tr['bytes_in']} bytes in,"
        f" {tr['bytes_out']} bytes out, {tr['transfer_s']:.1f} s transferring"
    )
    for b in st["buried"]:
        lines.append(f"buried job {b.get('job')} (item {b.get('item_id')}): {b.get('reason')}")
    emit(args, st, "\n".join(lines))
    return 0


def _work(args: argparse.Namespace) -> int:
    from vmtool.queue.vms import VMFactory, resolve_image
    from vmtool.queue.worker import Worker, WorkerOptions, iter_lines

    image = resolve_image(args.image, manifest=args.manifest)
    with contextlib.ExitStack() as stack:
        addr = stack.enter_context(_address(args))
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="vmtool-work-", dir=args.workdir))
            )
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmtool-work-", dir=".")))
        network = args.network or ("user" if args.mode == "direct" else "none")
        factory = VMFactory(
            image,
            workdir,
            memory_mib=args.memory_mib,
            cpus=args.cpus,
            use_cgroup=not args.no_cgroup,
            cgroup_parent=args.cgroup_parent,
            uri=args.uri,
            network=network,
            net=net_options_of(args, network),
        )
        opts = WorkerOptions(
            addr,
            args.tube,
            vms=args.vms,
            max_items=args.max_items,
            idle_timeout=args.idle_timeout,
            max_attempts=args.max_attempts,
            mode=args.mode,
            cache_dir=args.cache,
            input_roots=tuple(args.input_root),
            output_roots=tuple(args.output_root),
            spool_dir=args.spool,
            s3_endpoint_url=args.endpoint_url,
        )
        worker = Worker(opts, factory, on_event=None if args.json else _progress_printer())
        stack.enter_context(_on_sigterm(worker))
        t0 = time.monotonic()
        report = worker.run()
    data = report.to_dict()
    data["wall_s"] = round(time.monotonic() - t0, 2)
    text = (
        f"{report.done} item(s) done, {report.retried} retried, {report.buried} buried, "
        f"{report.released} released in {data['wall_s']:.1f} s\n" + "\n".join(iter_lines(report))
    )
    emit(args, data, text)
    if report.terminated:
        return EXIT_TERMINATED
    return 1 if report.errors and not report.done else 0


@contextlib.contextmanager
def _on_sigterm(worker: Any) -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        worker.terminate()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling main() from a thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress_printer() -> Any:
    """Events as short lines on stderr when it is a terminal (quiet in batch logs otherwise)."""
    if not sys.stderr.isatty():
        return None

    def show(what: str, data: dict[str, Any]) -> None:
        if what == "result":
            sys.stderr.write(
                f"  {data['item']}: {data['status']} (exit {data['exit']}) on {data['vm']} "
                f"in {data['duration_s']:.1f} s\n"
            )
        elif what in ("ready", "buried", "retry", "vm-failed", "reconnecting", "error", "released"):
            sys.stderr.write(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in data.items()) + "\n")
        sys.stderr.flush()

    return show
