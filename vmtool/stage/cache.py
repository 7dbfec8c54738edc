"""The node-local, content-addressed cache of base images (layout and rules: docs/stage.md).

    CACHE/bases/<sha256>.<fmt>   verified base, mode 0444, appears only by rename from tmp/
    CACHE/bases/<sha256>.json    what it is (format, sizes, sources)
    CACHE/used/<sha256>          empty stamp whose mtime is the last stage (LRU; atime is unreliable)
    CACHE/index/<h>.json         source identity (path+size+mtime, ETag, ...) -> sha256, h = sha256(identity)
    CACHE/refs/<sha256>/<h>      symlink to each overlay staged on this base
    CACHE/locks/*.lock           fcntl.flock locks (the kernel drops them when a holder dies, even by SIGKILL)
    CACHE/tmp/                   fetches in progress (same filesystem as bases/, so rename is atomic)

A ref is live while the overlay it points at exists and its qcow2 header still names the base;
prune never removes a base with a live ref, nor one whose base lock a stager holds right now.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool.errors import StageError
from vmtool.fsutil import write_atomic
from vmtool.stage.inspect import qcow2_backing

SUBDIRS = ("bases", "used", "index", "refs", "locks", "tmp")
BASE_RE = re.compile(r"^([0-9a-f]{64})\.(raw|qcow2)$")


def default_cache_dir() -> Path:
    env = os.environ.get("VMTOOL_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/vmtool")
    # A node-wide cache shared by slot users (docs/stage.md) is used whenever we may write to it.
    if os.geteuid() == 0 or (system.is_dir() and os.access(system, os.W_OK | os.X_OK)):
        return system
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "vmtool"


def key_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class BaseEntry:
    sha256: str
    format: str
    path: Path
    size: int
    allocated: int
    virtual_size: int
    last_used: float
    sources: list[str] = field(default_factory=list)
    live_refs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "format": self.format,
            "path": os.fspath(self.path),
            "size": self.size,
            "allocated": self.allocated,
            "virtual_size": self.virtual_size,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
            "last_used_epoch": self.last_used,
            "sources": self.sources,
            "live_overlays": self.live_refs,
        }


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        # A group-writable root is a cache shared by several users (slot users of an HTCondor
        # node): keep what we create writable by that group too.
        try:
            self.shared = bool(root.stat().st_mode & 0o020)
        except OSError:
            self.shared = False

    def _share(self, path: Path, mode: int) -> None:
        if self.shared:
            with contextlib.suppress(OSError):
                os.chmod(path, mode)

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None) -> Cache:
        path = Path(root) if root else default_cache_dir()
        path = Path(os.path.abspath(path))
        hint = "choose a writable cache with --cache DIR or VMTOOL_CACHE"
        try:
            path.mkdir(parents=True, exist_ok=True)
            shared = bool(path.stat().st_mode & 0o020)
            for d in SUBDIRS:
                sub = path / d
                if not sub.is_dir():
                    sub.mkdir(exist_ok=True)
                    if shared:
                        os.chmod(sub, 0o2775)
            probe = path / "tmp" / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            why = "read-only filesystem" if e.errno == errno.EROFS else (e.strerror or str(e))
            raise StageError(f"cache directory {path} is not writable: {why}", hint=hint) from None
        return cls(path)

    # --- paths --------------------------------------------------------------------------------

    def base_path(self, sha: str, fmt: str) -> Path:
        return self.root / "bases" / f"{sha}.{fmt}"

    def find_base(self, sha: str) -> tuple[Path, str] | None:
        for fmt in ("qcow2", "raw"):
            p = self.base_path(sha, fmt)
            if p.exists():
                return p, fmt
        return None

    def meta(self, sha: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "bases" / f"{sha}.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_meta(self, sha: str, data: dict[str, Any]) -> None:
        write_atomic(self.root / "bases" / f"{sha}.json", json.dumps(data, indent=2) + "\n", mode=0o664)

    # --- index --------------------------------------------------------------------------------

    def index_get(self, identity: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "index" / f"{key_hash(identity)}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("identity") != identity:
            return None
        return data

    def index_put(self, identity: str, entry: dict[str, Any]) -> None:
        entry = dict(entry, identity=identity)
        write_atomic(
            self.root / "index" / f"{key_hash(identity)}.json", json.dumps(entry) + "\n", mode=0o664
        )

    # --- locks --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
        """flock on CACHE/locks/<name>.lock; yields False if blocking=False and it is held elsewhere."""
        path = self.root / "locks" / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            if self.shared:
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o666)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # --- use and refs -------------------------------------------------------------------------

    def touch(self, sha: str) -> None:
        p = self.root / "used" / sha
        try:
            os.utime(p)
        except FileNotFoundError:
            p.touch()
            self._share(p, 0o666)
        except PermissionError:
            pass  # another user's stamp in a cache without group write: LRU order is then approximate

    def last_used(self, sha: str, fallback: float) -> float:
        try:
            return (self.root / "used" / sha).stat().st_mtime
        except OSError:
            return fallback

    def add_ref(self, sha: str, overlay: Path) -> None:
        d = self.root / "refs" / sha
        if not d.is_dir():
            d.mkdir(exist_ok=True)
            self._share(d, 0o2775)
        target = os.path.abspath(overlay)
        link = d / key_hash(target)[:32]
        tmp = d / f".{link.name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def refs(self, sha: str, base: Path) -> tuple[list[str], list[Path]]:
        """(live overlay paths, dead ref links) for a base."""
        live: list[str] = []
        dead: list[Path] = []
        d = self.root / "refs" / sha
        if not d.is_dir():
            return live, dead
        for link in d.iterdir():
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if os.path.isfile(target) and qcow2_backing(Path(target)) == os.fspath(base):
                live.append(target)
            else:
                dead.append(link)
        return live, dead

    # --- listing and pruning ------------------------------------------------------------------

    def entries(self) -> list[BaseEntry]:
        out = []
        for p in sorted((self.root / "bases").iterdir()):
            m = BASE_RE.match(p.name)
            if not m:
                continue
            sha, fmt = m.groups()
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            meta = self.meta(sha)
            live, _dead = self.refs(sha, p)
            out.append(
                BaseEntry(
                    sha256=sha,
                    format=fmt,
                    path=p,
                    size=st.st_size,
                    allocated=st.st_blocks * 512,
                    virtual_size=int(meta.get("virtual_size") or 0),
                    last_used=self.last_used(sha, st.st_mtime),
                    sources=list(meta.get("sources") or []),
                    live_refs=live,
                )
            )
        out.sort(key=lambda e: e.last_used)
        return out

    def prune(
        self,
        *,
        max_size: int | None = None,
        older_than: float | None = None,
        dry_run: bool = False,
        now: float | None = None,
    ) -> tuple[list[BaseEntry], list[BaseEntry]]:
        """Remove unused bases, least recently used first. Returns (removed, kept)."""
        now = time.time() if now is None else now
        removed: list[BaseEntry] = []
        with self.lock("prune"):
            self._clean_tmp()
            entries = self.entries()  # LRU first
            total = sum(e.allocated for e in entries)
            everything = max_size is None and older_than is None
            for e in entries:
                if e.live_refs:
                    continue
                old = older_than is not None and now - e.last_used > older_than
                big = max_size is not None and total > max_size
                if not (everything or old or big):
                    continue
                if dry_run or self._remove_base(e):
                    removed.append(e)
                    total -= e.allocated
            if not dry_run:
                self._clean_index()
        gone = {e.sha256 for e in removed}
        return removed, [e for e in self.entries() if e.sha256 not in gone]

    def _remove_base(self, e: BaseEntry) -> bool:
        with self.lock(f"base-{e.sha256}", blocking=False) as got:
            if not got:
                return False  # a stager is making an overlay on it right now
            live, dead = self.refs(e.sha256, e.path)
            if live:
                return False
            for link in dead:
                with contextlib.suppress(OSError):
                    link.unlink()
            with contextlib.suppress(OSError):
                (self.root / "refs" / e.sha256).rmdir()
            for p in (e.path, self.root / "bases" / f"{e.sha256}.json", self.root / "used" / e.sha256):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return True

    def _clean_index(self) -> None:
        for p in (self.root / "index").glob("*.json"):
            try:
                sha = json.loads(p.read_text()).get("sha256", "")
            except (OSError, ValueError, AttributeError):
                sha = ""
            if not sha or self.find_base(sha) is None:
                with contextlib.suppress(OSError):
                    p.unlink()

    def _clean_tmp(self) -> None:
        """Remove fetches left by killed stagers: a tmp file whose source lock nobody holds."""
        for p in (self.root / "tmp").iterdir():
            owner = p.name.split(".", 1)[0]
            if not re.fullmatch(r"[0-9a-f]{64}", owner):
                continue
            with self.lock(f"src-{owner}", blocking=False) as got:
                if got:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def clean_tmp_for(self, owner: str) -> None:
        """Called with the source lock held: anything under that name is from a dead fetcher (its
        resumable http part, `<owner>.part` and its sidecar, is left for the fetch to resume)."""
        for p in (self.root / "tmp").glob(f"{owner}.*"):
            if p.name in (f"{owner}.part", f"{owner}.part.json"):
                continue
            with contextlib.suppress(OSError):
                p.unlink()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise StageError(f"not a size: {text!r}", hint="e.g. 500M, 20G, 1T or a number of bytes")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text, re.IGNORECASE)
    if not m:
        raise StageError(f"not an age: {text!r}", hint="e.g. 90s, 30m, 12h, 7d, 2w")
    mult = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    return float(m.group(1)) * mult
