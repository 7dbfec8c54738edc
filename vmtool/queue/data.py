"""The queue's data plane on the host: URL inputs into the node cache, outputs up to their `output_url`.

Inputs are fetched by `vmtool stage`'s fetchers (vmtool.stage.fetch) into the node cache
(vmtool.stage.cache): content-addressed as `bases/<sha256>.raw`, keyed by the source's identity (path +
size + mtime, ETag/Last-Modified, S3 ETag) in the cache index, fetched under the cache's per-source
lock, so the items on one node that share an input fetch it once; `vmtool cache prune` ages them out
like any other base. A cached input is read under the base's shared lock, which prune respects.

Outputs are spooled on the host (the worker reads them from the guest) and uploaded so that a
half-written object is never visible under its final name: S3 to a temporary key, then a server-side
copy, then the temporary key is deleted (s3transfer aborts a failed multipart upload); sftp and
file:// to a temporary name, then a rename. An http(s) PUT goes straight to its URL: the server stores
it only when the body is complete (Content-Length), which is what a PUT store must do anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from vmtool.errors import TransferFailed, VmtoolError
from vmtool.queue.items import NAME_RE, ItemError
from vmtool.stage.cache import Cache, key_hash
from vmtool.stage.fetch import Sink, discard_part, fetch_to, identity, part_path
from vmtool.stage.sources import Source, parse_source

INPUT_KIND = "queue-input"


class DataError(ItemError):
    """An input or output of one item failed: the item gets an `error` result, the worker carries on."""


def _under(path: str, roots: tuple[Path, ...]) -> bool:
    real = os.path.realpath(path)
    for r in roots:
        rr = os.path.realpath(r)
        if real == rr or real.startswith(rr.rstrip("/") + "/"):
            return True
    return False


@dataclass(frozen=True)
class CachedInput:
    name: str
    path: Path
    size: int
    sha256: str
    fetched_bytes: int  # bytes that crossed the network for this item (0: the cache had it)


class _CappedSink(Sink):
    """A Sink that stops at `cap` bytes and calls `tick` as data arrives (keeps the queue job alive)."""

    def __init__(self, f: BinaryIO, cap: int, what: str, tick: Callable[[], None] | None) -> None:
        super().__init__(f, None, None)
        self.cap = cap
        self.what = what
        self.tick = tick

    def _tick(self, n: int) -> None:
        super()._tick(n)
        if self.size > self.cap:
            raise DataError(
                f"{self.what} is larger than the item's input limit of {self.cap} bytes",
                hint="raise limits.max_input_bytes",
            )
        if self.tick is not None:
            self.tick()


class Inputs:
    """Fetches URL inputs once per node into the cache (see the module text)."""

    def __init__(
        self,
        cache: Cache,
        *,
        input_roots: tuple[Path, ...] = (),
        endpoint_url: str | None = None,
        accept_new_host_key: bool = False,
    ) -> None:
        self.cache = cache
        self.input_roots = tuple(Path(os.path.abspath(r)) for r in input_roots)
        self.endpoint_url = endpoint_url
        self.accept_new_host_key = accept_new_host_key
        self.fetches = 0  # fetches this process made (cache misses), for reports and the bench

    def source(self, item_id: str, name: str, spec: dict[str, str]) -> Source:
        url = spec["url"]
        try:
            src = parse_source(
                url,
                endpoint_url=self.endpoint_url,
                accept_new_host_key=self.accept_new_host_key,
                sha256=spec.get("sha256"),
            )
        except VmtoolError as e:
            raise DataError(f"item {item_id}: input {name}: {e.message}", hint=e.hint) from None
        if src.kind == "file" and not (self.input_roots and _under(src.path, self.input_roots)):
            roots = ", ".join(map(str, self.input_roots)) or "none"
            raise DataError(
                f"item {item_id}: input {name}: {url} is not under an allowed input root ({roots})",
                hint="file:// inputs are read only under the worker's --input-root directories",
            )
        return src

    def get(
        self,
        item_id: str,
        name: str,
        spec: dict[str, str],
        *,
        max_bytes: int,
        tick: Callable[[], None] | None = None,
    ) -> CachedInput:
        """The input in the cache (fetched now if it is not there); DataError says why not."""
        src = self.source(item_id, name, spec)
        what = f"item {item_id}: input {name} ({src.text})"
        try:
            return self._get(src, name, what, max_bytes, tick)
        except DataError:
            raise
        except VmtoolError as e:
            msg = e.message if e.message.startswith(src.text) else f"{src.text}: {e.message}"
            raise DataError(f"item {item_id}: input {name}: {msg}", hint=e.hint) from None
        except Exception as e:  # a library error the fetchers do not convert: still one item's error
            raise DataError(f"{what}: {type(e).__name__}: {e}"[:1000]) from None

    def _hit(self, sha: str, name: str, max_bytes: int, what: str) -> CachedInput | None:
        p = self.cache.base_path(sha, "raw")
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return None
        if size > max_bytes:
            raise DataError(
                f"{what} is {size} bytes, more than the item's input limit of {max_bytes}",
                hint="raise limits.max_input_bytes",
            )
        self.cache.touch(sha)
        return CachedInput(name, p, size, sha, 0)

    def _get(
        self, src: Source, name: str, what: str, max_bytes: int, tick: Callable[[], None] | None
    ) -> CachedInput:
        if src.sha256:
            hit = self._hit(src.sha256, name, max_bytes, what)
            if hit:
                return hit
        ident = "queue-input|" + identity(src)
        hit = self._index_hit(src, ident, name, max_bytes, what)
        if hit:
            return hit
        owner = key_hash(ident)
        with self.cache.lock(f"src-{owner}"):
            hit = self._index_hit(src, ident, name, max_bytes, what)  # fetched while we waited
            if hit:
                return hit
            self.cache.clean_tmp_for(owner)
            return self._fetch(src, ident, owner, name, what, max_bytes, tick)

    def _index_hit(
        self, src: Source, ident: str, name: str, max_bytes: int, what: str
    ) -> CachedInput | None:
        e = self.cache.index_get(ident)
        if not e or e.get("format") != "raw":
            return None
        sha = str(e.get("sha256", ""))
        if src.sha256 and sha != src.sha256:
            raise DataError(
                f"{what}: checksum mismatch: expected sha256 {src.sha256}, the source has {sha}",
                hint="check the item's sha256, or the source changed",
            )
        return self._hit(sha, name, max_bytes, what)

    def _fetch(
        self,
        src: Source,
        ident: str,
        owner: str,
        name: str,
        what: str,
        max_bytes: int,
        tick: Callable[[], None] | None,
    ) -> CachedInput:
        tmp = part_path(self.cache.root / "tmp", owner, src)
        done = False
        try:
            # fetch_to is stage's own fetch: http(s) through the site proxy, resumable
            got = fetch_to(src, tmp, make_sink=lambda f: _CappedSink(f, max_bytes, what, tick))
            sha, size, fetched = got.sha256, got.size, got.fetched
            self.fetches += 1
            if src.sha256 and sha != src.sha256:
                raise DataError(
                    f"{what}: checksum mismatch: expected sha256 {src.sha256}, got {sha}",
                    hint="the file is not the one the item names; check its sha256",
                )
            os.chmod(tmp, 0o444)
            base = self.cache.base_path(sha, "raw")
            meta = self.cache.meta(sha)
            sources = list(meta.get("sources") or [])
            if src.text not in sources:
                sources.append(src.text)
            self.cache.write_meta(
                sha,
                {
                    "sha256": sha,
                    "format": "raw",
                    "kind": INPUT_KIND,
                    "size": size,
                    "virtual_size": size,
                    "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sources": sources[-20:],
                },
            )
            if base.exists():
                tmp.unlink()
            else:
                os.rename(tmp, base)
            done = True
            self.cache.index_put(ident, {"sha256": sha, "format": "raw", "source": src.text})
            self.cache.touch(sha)
            return CachedInput(name, base, size, sha, fetched)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DataError(
                    f"{what}: no space left in the node cache {self.cache.root}",
                    hint="free space (vmtool cache prune) or point VMTOOL_CACHE elsewhere",
                ) from None
            raise DataError(f"{what}: cannot write the cache: {e.strerror or e}") from None
        finally:
            if not done:
                discard_part(tmp)  # an http part cut by the network stays, for the next fetch to resume

    @contextlib.contextmanager
    def held(self, inputs: list[CachedInput]) -> Iterator[list[CachedInput]]:
        """Hold the cache's shared base locks while the inputs are read (prune skips them)."""
        with contextlib.ExitStack() as stack:
            kept = []
            for ci in inputs:
                stack.enter_context(self.cache.lock(f"base-{ci.sha256}", shared=True))
                if not ci.path.exists():
                    raise DataError(f"input {ci.name} left the cache before it was sent (pruned)")
                kept.append(ci)
            yield kept


# --- outputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uploaded:
    name: str
    url: str
    size: int
    sha256: str



class Outputs:
    """Uploads one item's spooled outputs to `<prefix><name>` (prefix: output_url with {id} filled)."""

    def __init__(
        self,
        prefix: str,
        *,
        output_roots: tuple[Path, ...] = (),
        endpoint_url: str | None = None,
        accept_new_host_key: bool = False,
    ) -> None:
        self.prefix = prefix
        self.output_roots = tuple(Path(os.path.abspath(r)) for r in output_roots)
        self.endpoint_url = endpoint_url
        self.accept_new_host_key = accept_new_host_key
        self.done: list[tuple[Uploaded, Source]] = []

    def dest(self, name: str) -> Source:
        if not NAME_RE.fullmatch(name):
            raise DataError(f"output name {name!r} is not a plain file name", hint="use [A-Za-z0-9._-]")
        url = self.prefix + name
        try:
            src = parse_source(
                url, endpoint_url=self.endpoint_url, accept_new_host_key=self.accept_new_host_key
            )
        except VmtoolError as e:
            raise DataError(f"output_url {url}: {e.message}", hint=e.hint) from None
        if src.kind == "file" and not (
            self.output_roots and _under(os.path.dirname(src.path), self.output_roots)
        ):
            roots = ", ".join(map(str, self.output_roots)) or "none"
            raise DataError(
                f"output_url {url} is not under an allowed output root ({roots})",
                hint="file:// outputs are written only under the worker's --output-root directories",
            )
        return src

    def upload(self, name: str, local: Path, size: int, sha: str) -> Uploaded:
        dest = self.dest(name)
        try:
            _upload(local, dest)
        except DataError:
            raise
        except VmtoolError as e:
            msg = e.message if e.message.startswith(dest.text) else f"{dest.text}: {e.message}"
            raise DataError(f"cannot upload output {name}: {msg}", hint=e.hint) from None
        up = Uploaded(name, dest.text, size, sha)
        self.done.append((up, dest))
        return up

    def rollback(self) -> None:
        """Remove what this attempt uploaded (an item with an error result leaves no outputs)."""
        for _up, dest in reversed(self.done):
            with contextlib.suppress(Exception):
                _remove(dest)
        self.done.clear()


def _upload(local: Path, dest: Source) -> None:
    from vmtool.stage.upload import copy_local, upload

    if dest.kind == "file":
        parent = Path(os.path.dirname(dest.path))
        try:
            parent.mkdir(parents=True, exist_ok=True)
            copy_local(local, Path(dest.path))
        except OSError as e:
            raise DataError(f"{dest.text}: {e.strerror or e}") from None
        return
    if dest.kind == "s3":
        _upload_s3(local, dest)
        return
    if dest.kind == "sftp":
        _sftp_makedirs(dest)
    upload(local, dest)


def _upload_s3(local: Path, dest: Source) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from vmtool.stage.fetch import _s3_client, _s3_error
    from vmtool.stage.upload import upload

    tmp = replace(
        dest, path=f"{dest.path}.vmtool-part-{uuid.uuid4().hex[:12]}", text=dest.text + " (temporary key)"
    )
    client = _s3_client(dest)
    try:
        try:
            upload(local, tmp)
        except (BotoCoreError, ClientError) as e:  # pragma: no cover - upload() converts these
            raise _s3_error(dest, e) from None
        except TransferFailed:
            raise
        except Exception as e:  # boto3's S3UploadFailedError wraps the ClientError's text
            raise _s3_upload_error(dest, e) from None
        try:
            client.copy({"Bucket": dest.host, "Key": tmp.path}, dest.host, dest.path)
        except (BotoCoreError, ClientError) as e:
            raise _s3_error(dest, e) from None
    finally:
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=dest.host, Key=tmp.path)


def _s3_upload_error(dest: Source, e: Exception) -> TransferFailed:
    text = str(e)
    if "NoSuchBucket" in text:
        return TransferFailed(
            f"{dest.text}: the bucket {dest.host} does not exist",
            error_type="Specification",
            code=404,
            hint="create the bucket or fix output_url",
        )
    if (
        "AccessDenied" in text
        or "403" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
    ):
        return TransferFailed(
            f"{dest.text}: upload denied ({text[:200]})",
            error_type="Authorization",
            code=403,
            failure_type="Authorization",
            hint="check the worker's AWS credentials and the bucket policy",
        )
    return TransferFailed(f"{dest.text}: upload failed: {text[:300]}", error_type="Transfer")


def _sftp_makedirs(dest: Source) -> None:
    from vmtool.stage.fetch import _sftp

    parts = [p for p in os.path.dirname(dest.path).split("/") if p]
    with _sftp(dest) as sftp:
        path = ""
        for p in parts:
            path += "/" + p
            try:
                sftp.stat(path)
            except FileNotFoundError:
                try:
                    sftp.mkdir(path)
                except OSError as e:
                    raise DataError(f"{dest.text}: cannot create {path}: {e}") from None
            except OSError as e:
                raise DataError(f"{dest.text}: cannot reach {path}: {e}") from None


def _remove(dest: Source) -> None:
    if dest.kind == "file":
        os.unlink(dest.path)
    elif dest.kind == "s3":
        from vmtool.stage.fetch import _s3_client

        _s3_client(dest).delete_object(Bucket=dest.host, Key=dest.path)
    elif dest.kind == "sftp":
        from vmtool.stage.fetch import _sftp

        with _sftp(dest) as sftp:
            sftp.remove(dest.path)
    elif dest.kind == "http":
        import urllib.request

        req = urllib.request.Request(dest.url, method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


def describe(e: BaseException) -> str:
    if isinstance(e, VmtoolError):
        return e.message + (f" ({e.hint})" if e.hint else "")
    return f"{type(e).__name__}: {e}"
