"""CLI: `vmtool stage SOURCE --into DIR` and `vmtool cache list|prune`."""

from __future__ import annotations

import argparse
import time

from vmtool.cli.output import add_json_flag, emit
from vmtool.image.formats import FORMATS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stage",
        help="make a qcow2 overlay of a cached base image (fetched once per node)",
        description="Fetch SOURCE into the node-local cache (once, verified) and create DIR/NAME, a qcow2 "
        "overlay backed by the cached base. SOURCE: a path, file://, http(s)://, s3://BUCKET/KEY, "
        "sftp://USER@HOST/PATH, vmimage URLs, or a manifest.json from 'vmtool build'.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--into", required=True, metavar="DIR", help="directory for the overlay")
    p.add_argument("--name", help="overlay file name (default: the source's basename with .qcow2)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the base image")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="format of the base (default: detect; raw "
        "is accepted without --format only when it holds a partition table or filesystem)",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="cache directory (default: $VMTOOL_CACHE, /var/cache/vmtool for root, else your own: "
        "$XDG_CACHE_HOME/vmtool, ~/.cache/vmtool or /var/tmp/vmtool-UID; a root-owned /var/cache/vmtool "
        "is read first)",
    )
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="sftp: trust and record a host key not yet in known_hosts",
    )
    p.add_argument("--force", action="store_true", help="replace DIR/NAME if it exists")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up fetching after this long")
    add_json_flag(p)
    p.set_defaults(func=_stage)

    c = sub.add_parser("cache", help="add to, list or prune the node-local image cache")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True, parser_class=type(c))
    ap = csub.add_parser("add", help="fetch and verify a base into the cache (no overlay)",
                         description="Fetch SOURCE into the cache once, verified. Run as root on "
                         "/var/cache/vmtool (mode 0755) to give every job user a base they may trust.")
    ap.add_argument("source", metavar="SOURCE")
    ap.add_argument("--cache", metavar="DIR", help="cache directory")
    ap.add_argument("--sha256", metavar="HEX", help="expected sha256 of the base image")
    ap.add_argument("--format", choices=FORMATS, help="format of the base (default: detect)")
    ap.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    ap.add_argument("--accept-new-host-key", action="store_true",
                    help="sftp: trust and record a host key not yet in known_hosts")
    ap.add_argument("--timeout", type=float, metavar="SECONDS", help="give up fetching after this long")
    add_json_flag(ap)
    ap.set_defaults(func=_add)
    lp = csub.add_parser("list", help="list cached bases, least recently used first")
    lp.add_argument("--cache", metavar="DIR", help="cache directory")
    add_json_flag(lp)
    lp.set_defaults(func=_list)
    pp = csub.add_parser("prune", help="remove bases no live overlay uses, least recently used first")
    pp.add_argument("--cache", metavar="DIR", help="cache directory")
    pp.add_argument("--max-size", metavar="SIZE", help="remove unused bases until the cache is at most SIZE")
    pp.add_argument("--older-than", metavar="AGE", help="remove unused bases last used longer ago than AGE")
    pp.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    add_json_flag(pp)
    pp.set_defaults(func=_prune)


def _stage(args: argparse.Namespace) -> int:
    from vmtool.stage.cache import Cache
    from vmtool.stage.sources import parse_source
    from vmtool.stage.stage import stage

    src = parse_source(
        args.source,
        endpoint_url=args.endpoint_url,
        accept_new_host_key=args.accept_new_host_key,
        fmt=args.format,
        sha256=args.sha256,
    )
    cache = Cache.open(args.cache)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    res = stage(src, args.into, cache, name=args.name, force=args.force, deadline=deadline)
    emit(args, res.to_dict(), str(res.overlay))
    return 0


def _add(args: argparse.Namespace) -> int:
    from vmtool.stage.cache import Cache
    from vmtool.stage.sources import parse_source
    from vmtool.stage.stage import add_to_cache

    src = parse_source(args.source, endpoint_url=args.endpoint_url, accept_new_host_key=args.accept_new_host_key,
                       fmt=args.format, sha256=args.sha256)
    cache = Cache.open(args.cache)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    res = add_to_cache(src, cache, deadline=deadline)
    d = res.to_dict()
    del d["overlay"]
    emit(args, d, f"{res.base} ({'already cached' if res.cache_hit else 'fetched'})")
    return 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _list(args: argparse.Namespace) -> int:
    from vmtool.stage.cache import Cache

    cache = Cache.open(args.cache)
    entries = cache.entries()
    lines = [f"{'SHA256':16} {'FORMAT':6} {'SIZE':>10} {'ON DISK':>10} {'LAST USED':20} LIVE  SOURCE"]
    for e in entries:
        d = e.to_dict()
        lines.append(
            f"{e.sha256[:16]} {e.format:6} {_gib(e.size):>10} {_gib(e.allocated):>10} "
            f"{d['last_used']:20} {len(e.live_refs):4}  {e.sources[-1] if e.sources else '-'}"
        )
    emit(args, {"cache": str(cache.root), "bases": [e.to_dict() for e in entries]}, "\n".join(lines))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from vmtool.stage.cache import Cache, parse_age, parse_size

    max_size = parse_size(args.max_size) if args.max_size else None
    older = parse_age(args.older_than) if args.older_than else None
    cache = Cache.open(args.cache)
    removed, kept = cache.prune(max_size=max_size, older_than=older, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = [f"{verb} {e.sha256[:16]} ({_gib(e.allocated)} on disk)" for e in removed]
    text.append(
        f"{len(removed)} base(s) {verb}, {len(kept)} kept, {_gib(sum(e.allocated for e in kept))} on disk"
    )
    emit(
        args,
        {
            "cache": str(cache.root),
            "dry_run": args.dry_run,
            "removed": [e.to_dict() for e in removed],
            "kept": [e.to_dict() for e in kept],
        },
        "\n".join(text),
    )
    return 0
