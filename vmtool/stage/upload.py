"""Upload a local file to a Source's location (the plugin's -upload direction): http(s) PUT, S3, SFTP.

Local destinations are not handled here: the plugin only writes inside the job sandbox and checks
that itself before calling copy_local(). An overlay staged by vmtool is flattened first (its base
lives only in this node's cache); a qcow2 naming any other backing file, or a data file, is refused
rather than read, since its header is the job's to write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from vmtool.errors import ImageError, TransferFailed
from vmtool.fsutil import atomic_path
from vmtool.image import formats
from vmtool.run import run
from vmtool.stage.cache import BASE_RE, Cache
from vmtool.stage.fetch import IO_TIMEOUT, _http_error, _s3_client, _s3_error, _sftp
from vmtool.stage.sources import Source


def _opt(value: str) -> str:
    return value.replace(",", ",,")  # qemu option syntax: a comma inside a value is doubled


def flatten_if_overlay(
    local: Path, cache: Cache, workdir: Path, *, timeout: float | None = None
) -> Path | None:
    """A standalone qcow2 of `local` in `workdir` if it is an overlay on a cached base; None if `local`
    needs no flattening. The base's format is given explicitly, never taken from the overlay."""
    info = formats.inspect(local)
    if info.format != "qcow2" or (info.backing is None and info.data_file is None):
        return None  # sent as bytes: nothing on this host opens it
    bases = (cache.root / "bases").resolve()
    base = Path(os.path.realpath(local.parent / (info.backing or "")))
    m = BASE_RE.match(base.name)
    if info.data_file is None and (base.parent != bases or not m):
        raise ImageError(
            f"{local.name} is backed by {info.backing!r}, which is not a base in vmtool's cache: not uploaded",
            hint="upload a standalone image (qemu-img convert -O qcow2 ...)",
        )
    formats.check(local, "qcow2", formats.Policy(backing_roots=(bases,), qemu=False), what=local.name)
    assert m is not None
    out = workdir / f".{local.name}.flat.{os.getpid()}.tmp"
    opts = (
        f"driver=qcow2,file.driver=file,file.filename={_opt(os.fspath(local))},"
        f"backing.driver={m.group(2)},backing.file.driver=file,backing.file.filename={_opt(os.fspath(base))}"
    )
    try:
        run(
            ["qemu-img", "convert", "-q", "-U", "--image-opts", opts, "-O", "qcow2", os.fspath(out)],
            timeout=timeout,
        )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise
    return out


def upload(local: Path, dest: Source) -> int:
    """Send `local` to `dest`; returns the bytes sent."""
    size = local.stat().st_size
    if dest.kind == "http":
        _put_http(local, dest, size)
    elif dest.kind == "s3":
        _put_s3(local, dest)
    elif dest.kind == "sftp":
        _put_sftp(local, dest)
    else:
        raise TransferFailed(f"cannot upload to {dest.text}", error_type="Specification")
    return size


def copy_local(local: Path, dest: Path) -> int:
    with atomic_path(dest, mode=0o644) as tmp:
        shutil.copyfile(local, tmp)
    return dest.stat().st_size


def _put_http(local: Path, dest: Source, size: int) -> None:
    import urllib.error
    import urllib.request

    with open(local, "rb") as f:
        req = urllib.request.Request(
            dest.url,
            data=f,
            method="PUT",
            headers={
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
                "User-Agent": "vmtool-stage",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=IO_TIMEOUT) as r:
                r.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise _http_error(dest, e) from None


def _put_s3(local: Path, dest: Source) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(dest).upload_file(os.fspath(local), dest.host, dest.path)
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(dest, e) from None


def _put_sftp(local: Path, dest: Source) -> None:
    tmp = f"{dest.path}.vmtool-part.{os.getpid()}"
    with _sftp(dest) as sftp:
        try:
            sftp.put(os.fspath(local), tmp)
            _rename(sftp, tmp, dest.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise TransferFailed(f"{dest.text}: {e}", error_type="Transfer", server=dest.host) from None


def _rename(sftp: Any, a: str, b: str) -> None:
    try:
        sftp.posix_rename(a, b)
    except OSError:
        sftp.rename(a, b)
