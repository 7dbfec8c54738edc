"""Fetchers: stream a Source into an open temporary file, hashing while writing.

Each fetcher also gives a cheap identity of the source's current version (path + size + mtime, an
HTTP ETag/Last-Modified, an S3 ETag) so a warm stage can find its base in the cache index without
reading the image. Errors become TransferFailed with the fields HTCondor's TransferErrorData needs.
boto3 and paramiko are imported only when an s3:// or sftp:// source is used.

http(s) goes through the site's proxy when there is one (OSG_SQUID_LOCATION, then http_proxy /
https_proxy / no_proxy) and falls back to the origin with one warning when the proxy fails; its
part file survives an interruption and the next fetch resumes it with a Range request
(docs/stage.md, "Site proxies and resumed fetches").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vmtool import __version__
from vmtool.errors import TransferFailed, VmtoolBug
from vmtool.fsutil import write_atomic
from vmtool.log import Progress, log

if TYPE_CHECKING:
    from vmtool.ssh import SshConnectError
    from vmtool.stage.sources import Source

CHUNK = 1 << 20
ZERO = bytes(CHUNK)
# No byte for this long means the server stalled; the whole fetch is bounded by the caller's deadline.
IO_TIMEOUT = float(os.environ.get("VMTOOL_IO_TIMEOUT", "60"))


class Sink:
    """Writes a stream sparsely (zero chunks become holes) while computing its sha256."""

    def __init__(self, f: BinaryIO, progress: Progress | None = None, deadline: float | None = None) -> None:
        self.f = f
        self.hash = hashlib.sha256()
        self.size = 0
        self.progress = progress
        self.deadline = deadline

    def _tick(self, n: int) -> None:
        self.size += n
        if self.progress is not None:
            self.progress.update(n)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TransferFailed(
                "fetch took too long and was stopped",
                error_type="Transfer",
                failure_type="TimedOut",
                hint="raise the time limit or fetch from closer",
            )

    def write(self, data: bytes | bytearray) -> None:
        """Write one chunk (bytes or bytearray: both compare with ZERO by memcmp; a memoryview would not)."""
        n = len(data)
        if not n:
            return
        self.hash.update(data)
        if n <= CHUNK and data == (ZERO if n == CHUNK else ZERO[:n]):
            self.f.seek(n, os.SEEK_CUR)
        else:
            self.f.write(data)
        self._tick(n)

    def resume(self, n: int) -> None:
        """Take the file's first n bytes (an interrupted fetch's) as written: hash them, go on after them."""
        self.f.flush()
        fd = self.f.fileno()
        for off, length, is_data in _segments(fd, n):
            if not is_data:
                left = length
                while left > 0:
                    k = min(left, CHUNK)
                    self.hash.update(ZERO[:k])
                    left -= k
                continue
            pos, end = off, off + length
            while pos < end:
                data = os.pread(fd, min(CHUNK, end - pos), pos)
                if not data:
                    raise TransferFailed("the interrupted fetch's part file shrank while it was read")
                self.hash.update(data)
                pos += len(data)
        self.size = n
        self.f.seek(n)

    def zeros(self, n: int) -> None:
        """n bytes of a hole in the source: hashed as zeros, left as a hole in the output."""
        while n > 0:
            k = min(n, CHUNK)
            self.hash.update(ZERO[:k])
            self.f.seek(k, os.SEEK_CUR)
            self._tick(k)
            n -= k

    def finish(self) -> str:
        self.f.truncate(self.size)
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.hash.hexdigest()


def identity(src: Source) -> str:
    """A string naming this version of the source; equal strings mean the same bytes."""
    if src.kind == "file":
        st = _stat_local(src)
        return f"file:{os.path.realpath(src.path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if src.kind == "http":
        return _http_identity(src)
    if src.kind == "s3":
        head = _s3_head(src)
        return f"s3:{src.endpoint_url or ''}|{src.host}/{src.path}|{head.get('ETag')}|{head.get('ContentLength')}"
    if src.kind == "sftp":
        with _sftp(src) as sftp:
            st = _sftp_stat(sftp, src)
        return f"sftp:{src.user}@{src.host}:{src.port or 22}{src.path}|{st.st_size}|{st.st_mtime}"
    raise TransferFailed(f"unknown source kind {src.kind}", error_type="Specification")


def fetch(src: Source, sink: Sink) -> int:
    """Copy a file, s3 or sftp source into the sink; returns the bytes that crossed the network (or
    were read). http(s) goes through fetch_to, which resumes and uses proxies."""
    try:
        if src.kind == "file":
            return _fetch_local(src, sink)
        if src.kind == "http":
            raise VmtoolBug("http sources are fetched with fetch_to (resumable, proxy-aware)")
        if src.kind == "s3":
            return _fetch_s3(src, sink)
        if src.kind == "sftp":
            return _fetch_sftp(src, sink)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise TransferFailed(
                "no space left in the cache while fetching",
                error_type="Transfer",
                failure_type="NoSpace",
                hint="free space in the cache (vmtool cache prune) or point --cache/VMTOOL_CACHE elsewhere",
            ) from None
        raise TransferFailed(
            f"{src.text}: {e.strerror or e}", error_type="Transfer", server=src.host
        ) from None
    raise TransferFailed(f"unknown source kind {src.kind}", error_type="Specification")


# --- local files and NFS -------------------------------------------------------------------------


def _stat_local(src: Source) -> os.stat_result:
    try:
        st = os.stat(src.path)
    except FileNotFoundError:
        raise TransferFailed(
            f"{src.text}: no such file",
            error_type="Specification",
            code=404,
            hint="check the path (is the NFS share mounted?)",
        ) from None
    except PermissionError:
        raise TransferFailed(
            f"{src.text}: permission denied",
            error_type="Authorization",
            code=403,
            failure_type="Authorization",
        ) from None
    except OSError as e:
        raise TransferFailed(f"{src.text}: {e.strerror}", error_type="Contact") from None
    if not os.path.isfile(src.path):
        raise TransferFailed(
            f"{src.text} is not a regular file",
            error_type="Specification",
            hint="give the path of a disk image file",
        )
    return st


def _segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of a file, using SEEK_DATA/SEEK_HOLE where the filesystem can."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole until the end
                yield pos, size - pos, False
                return
            yield pos, size - pos, True  # no SEEK_DATA here: treat the rest as data
            return
        if data > pos:
            yield pos, data - pos, False
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, size) - data, True
        pos = hole


def _fetch_local(src: Source, sink: Sink) -> int:
    st = _stat_local(src)
    if sink.progress is not None:
        sink.progress.total = st.st_size
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src.path, "rb", buffering=0) as f:
        fd = f.fileno()
        for off, length, is_data in _segments(fd, st.st_size):
            if not is_data:
                sink.zeros(length)
                continue
            f.seek(off)
            left = length
            while left > 0:
                n = f.readinto(view[: min(CHUNK, left)])
                if not n:
                    raise TransferFailed(f"{src.text} shrank while it was read", error_type="Transfer")
                sink.write(buf if n == CHUNK else bytes(view[:n]))
                left -= n
    return st.st_size


# --- http(s) -------------------------------------------------------------------------------------


def _http_error(src: Source, e: BaseException) -> TransferFailed:
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        if e.code == 404:
            return TransferFailed(
                f"{src.text}: not found (HTTP 404)",
                error_type="Specification",
                code=404,
                server=src.host,
                hint="check the URL",
            )
        if e.code in (401, 403):
            return TransferFailed(
                f"{src.text}: access denied (HTTP {e.code})",
                error_type="Authorization",
                code=e.code,
                server=src.host,
                failure_type="Authorization",
            )
        return TransferFailed(
            f"{src.text}: HTTP {e.code} {e.reason}",
            error_type="Specification" if e.code < 500 else "Contact",
            code=e.code,
            server=src.host,
        )
    reason = getattr(e, "reason", e)
    import ssl

    if isinstance(reason, ssl.SSLCertVerificationError):
        return TransferFailed(
            f"{src.text}: the TLS certificate of {src.host} cannot be verified ({reason.verify_message})",
            error_type="Authorization",
            server=src.host,
            failure_type="Authentication",
            hint="install the server's CA on this node (or point SSL_CERT_FILE at it)",
        )
    if isinstance(reason, socket.gaierror):
        return TransferFailed(
            f"{src.text}: cannot resolve host {src.host!r}",
            error_type="Resolution",
            server=src.host,
            failure_type="Definitive",
            hint="check the host name",
        )
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return TransferFailed(
            f"{src.text}: the server stopped sending (no data for {IO_TIMEOUT:.0f} s)",
            error_type="Transfer",
            server=src.host,
            failure_type="TooSlow",
        )
    text = getattr(reason, "strerror", None) or str(reason)
    return TransferFailed(
        f"{src.text}: cannot reach {src.host}: {text}",
        error_type="Contact",
        server=src.host,
        hint="check that the server is up and reachable from this node",
    )


# --- http(s): the site proxy, cache-friendly requests, resumable part files ---------------------

OSG_SQUID = "OSG_SQUID_LOCATION"
_HOST_PORT = re.compile(
    r"^(?:http://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):(\d{1,5})/?$"
)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
# Proxies that fail make the fetch fall back to the origin; one that does not answer should not cost
# the full stall timeout first.
PROXY_TIMEOUT_ENV = "VMTOOL_PROXY_TIMEOUT"
DIRECT = "direct"

_warned: set[str] = set()
_failed_proxies: set[str] = set()  # proxies that failed in this process: later requests go direct


def warn(message: str) -> None:
    """One warning line per distinct message and process, through vmtool's logger (the CLI shows it)."""
    if len(_warned) > 1000:  # a long-lived worker: forget old ones rather than grow
        _warned.clear()
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


@dataclass(frozen=True)
class Route:
    """How requests reach the origin: through `proxy` (named by `setting`) or, with proxy None, directly."""

    proxy: str | None = None
    setting: str = ""

    @property
    def label(self) -> str:
        return f"proxy {self.proxy} ({self.setting})" if self.proxy else DIRECT


def squid_location(value: str | None) -> str | None:
    """The proxy URL named by an OSG_SQUID_LOCATION value (`host:port`); None for unset, empty or
    UNAVAILABLE. Anything else is a warning and is ignored: a misconfigured site still runs its jobs."""
    if value is None:
        return None
    v = value.strip()
    if not v or v.upper() == "UNAVAILABLE":
        return None
    m = _HOST_PORT.match(v)
    if m and 0 < int(m.group(2)) < 65536:
        return f"http://{m.group(1)}:{int(m.group(2))}"
    warn(
        f"{OSG_SQUID}={value!r} is not host:port or UNAVAILABLE; ignoring it "
        "(images are fetched without the site squid)"
    )
    return None


def route_for(src: Source) -> Route:
    """OSG_SQUID_LOCATION for http:// URLs, then http_proxy/https_proxy; no_proxy exempts hosts."""
    import urllib.parse
    import urllib.request

    scheme = src.url.split(":", 1)[0].lower()
    env = urllib.request.getproxies_environment()
    netloc = urllib.parse.urlsplit(src.url).netloc.rsplit("@", 1)[-1]
    route = Route()
    squid = squid_location(os.environ.get(OSG_SQUID)) if scheme == "http" else None
    if squid:
        route = Route(squid, OSG_SQUID)
    elif env.get(scheme):
        route = Route(env[scheme], f"{scheme}_proxy")
    if route.proxy is None or route.proxy in _failed_proxies:
        return Route()
    if _no_proxy(netloc, env.get("no", "")):
        return Route()
    return route


def _no_proxy(netloc: str, no_proxy: str) -> bool:
    """no_proxy as curl and urllib read it: `*`, or names matching the host or a domain suffix of it."""
    host = netloc.lower()
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        e = entry.lstrip(".")
        if e in (host, name) or name.endswith("." + e):
            return True
    return False


class _ProxyFailed(Exception):
    """The proxy refused, timed out, answered an error or something that is not the image."""


def _proxy_timeout() -> float:
    try:
        return max(0.5, float(os.environ.get(PROXY_TIMEOUT_ENV, "20")))
    except ValueError:
        return 20.0


def _open_http(
    src: Source, method: str, route: Route | None = None, headers: dict[str, str] | None = None
) -> Any:
    """One request, cache-friendly: no cache-busting headers, identity encoding, one open-ended range at most."""
    import http.client
    import urllib.error
    import urllib.request

    route = route or Route()
    h = {"User-Agent": f"vmtool/{__version__}", "Accept-Encoding": "identity", **(headers or {})}
    req = urllib.request.Request(src.url, method=method, headers=h)
    proxies = {"http": route.proxy, "https": route.proxy} if route.proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        return opener.open(req, timeout=_proxy_timeout() if route.proxy else IO_TIMEOUT)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        if route.proxy:
            raise _ProxyFailed(_why(e)) from None
        raise _http_error(src, e) from None


def _why(e: BaseException) -> str:
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", e)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def _looks_html(headers: Any, first: bytes = b"") -> bool:
    ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    head = first[:64].lstrip().lower()
    return ctype in ("text/html", "application/xhtml+xml") or head.startswith((b"<!doctype html", b"<html"))


def _fall_back(src: Source, route: Route, why: str) -> None:
    assert route.proxy is not None
    _failed_proxies.add(route.proxy)
    warn(f"{src.text}: proxy {route.proxy} (from {route.setting}) failed: {why}; fetching from the origin")


def _http_identity(src: Source) -> str:
    route = route_for(src)
    if route.proxy:
        try:
            with _open_http(src, "HEAD", route) as r:
                if _looks_html(r.headers):
                    raise _ProxyFailed("it answered with an HTML page")
                return _identity_of(src, r.headers)
        except _ProxyFailed as e:
            _fall_back(src, route, str(e))
    try:
        with _open_http(src, "HEAD") as r:
            return _identity_of(src, r.headers)
    except TransferFailed as e:
        # Some servers refuse HEAD; the GET will tell. Unversioned keys are still content-checked.
        if e.code in (405, 501):
            return f"http:{src.url}|unversioned"
        raise


def _identity_of(src: Source, h: Any) -> str:
    return f"http:{src.url}|{h.get('ETag')}|{h.get('Last-Modified')}|{h.get('Content-Length')}"


def _validator(h: Any) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified."""
    etag = h.get("ETag")
    if etag and not etag.startswith("W/"):
        return str(etag)
    lm = h.get("Last-Modified")
    return str(lm) if lm else None


@dataclass
class FetchResult:
    sha256: str
    size: int
    fetched: int  # bytes that crossed the network (or were read) this time
    via: str  # "direct", "proxy http://host:port (SETTING)", or the kind of a non-http source
    resumed_from: int = 0
    warnings: list[str] = field(default_factory=list)


def part_path(tmpdir: Path, owner: str, src: Source) -> Path:
    """Where a fetch is written. http parts keep one name per source lock (`owner`), so whoever next
    takes that lock resumes them; other kinds are per process and never resumed."""
    if src.kind == "http":
        return tmpdir / f"{owner}.part"
    return tmpdir / f"{owner}.{os.getpid()}.part"


def sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def discard_part(part: Path) -> None:
    """Remove a failed fetch's part file, unless its sidecar marks it as worth resuming."""
    if sidecar(part).exists():
        return
    with contextlib.suppress(FileNotFoundError):
        part.unlink()


def _drop_part_state(part: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        sidecar(part).unlink()


def _finish(sink: Sink) -> str:
    """The sink's sha256 once its last bytes are on disk; a full disk is the one no-space error."""
    try:
        return sink.finish()
    except OSError as e:
        if _no_space(e):
            raise _space_error() from None
        raise TransferFailed(f"cannot write the fetched image: {e.strerror or e}") from None


def _no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _space_error() -> TransferFailed:
    return TransferFailed(
        "no space left in the cache while fetching",
        error_type="Transfer",
        failure_type="NoSpace",
        hint="free space in the cache (vmtool cache prune) or point --cache/VMTOOL_CACHE elsewhere",
    )


def fetch_to(
    src: Source,
    part: Path,
    *,
    progress: Progress | None = None,
    deadline: float | None = None,
    make_sink: Callable[[BinaryIO], Sink] | None = None,
) -> FetchResult:
    """Fetch `src` into `part` (from `part_path`), hashing it; the caller holds the source lock.

    An http part left by an interrupted fetch is resumed with a Range request when its sidecar's
    validator still matches the origin. On failure the part is removed, except an http part cut by
    the network (then its sidecar stays and `discard_part` keeps it for the next attempt).
    `make_sink` gives the Sink the bytes go through (a queue input's caps its size).
    """
    make = make_sink or (lambda f: Sink(f, progress, deadline))
    if src.kind == "http":
        return _HttpFetch(src, part, make, progress).run()
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise TransferFailed(f"cannot write in the cache: {part.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = make(f)
            fetched = fetch(src, sink)
            sha = _finish(sink)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return FetchResult(sha, sink.size, fetched, src.kind)


class _HttpFetch:
    """One http(s) fetch into a resumable part file, through the proxy first when there is one."""

    def __init__(
        self, src: Source, part: Path, make_sink: Callable[[BinaryIO], Sink], progress: Progress | None
    ) -> None:
        self.src = src
        self.part = part
        self.make_sink = make_sink
        self.progress = progress
        self.fetched = 0
        self.resumed_from = 0
        self.warnings: list[str] = []

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warn(message)

    def run(self) -> FetchResult:
        route = route_for(self.src)
        f = self._open_part()
        try:
            try:
                if route.proxy:
                    try:
                        return self._attempt(f, route)
                    except _ProxyFailed as e:
                        self.warnings.append(f"proxy {route.proxy} failed: {e}")
                        _fall_back(self.src, route, str(e))
                return self._attempt(f, Route())
            except OSError as e:  # the part file or its sidecar (the network's errors are handled inside)
                if _no_space(e):
                    raise _space_error() from None
                raise TransferFailed(
                    f"cannot write in the cache: {self.part.parent}: {e.strerror or e}",
                    error_type="Parameter",
                ) from None
        except BaseException as e:
            keep = (
                isinstance(e, TransferFailed)
                and e.error_type in ("Transfer", "Contact")
                and (e.failure_type != "NoSpace")
            )
            if not keep and not isinstance(e, KeyboardInterrupt):
                _drop_part_state(self.part)
                with contextlib.suppress(FileNotFoundError):
                    self.part.unlink()
            raise
        finally:
            f.close()

    def _open_part(self) -> BinaryIO:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.part, flags, 0o600)
        except PermissionError:
            # Another user's interrupted part in a shared cache: start our own (tmp/ is group-writable).
            with contextlib.suppress(OSError):
                self.part.unlink()
            _drop_part_state(self.part)
            try:
                fd = os.open(self.part, flags | os.O_EXCL, 0o600)
            except OSError as e:
                raise TransferFailed(f"cannot write in the cache: {self.part}: {e.strerror or e}") from None
        except OSError as e:
            raise TransferFailed(f"cannot write in the cache: {self.part}: {e.strerror or e}") from None
        return os.fdopen(fd, "r+b")

    def _state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(sidecar(self.part).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("url") != self.src.url:
            return None
        return state

    def _save_state(self, h: Any, total: int | None) -> None:
        state = {
            "url": self.src.url,
            "etag": h.get("ETag"),
            "last_modified": h.get("Last-Modified"),
            "validator": _validator(h),
            "total": total,
        }
        write_atomic(sidecar(self.part), json.dumps(state) + "\n", mode=0o600)

    def _restart(self, f: BinaryIO, why: str) -> None:
        self._warn(f"{self.src.text}: {why}; fetching it again from the start")
        _drop_part_state(self.part)
        f.seek(0)
        f.truncate(0)

    def _attempt(self, f: BinaryIO, route: Route) -> FetchResult:
        src = self.src
        restarted = False
        while True:
            state = self._state()
            offset = os.fstat(f.fileno()).st_size if state and state.get("validator") else 0
            if state is None or offset == 0:
                f.seek(0)
                f.truncate(0)
            sink = self.make_sink(f)
            if offset:
                sink.resume(offset)
            headers = {}
            if offset:
                headers = {"Range": f"bytes={offset}-", "If-Range": str(state["validator"])} if state else {}
            try:
                r = _open_http(src, "GET", route, headers)
            except TransferFailed as e:
                if not offset or e.code != 416 or restarted:
                    raise
                restarted = True  # the part is longer than the image is now
                self._restart(f, "the server cannot resume the interrupted fetch (HTTP 416)")
                continue
            with r:
                problem = self._check_response(r, route, state, offset)
                if problem:
                    if restarted:
                        raise TransferFailed(
                            f"{src.text}: {problem}",
                            error_type="Transfer",
                            server=src.host,
                            hint="the server (or a proxy in between) serves inconsistent ranges; try again later",
                        )
                    restarted = True
                    self._restart(f, problem)
                    continue
                if offset and r.status == 200:
                    why = (
                        "the origin changed since the interrupted fetch"
                        if state and _validator(r.headers) != state.get("validator")
                        else "the server does not resume (it sent the whole image)"
                    )
                    self._restart(f, why)
                    offset = 0
                    sink = self.make_sink(f)
                elif offset:
                    self.resumed_from = offset
                total = self._total(r, offset)
                self._save_state(r.headers, total)
                if self.progress is not None:
                    self.progress.total = total
                    self.progress.update(done=offset)
                self._stream(r, sink, route, total)
            sha = _finish(sink)
            _drop_part_state(self.part)
            return FetchResult(sha, sink.size, self.fetched, route.label, self.resumed_from, self.warnings)

    def _check_response(self, r: Any, route: Route, state: dict[str, Any] | None, offset: int) -> str | None:
        """None if the response may be appended at `offset`; else why not (a proxy's fault is raised)."""
        if route.proxy and _looks_html(r.headers):
            raise _ProxyFailed("it answered with an HTML page")
        if r.status not in (200, 206):
            why = f"unexpected HTTP {r.status} {r.reason}"
            if route.proxy:
                raise _ProxyFailed(why)
            raise TransferFailed(f"{self.src.text}: {why}", error_type="Transfer", server=self.src.host)
        if r.status != 206:
            return None
        cr = r.headers.get("Content-Range") or ""
        m = _CONTENT_RANGE.match(cr)
        total = state.get("total") if state else None
        problem = None
        if not offset:
            problem = (
                f"the server answered a range ({cr or 'no Content-Range'}) to a request for the whole image"
            )
        elif not m:
            problem = f"a 206 answer without a usable Content-Range ({cr!r})"
        else:
            start, end, size = int(m.group(1)), int(m.group(2)), m.group(3)
            n = int(size) if size != "*" else None
            if (
                start != offset
                or (n is not None and end != n - 1)
                or (total and n is not None and n != total)
            ):
                problem = (
                    f"asked for bytes {offset}-{'' if not total else total - 1}"
                    f"{'' if not total else f'/{total}'} but the server answered bytes {start}-{end}/{size}"
                )
        if problem is None and state:
            for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
                old, new = state.get(key), r.headers.get(header)
                if old and new and old != new:
                    problem = f"the origin's {header} changed between the parts ({old} -> {new})"
                    break
        if problem and route.proxy:
            raise _ProxyFailed(problem)
        return problem

    def _total(self, r: Any, offset: int) -> int | None:
        if r.status == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range") or "")
            if m and m.group(3) != "*":
                return int(m.group(3))
            return None
        length = r.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    def _stream(self, r: Any, sink: Sink, route: Route, total: int | None) -> None:
        import http.client

        src = self.src
        start = sink.size
        buf = bytearray(CHUNK)  # one buffer for the whole stream: no 1 MiB allocation per chunk
        first = True
        cut: str | None = None
        try:
            while True:
                n = r.readinto(buf)
                if not n:
                    break
                if first and route.proxy and start == 0 and _looks_html({}, bytes(buf[:64])):
                    raise _ProxyFailed("it answered with an HTML page")
                first = False
                self.fetched += n
                sink.write(buf if n == CHUNK else bytes(buf[:n]))
        except OSError as e:
            if _no_space(e):
                raise _space_error() from None
            cut = _why(e)
        except (ValueError, http.client.HTTPException) as e:
            cut = _why(e)
        if cut is None and total is not None and sink.size != total:
            cut = f"connection closed after {sink.size} of {total} bytes"
        if cut is None:
            return
        # Keep what arrived: the next attempt (the origin now, or the next stager) resumes from here.
        with contextlib.suppress(OSError):
            sink.f.truncate(sink.size)
            sink.f.flush()
        if route.proxy:
            raise _ProxyFailed(cut)
        raise TransferFailed(
            f"{src.text}: {cut}",
            error_type="Transfer",
            server=src.host,
            failure_type="TimedOut",
            hint="the next stage resumes from the bytes already fetched",
        )


# --- s3 ------------------------------------------------------------------------------------------


def _s3_client(src: Source) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise TransferFailed(
            "s3:// sources need boto3",
            error_type="Parameter",
            hint="pip install boto3 (it is in vmtool's dependencies)",
        ) from None
    cfg = Config(connect_timeout=IO_TIMEOUT, read_timeout=IO_TIMEOUT, retries={"max_attempts": 3})
    return boto3.client("s3", endpoint_url=src.endpoint_url, config=cfg)


def _s3_error(src: Source, e: Exception) -> TransferFailed:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    server = src.endpoint_url or "s3"
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status == 404 or code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            return TransferFailed(
                f"{src.text}: not found", error_type="Specification", code=404, server=server
            )
        if status in (401, 403):
            return TransferFailed(
                f"{src.text}: access denied ({code})",
                error_type="Authorization",
                code=status,
                server=server,
                failure_type="Authorization",
                hint="check the AWS credentials in the environment",
            )
        return TransferFailed(
            f"{src.text}: S3 error {code or status}", error_type="Contact", code=status, server=server
        )
    if isinstance(e, NoCredentialsError):
        return TransferFailed(
            f"{src.text}: no AWS credentials",
            error_type="Authorization",
            server=server,
            failure_type="Authentication",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        )
    if isinstance(e, EndpointConnectionError):
        return TransferFailed(
            f"{src.text}: cannot reach {server}",
            error_type="Contact",
            server=server,
            hint="check --endpoint-url / AWS_ENDPOINT_URL",
        )
    return TransferFailed(f"{src.text}: {e}", error_type="Transfer", server=server)


def _s3_head(src: Source) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head: dict[str, Any] = _s3_client(src).head_object(Bucket=src.host, Key=src.path)
        return head
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(src, e) from None


def _fetch_s3(src: Source, sink: Sink) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = _s3_client(src).get_object(Bucket=src.host, Key=src.path)
        if sink.progress is not None:
            sink.progress.total = int(obj.get("ContentLength") or 0) or None
        body = obj["Body"]
        got = 0
        for chunk in body.iter_chunks(CHUNK):
            got += len(chunk)
            sink.write(chunk)
        return got
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(src, e) from None


# --- sftp ----------------------------------------------------------------------------------------


def _ssh_error(host: str, e: SshConnectError) -> TransferFailed:
    from vmtool import ssh

    def auth(message: str, hint: str) -> TransferFailed:
        return TransferFailed(
            message, error_type="Authorization", server=host, failure_type="Authentication", hint=hint
        )

    if e.kind == ssh.MISSING:
        return TransferFailed(
            "sftp:// sources need paramiko",
            error_type="Parameter",
            hint="pip install paramiko (it is in vmtool's dependencies)",
        )
    if e.kind == ssh.KNOWN_HOSTS:
        return TransferFailed(f"cannot read known_hosts: {e.detail}", error_type="Parameter")
    if e.kind == ssh.CHANGED_KEY:
        return auth(
            f"{host}: host key does not match known_hosts (possible attack)",
            "verify the server's key, then fix known_hosts",
        )
    if e.kind == ssh.AUTH:
        return auth(f"{host}: SSH authentication failed", "check the user and key (VMTOOL_SSH_KEY)")
    if e.kind == ssh.UNKNOWN_KEY:
        return auth(
            f"{host}: host key is not in known_hosts",
            "add it to known_hosts (ssh-keyscan, checked out of band) or pass --accept-new-host-key",
        )
    if e.kind == ssh.RESOLVE:
        return TransferFailed(
            f"cannot resolve host {host!r}", error_type="Resolution", server=host, failure_type="Definitive"
        )
    if e.kind == ssh.UNREACHABLE:
        return TransferFailed(f"cannot reach {host}: {e.detail}", error_type="Contact", server=host)
    return TransferFailed(f"{host}: SSH error: {e.detail}", error_type="Contact", server=host)


class _SftpSession:
    def __init__(self, src: Source) -> None:
        self.src = src
        self.client: Any = None

    def __enter__(self) -> Any:
        from vmtool import ssh

        src = self.src
        known = Path(os.environ.get("VMTOOL_KNOWN_HOSTS") or os.path.expanduser("~/.ssh/known_hosts"))
        try:
            client = ssh.connect(
                src.host,
                src.port or 22,
                src.user,
                known_hosts=known,
                identity=os.environ.get("VMTOOL_SSH_KEY"),
                timeout=IO_TIMEOUT,
                accept_new_host_key=src.accept_new_host_key,
            )
        except ssh.SshConnectError as e:
            raise _ssh_error(src.host, e) from None
        self.client = client
        return client.open_sftp()

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()


def _sftp(src: Source) -> _SftpSession:
    return _SftpSession(src)


def _sftp_stat(sftp: Any, src: Source) -> Any:
    try:
        return sftp.stat(src.path)
    except FileNotFoundError:
        raise TransferFailed(
            f"{src.text}: no such file", error_type="Specification", code=404, server=src.host
        ) from None
    except PermissionError:
        raise TransferFailed(
            f"{src.text}: permission denied",
            error_type="Authorization",
            code=403,
            server=src.host,
            failure_type="Authorization",
        ) from None
    except OSError as e:
        raise TransferFailed(f"{src.text}: {e}", error_type="Transfer", server=src.host) from None


def _fetch_sftp(src: Source, sink: Sink) -> int:
    with _sftp(src) as sftp:
        st = _sftp_stat(sftp, src)
        if sink.progress is not None:
            sink.progress.total = st.st_size
        got = 0
        with sftp.open(src.path, "rb") as f:
            f.prefetch(st.st_size)
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                sink.write(chunk)
        return got
