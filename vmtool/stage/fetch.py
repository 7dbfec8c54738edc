"""Fetchers: stream a Source into an open temporary file, hashing while writing.

Each fetcher also gives a cheap identity of the source's current version (path + size + mtime, an
HTTP ETag/Last-Modified, an S3 ETag) so a warm stage can find its base in the cache index without
reading the image. Errors become TransferFailed with the fields HTCondor's TransferErrorData needs.
boto3 and paramiko are imported only when an s3:// or sftp:// source is used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vmtool.errors import TransferFailed
from vmtool.log import Progress

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
    """Copy the source into the sink; returns the bytes that crossed the network (or were read)."""
    try:
        if src.kind == "file":
            return _fetch_local(src, sink)
        if src.kind == "http":
            return _fetch_http(src, sink)
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


def _open_http(src: Source, method: str) -> Any:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(src.url, method=method, headers={"User-Agent": "vmtool-stage"})
    try:
        return urllib.request.urlopen(req, timeout=IO_TIMEOUT)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _http_error(src, e) from None


def _http_identity(src: Source) -> str:
    import urllib.error

    try:
        with _open_http(src, "HEAD") as r:
            h = r.headers
            return f"http:{src.url}|{h.get('ETag')}|{h.get('Last-Modified')}|{h.get('Content-Length')}"
    except TransferFailed as e:
        # Some servers refuse HEAD; the GET will tell. Unversioned keys are still content-checked.
        if e.code in (405, 501):
            return f"http:{src.url}|unversioned"
        raise
    except urllib.error.URLError as e:  # pragma: no cover - _open_http converts these
        raise _http_error(src, e) from None


def _fetch_http(src: Source, sink: Sink) -> int:
    r = _open_http(src, "GET")
    with r:
        length = r.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if sink.progress is not None:
            sink.progress.total = total
        got = 0
        buf = bytearray(CHUNK)  # one buffer for the whole stream: no 1 MiB allocation per chunk
        try:
            while True:
                n = r.readinto(buf)
                if not n:
                    break
                got += n
                sink.write(buf if n == CHUNK else bytes(buf[:n]))
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise _http_error(src, e) from None
    if total is not None and got != total:
        raise TransferFailed(
            f"{src.text}: connection closed after {got} of {total} bytes",
            error_type="Transfer",
            server=src.host,
            failure_type="TimedOut",
        )
    return got


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
