"""What the publishers share: the artifacts of a build, and their checksums."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from vmtool.errors import PublishError
from vmtool.log import Progress
from vmtool.manifest import Manifest

CHUNK = 4 << 20


@dataclass(frozen=True)
class Digests:
    size: int
    md5: str
    sha256: str
    sha512: str


def digest_file(path: Path, label: str | None = None) -> Digests:
    """md5 (Glance's `checksum`), sha256 (S3/EC2 tags), sha512 (Glance's `os_hash_value`) in one read."""
    md5, sha256, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha256(), hashlib.sha512()
    try:
        size = os.stat(path).st_size
        progress = Progress(label or f"checksumming {path.name}", size)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                md5.update(chunk)
                sha256.update(chunk)
                sha512.update(chunk)
                progress.update(len(chunk))
    except OSError as e:
        raise PublishError(f"cannot read {path}: {e.strerror or e}") from None
    progress.close()
    return Digests(size=size, md5=md5.hexdigest(), sha256=sha256.hexdigest(), sha512=sha512.hexdigest())


def default_name(m: Manifest) -> str:
    """A stable name for a build: the same manifest publishes under the same name."""
    return f"vmtool-{m.kernel.version}-{m.rootfs.sha256[:12]}"


def require_file(m: Manifest, rel: str, what: str) -> Path:
    p = m.resolve(rel)
    if not p.is_file():
        raise PublishError(f"the build's {what} {p} is missing", hint="rebuild it with 'vmtool build'")
    return p
