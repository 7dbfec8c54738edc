"""What `vmtool stage` and the plugin may fetch: a SOURCE string parsed into a Source.

Forms: a local path (also on NFS), file://, http(s)://, s3://bucket/key, sftp://[user@]host[:port]/path,
a manifest.json from `vmtool build`, and the plugin's vmimage URLs (docs/stage.md):
vmimage:///abs/path (a file on the node), vmimage://host/path (https), and
<transport>+vmimage://... with transport http, https, s3, sftp or file. URL forms may end in a
fragment `#sha256=HEX&format=raw|qcow2`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from vmtool.errors import StageError, TransferFailed
from vmtool.image.formats import FORMATS

SCHEMES = ("file", "http", "https", "s3", "sftp")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    kind: str  # file | http | s3 | sftp
    text: str  # as given, for messages (never contains a password)
    path: str  # local path, URL path, or S3 key
    url: str = ""  # http(s) URL to GET
    host: str = ""  # server (http, sftp) or bucket (s3)
    port: int | None = None
    user: str = ""
    sha256: str | None = None
    format: str | None = None
    endpoint_url: str | None = None
    accept_new_host_key: bool = False

    @property
    def basename(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or "image"

    @property
    def server(self) -> str:
        return self.host


def check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[7:]
    if not HEX64.match(v):
        raise StageError(f"not a sha256 checksum: {value!r}", hint="give 64 hexadecimal digits")
    return v


def _fragment(frag: str) -> tuple[str | None, str | None]:
    if not frag:
        return None, None
    q = parse_qs(frag, keep_blank_values=True)
    unknown = set(q) - {"sha256", "format"}
    if unknown:
        raise StageError(
            f"unknown URL fragment option(s): {', '.join(sorted(unknown))}",
            hint="the fragment may hold sha256=HEX and format=raw|qcow2",
        )
    fmt = q.get("format", [None])[-1]
    if fmt is not None and fmt not in FORMATS:
        raise StageError(f"unknown format {fmt!r} in URL fragment", hint="use format=raw or format=qcow2")
    return check_sha256(q.get("sha256", [None])[-1]), fmt


def _unknown_scheme(scheme: str, text: str) -> TransferFailed:
    return TransferFailed(
        f"unknown source scheme {scheme!r} in {text!r}",
        hint="use a path, file://, http(s)://, s3://bucket/key, sftp://user@host/path or a manifest.json",
        error_type="Specification",
        code=-1,
    )


def parse_source(
    text: str,
    *,
    endpoint_url: str | None = None,
    accept_new_host_key: bool = False,
    fmt: str | None = None,
    sha256: str | None = None,
) -> Source:
    """Parse SOURCE; a manifest.json is read (its rootfs becomes the source, with its format and sha256)."""
    if not text or "\x00" in text:
        raise StageError("empty or invalid source", hint="give a path or URL of a disk image")
    sha = check_sha256(sha256)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if not m:
        src = _local(text)
    else:
        scheme = m.group(1).lower()
        if scheme == "vmimage" or scheme.endswith("+vmimage"):
            src = parse_vmimage(text)
        else:
            src = _url(text, scheme)
    if src.kind == "s3":
        src = replace(src, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
    if src.kind == "sftp":
        src = replace(src, accept_new_host_key=accept_new_host_key)
    if fmt is not None:
        if fmt not in FORMATS:
            raise StageError(f"unknown format {fmt!r}", hint="use --format raw or --format qcow2")
        if src.format is not None and src.format != fmt:
            raise StageError(f"--format {fmt} contradicts the source's format {src.format}")
        src = replace(src, format=fmt)
    if sha is not None:
        if src.sha256 is not None and src.sha256 != sha:
            raise StageError(
                "--sha256 contradicts the checksum the source names", hint="check which one is right"
            )
        src = replace(src, sha256=sha)
    return src


def _local(text: str) -> Source:
    p = Path(text)
    if p.suffix == ".json" and p.is_file():
        from vmtool.manifest import is_manifest, load

        if is_manifest(p):
            man = load(p)
            root = man.rootfs_path
            return Source(
                kind="file",
                text=text,
                path=os.fspath(root),
                format=man.rootfs.format,
                sha256=check_sha256(man.rootfs.sha256) if man.rootfs.sha256 else None,
            )
    return Source(kind="file", text=text, path=os.path.abspath(text))


def _url(text: str, scheme: str, *, display: str | None = None) -> Source:
    shown = display or text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise StageError(f"malformed URL {shown!r}: {e}") from None
    sha, fmt = _fragment(parts.fragment)
    host = parts.hostname or ""
    if scheme == "file":
        if host not in ("", "localhost"):
            raise StageError(f"file URL names a remote host: {shown!r}", hint="use file:///abs/path")
        return Source(kind="file", text=shown, path=unquote(parts.path), sha256=sha, format=fmt)
    if scheme in ("http", "https"):
        if not host:
            raise StageError(f"URL has no host: {shown!r}")
        url = parts._replace(fragment="").geturl()
        return Source(
            kind="http",
            text=shown,
            path=unquote(parts.path),
            url=url,
            host=host,
            port=port,
            sha256=sha,
            format=fmt,
        )
    if scheme == "s3":
        key = unquote(parts.path.lstrip("/"))
        if not host or not key:
            raise StageError(f"S3 URL needs a bucket and a key: {shown!r}", hint="s3://BUCKET/KEY")
        return Source(
            kind="s3", text=shown, path=key, host=parts.netloc.split("@")[-1], sha256=sha, format=fmt
        )
    if scheme == "sftp":
        if not host or not parts.path or parts.path == "/":
            raise StageError(
                f"SFTP URL needs a host and a path: {shown!r}", hint="sftp://user@host/abs/path"
            )
        if parts.password:
            raise StageError("passwords in sftp:// URLs are not accepted", hint="use an SSH key")
        return Source(
            kind="sftp",
            text=shown,
            path=unquote(parts.path),
            host=host,
            port=port,
            user=unquote(parts.username or ""),
            sha256=sha,
            format=fmt,
        )
    raise _unknown_scheme(scheme, shown)


def parse_vmimage(text: str) -> Source:
    """vmimage:///abs (node file), vmimage://host/p (https), T+vmimage://... (T = http|https|s3|sftp|file)."""
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    transport = scheme[: -len("+vmimage")] if scheme.endswith("+vmimage") else ""
    if not transport:
        transport = "file" if rest.startswith("/") else "https"
    if transport not in SCHEMES:
        raise _unknown_scheme(scheme, text)
    src = _url(f"{transport}://{rest}", transport, display=text)
    if src.kind == "file" and not src.path.startswith("/"):
        raise StageError(
            f"vmimage URL must name an absolute path: {text!r}", hint="vmimage:///abs/path/base.qcow2"
        )
    return src
