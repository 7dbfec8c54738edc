"""Upload a local file to a Source's location (the plugin's -upload direction): http(s) PUT, S3, SFTP.

Local destinations are not handled here: the plugin only writes inside the job sandbox and checks
that itself before calling copy_local().
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from vmtool.errors import TransferFailed
from vmtool.fsutil import atomic_path
from vmtool.stage.fetch import IO_TIMEOUT, _http_error, _s3_client, _s3_error, _sftp
from vmtool.stage.sources import Source


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
        req = urllib.request.Request(dest.url, data=f, method="PUT", headers={
            "Content-Length": str(size), "Content-Type": "application/octet-stream", "User-Agent": "vmtool-stage"})
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
