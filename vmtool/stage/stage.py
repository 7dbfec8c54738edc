"""Stage a base image as a qcow2 overlay: fetch once per node (under a lock), overlay per job.

A warm stage never reads the base: the source's identity is looked up in the cache index (or the
base is found by its --sha256 alone), and the overlay is made with `qemu-img create -u` and an
explicit size and backing format, which does not open the base at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmtool.errors import OutputExists, StageError, TransferFailed
from vmtool.fsutil import atomic_path, os_error
from vmtool.log import Progress
from vmtool.run import run
from vmtool.stage.bases import check_base
from vmtool.stage.cache import Cache, key_hash
from vmtool.stage.fetch import discard_part, fetch_to, identity, part_path
from vmtool.stage.sources import Source


@dataclass
class StageResult:
    overlay: Path
    base: Path
    sha256: str
    format: str
    virtual_size: int
    cache_hit: bool
    fetched_bytes: int
    source: str
    fetched_via: str = ""  # "direct", "proxy URL (SETTING)", a source kind; "" on a cache hit

    def to_dict(self) -> dict[str, Any]:
        return {
            "overlay": os.fspath(self.overlay),
            "base": os.fspath(self.base),
            "sha256": self.sha256,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "cache_hit": self.cache_hit,
            "fetched_bytes": self.fetched_bytes,
            "source": self.source,
            "fetched_via": self.fetched_via,
        }


@dataclass
class _Base:
    sha256: str
    format: str
    virtual_size: int
    hit: bool
    fetched: int
    via: str = ""
    cache: Cache | None = None  # where the base is, when not the cache staged into (a read-only upstream)


def default_name(src: Source) -> str:
    stem = src.basename
    for ext in (".qcow2", ".img", ".raw", ".ext4", ".iso", ".disk"):
        if stem.lower().endswith(ext) and len(stem) > len(ext):
            stem = stem[: -len(ext)]
            break
    return stem + ".qcow2"


def check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\x00" in name or any(ord(c) < 32 for c in name):
        raise StageError(f"invalid overlay name {name!r}", hint="give a plain file name with --name")
    return name


def stage(
    src: Source,
    into: str | os.PathLike[str],
    cache: Cache,
    *,
    name: str | None = None,
    force: bool = False,
    deadline: float | None = None,
    progress: bool = True,
) -> StageResult:
    name = check_name(name or default_name(src))
    into_p = Path(os.path.abspath(into))
    dest = into_p / name
    if (dest.exists() or dest.is_symlink()) and not force:
        raise OutputExists(f"{dest} already exists", hint="remove it or choose another --name")
    for _attempt in range(3):
        b = _resolve_base(src, cache, deadline=deadline, progress=progress)
        try:
            into_p.mkdir(parents=True, exist_ok=True)  # only now: a failed stage leaves no empty DIR
        except OSError as e:
            raise os_error(e, f"cannot create {into_p}") from None
        where = b.cache or cache
        with where.lock(f"base-{b.sha256}", shared=True):
            base = where.base_path(b.sha256, b.format)
            if not base.exists():
                continue  # pruned between fetch and now: fetch again
            where.check_base(base)
            make_overlay(base, b.format, dest, b.virtual_size)
            where.add_ref(b.sha256, dest)
            where.touch(b.sha256)
        return StageResult(
            overlay=dest,
            base=base,
            sha256=b.sha256,
            format=b.format,
            virtual_size=b.virtual_size,
            cache_hit=b.hit,
            fetched_bytes=b.fetched,
            source=src.text,
            fetched_via=b.via,
        )
    raise StageError(
        f"the cached base for {src.text} keeps disappearing", hint="is a prune running in a loop?"
    )


def _from_meta(cache: Cache, sha: str, fmt: str) -> int:
    vsize = int(cache.meta(sha).get("virtual_size") or 0)
    if vsize <= 0:  # meta lost: the base was verified when it entered the cache, read its size
        from vmtool.image.formats import qemu_img_info

        vsize = qemu_img_info(cache.base_path(sha, fmt), fmt, what="cached base").virtual_size
    return vsize


def _resolve_base(src: Source, cache: Cache, *, deadline: float | None, progress: bool) -> _Base:
    if cache.upstream is not None:
        # the node's root-owned cache first: what the admin added there is never fetched again
        try:
            up = _resolve_base(src, cache.upstream, deadline=deadline, progress=progress)
        except _Miss:
            pass
        else:
            up.cache = cache.upstream
            return up
    if src.sha256:
        found = cache.find_base(src.sha256)
        if found and (src.format is None or found[1] == src.format):
            return _Base(src.sha256, found[1], _from_meta(cache, src.sha256, found[1]), True, 0)
    ident = identity(src)
    hit = _index_hit(src, cache, ident)
    if hit:
        return hit
    if cache.readonly:
        raise _Miss()
    owner = key_hash(ident)
    with cache.lock(f"src-{owner}"):
        hit = _index_hit(src, cache, ident)  # another stager fetched it while we waited
        if hit:
            return hit
        cache.clean_tmp_for(owner)
        return _fetch_into_cache(src, cache, ident, owner, deadline=deadline, progress=progress)


class _Miss(Exception):
    """Not in a read-only cache: fetch into the writable one."""


def _index_hit(src: Source, cache: Cache, ident: str) -> _Base | None:
    e = cache.index_get(ident)
    if not e:
        return None
    sha, fmt = str(e.get("sha256", "")), str(e.get("format", ""))
    if not cache.base_path(sha, fmt).exists():
        return None
    cache.check_base(cache.base_path(sha, fmt))
    if src.sha256 and sha != src.sha256:
        raise TransferFailed(
            f"checksum mismatch for {src.text}: expected sha256 {src.sha256}, the source has {sha}",
            error_type="Specification",
            server=src.server,
            hint="check --sha256, or the source changed",
        )
    if src.format and fmt != src.format:
        raise StageError(f"{src.text} is a {fmt} image, not {src.format}", hint="check --format")
    return _Base(sha, fmt, _from_meta(cache, sha, fmt), True, 0)


def _fetch_into_cache(
    src: Source,
    cache: Cache,
    ident: str,
    owner: str,
    *,
    deadline: float | None,
    progress: bool,
) -> _Base:
    tmp = part_path(cache.root / "tmp", owner, src)
    bar = Progress(f"fetching {src.basename}") if progress else None
    try:
        got = fetch_to(src, tmp, progress=bar, deadline=deadline)
        sha = got.sha256
        if bar is not None:
            bar.close()
        if src.sha256 and sha != src.sha256:
            raise TransferFailed(
                f"checksum mismatch for {src.text}: expected sha256 {src.sha256}, got {sha}",
                error_type="Specification",
                server=src.server,
                hint="the image is corrupt or not the one you meant; check --sha256",
            )
        info = check_base(tmp, src.format, what=src.text)
        os.chmod(tmp, 0o444)
        base = cache.base_path(sha, info.format)
        if base.exists():
            cache.check_base(base)  # planted under the right name by another user: refuse, do not trust
        meta = cache.meta(sha)
        sources = list(meta.get("sources") or [])
        if src.text not in sources:
            sources.append(src.text)
        cache.write_meta(
            sha,
            {
                "sha256": sha,
                "format": info.format,
                "size": got.size,
                "virtual_size": info.virtual_size,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sources": sources[-20:],
                "fetched_via": got.via,
                "resumed_from": got.resumed_from,
            },
        )
        if base.exists():
            tmp.unlink()
        else:
            os.rename(tmp, base)
            _fsync_dir(base.parent)
        cache.index_put(ident, {"sha256": sha, "format": info.format, "source": src.text})
        return _Base(sha, info.format, info.virtual_size, False, got.fetched, got.via)
    except BaseException:
        if bar is not None:
            bar.close("failed")
        discard_part(tmp)  # an http part cut by the network stays, for the next stage to resume
        raise


def add_to_cache(src: Source, cache: Cache, *, deadline: float | None = None, progress: bool = True) -> StageResult:
    """Fetch and verify a base into `cache` with no overlay (`vmtool cache add`, e.g. by root into the
    node's shared read-only cache)."""
    b = _resolve_base(src, cache, deadline=deadline, progress=progress)
    where = b.cache or cache
    base = where.base_path(b.sha256, b.format)
    return StageResult(overlay=base, base=base, sha256=b.sha256, format=b.format, virtual_size=b.virtual_size,
                       cache_hit=b.hit, fetched_bytes=b.fetched, source=src.text)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_overlay(base: Path, fmt: str, dest: Path, vsize: int | None = None) -> None:
    """A qcow2 overlay at `dest` (written under a temporary name, then renamed) backed by `base`.

    With `vsize` the base is not opened at all (-u: it was verified on entry to the cache); without it
    qemu-img opens the base read-only to learn its size. The backing format is always explicit.
    """
    try:
        with atomic_path(dest, mode=0o644) as tmp:
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    *([] if vsize is None else ["-u"]),
                    "-f",
                    "qcow2",
                    "-F",
                    fmt,
                    "-b",
                    os.fspath(base),
                    os.fspath(tmp),
                    *([] if vsize is None else [str(vsize)]),
                ],
                timeout=60,
            )
    except OSError as e:
        raise os_error(e, f"cannot write {dest}") from None
