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

Trust (docs/stage.md, "Who may write a cache"): a cache holds only what its users may trust. A cache
directory writable by its group or others without the sticky bit, or owned by another (non-root)
user, is refused. In a sticky shared directory only files owned by the caller or root are used; a
base owned by anyone else is refused (its owner can rewrite it at any time, so hashing it on use would
not help), and index entries are per writer (`index/<h>.json` root's, `index/<h>.u<uid>.json` a user's).
A root-owned cache a user cannot write is used read-only: its bases serve that user's stages, misses
are fetched into the user's own cache (vmtool.fsutil.user_cache_dir).
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
from vmtool.stage.bases import qcow2_backing

SUBDIRS = ("bases", "used", "index", "refs", "locks", "tmp")
BASE_RE = re.compile(r"^([0-9a-f]{64})\.(raw|qcow2)$")


SYSTEM_CACHE = Path("/var/cache/vmtool")


def default_cache_dir() -> Path:
    """$VMTOOL_CACHE, else the user's own cache (root: /var/cache/vmtool; others a 0700 per-user dir
    that needs no $HOME of theirs, see vmtool.fsutil.user_cache_dir)."""
    env = os.environ.get("VMTOOL_CACHE")
    if env:
        return Path(env)
    from vmtool.fsutil import user_cache_dir

    return user_cache_dir()


def _uid_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def trusted_file(path: Path) -> bool:
    """A file this user may build on: owned by this user or root, writable by nobody else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    return stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


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
    def __init__(self, root: Path, *, readonly: bool = False, upstream: Cache | None = None) -> None:
        self.root = root
        self.readonly = readonly
        # a root-owned cache this user may only read: its bases serve stages before a fetch
        self.upstream = upstream
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
        me = os.geteuid()
        if me != 0 and not root and not os.environ.get("VMTOOL_CACHE"):
            # the default per-user cache: 0700, created with no setup; the node's root-owned cache,
            # if the admin filled one (vmtool cache add), is read first
            from vmtool.fsutil import private_dir

            try:
                private_dir(path)
            except OSError as e:
                raise StageError(f"cannot create the cache directory {path}: {e.strerror}",
                                 hint="set VMTOOL_CACHE or XDG_CACHE_HOME to a directory of your own") from None
            cache = cls._open_writable(path)
            cache.upstream = cls._readonly_or_none(SYSTEM_CACHE)
            return cache
        if path.exists():
            cls.check_safe(path)
            st = path.stat()
            if me != 0 and st.st_uid == 0 and not os.access(path, os.W_OK | os.X_OK):
                ro = cls._readonly_or_none(path)
                if ro is None:
                    raise StageError(f"cache directory {path} is not readable", hint="check its permissions")
                own = cls.open(default_cache_dir()) if os.environ.get("VMTOOL_CACHE") is None else None
                if own is None:
                    raise StageError(f"cache directory {path} is read-only for this user",
                                     hint="leave VMTOOL_CACHE unset: the read-only cache is then used "
                                          "together with your own")
                own.upstream = ro
                return own
        return cls._open_writable(path)

    @staticmethod
    def check_safe(path: Path) -> None:
        """Refuse a cache directory whose files another user could replace or plant."""
        from vmtool.fsutil import unsafe_dir

        why = unsafe_dir(path, writer_ok=True)
        if why is None:
            return
        if "owned by uid" in why:
            uid = os.lstat(path).st_uid
            why = f"it belongs to {_uid_name(uid)}, another user, who could replace the images in it"
            hint = "use your own cache (leave --cache and VMTOOL_CACHE unset)"
        else:
            hint = (f"make it safe: chmod o-w,g-w {path} (a cache filled by root with 'vmtool cache add'), "
                    f"or chmod +t {path} (each user's files are then their own); or leave --cache and "
                    f"VMTOOL_CACHE unset to use your own cache")
        raise StageError(f"cache directory {path} has unsafe permissions: {why}", hint=hint)

    @classmethod
    def _readonly_or_none(cls, path: Path) -> Cache | None:
        from vmtool.fsutil import unsafe_dir

        try:
            st = path.stat()
        except OSError:
            return None
        if st.st_uid != 0 or unsafe_dir(path) is not None or not (path / "bases").is_dir():
            return None
        if not os.access(path / "bases", os.R_OK | os.X_OK):
            return None
        return cls(path, readonly=True)

    @classmethod
    def _open_writable(cls, path: Path) -> Cache:
        hint = "choose a writable cache with --cache DIR or VMTOOL_CACHE"
        try:
            path.mkdir(parents=True, exist_ok=True)
            shared = bool(path.stat().st_mode & 0o020)
            for d in SUBDIRS:
                sub = path / d
                if not sub.is_dir():
                    sub.mkdir(exist_ok=True)
                    if shared:
                        os.chmod(sub, 0o3775)  # sticky: users may add files, not replace others'
                Cache.check_safe(sub)
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
                self.check_base(p)
                return p, fmt
        return None

    def check_base(self, p: Path) -> None:
        """Refuse a base another user could have written (see the module docstring)."""
        if trusted_file(p):
            return
        try:
            st = os.lstat(p)
        except OSError:
            return
        who = _uid_name(st.st_uid)
        raise StageError(
            f"the cached base {p} belongs to {who} (mode {st.st_mode & 0o7777:04o}), not to you or root: "
            f"its owner can change it at any time, so it is not used",
            hint="use your own cache (leave --cache and VMTOOL_CACHE unset), or have root fill a shared "
                 "cache with 'vmtool cache add' (root-owned, read-only to jobs)")

    def meta(self, sha: str) -> dict[str, Any]:
        path = self.root / "bases" / f"{sha}.json"
        if not trusted_file(path):
            return {}
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_meta(self, sha: str, data: dict[str, Any]) -> None:
        if not trusted_file(self.root / "bases" / f"{sha}.json") and (self.root / "bases" / f"{sha}.json").exists():
            return  # another user's record (sticky directory): ours is not needed, theirs is not read
        write_atomic(self.root / "bases" / f"{sha}.json", json.dumps(data, indent=2) + "\n", mode=0o644)

    # --- index --------------------------------------------------------------------------------

    def _index_path(self, identity: str, uid: int) -> Path:
        h = key_hash(identity)
        return self.root / "index" / (f"{h}.json" if uid == 0 else f"{h}.u{uid}.json")

    def index_get(self, identity: str) -> dict[str, Any] | None:
        """This user's entry for a source, else root's; nobody else's (they could point it anywhere)."""
        for uid in dict.fromkeys((os.geteuid(), 0)):
            path = self._index_path(identity, uid)
            if not trusted_file(path):
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("identity") == identity:
                return data
        return None

    def index_put(self, identity: str, entry: dict[str, Any]) -> None:
        entry = dict(entry, identity=identity)
        write_atomic(self._index_path(identity, os.geteuid()), json.dumps(entry) + "\n", mode=0o644)

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
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self.readonly:
                    raise
                yield True  # a read-only cache: only root changes it (prune takes no base lock we'd miss)
                return
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
        if self.readonly:
            return
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
        if self.readonly:
            return
        d = self.root / "refs" / sha
        if not d.is_dir():
            d.mkdir(exist_ok=True)
            self._share(d, 0o3775)
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
