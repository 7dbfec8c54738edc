"""manifest.json: what `vmtool build` made, read by stage, launch, queue and publish.

Schema `vmtool.manifest/1` is documented in docs/manifest.md. Paths inside are relative to the
manifest's directory (so a build directory can be moved or copied as a whole); `resolve()` makes
them absolute and refuses any that leave that directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtool.errors import VmtoolError
from vmtool.fsutil import write_atomic

SCHEMA = "vmtool.manifest/1"
MAX_MANIFEST_BYTES = 4 << 20


@dataclass
class SourceInfo:
    path: str
    format: str
    size: int
    sha256: str


@dataclass
class RootfsInfo:
    path: str
    format: str  # raw | qcow2
    fstype: str  # ext4 | ext3 | ext2 | xfs | ...
    label: str
    uuid: str
    virtual_size: int
    allocated_size: int
    sha256: str


@dataclass
class BootFile:
    path: str
    version: str
    sha256: str


@dataclass
class DiskInfo:
    """A bootable whole-disk image (publish issue: GPT + ESP + root), when built with --disk."""

    path: str
    format: str
    firmware: str  # "uefi"
    virtual_size: int
    sha256: str
    boot: str = ""  # how it boots, e.g. "uki" or "grub"


@dataclass
class Manifest:
    source: SourceInfo
    rootfs: RootfsInfo
    kernel: BootFile
    initrd: BootFile
    cmdline: str
    fstab_before: str | None
    fstab_after: str
    created: str = ""
    vmtool_version: str = ""
    disk: DiskInfo | None = None
    agent: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    base_dir: Path = field(default=Path("."), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "created": self.created,
            "vmtool_version": self.vmtool_version,
            "source": asdict(self.source),
            "rootfs": asdict(self.rootfs),
            "kernel": asdict(self.kernel),
            "initrd": asdict(self.initrd),
            "cmdline": self.cmdline,
            "fstab": {"before": self.fstab_before, "after": self.fstab_after},
            "disk": asdict(self.disk) if self.disk else None,
            "agent": self.agent,
        }
        d.update(self.extra)
        return d

    def resolve(self, rel: str) -> Path:
        """Absolute path of a file named in the manifest; it must stay inside the manifest's directory."""
        base = self.base_dir.resolve()
        p = (base / rel).resolve()
        if p != base and base not in p.parents:
            raise VmtoolError(
                f"manifest names a file outside its directory: {rel!r}",
                hint="manifest paths are relative to the manifest; rebuild it with 'vmtool build'",
            )
        return p

    @property
    def rootfs_path(self) -> Path:
        return self.resolve(self.rootfs.path)

    @property
    def kernel_path(self) -> Path:
        return self.resolve(self.kernel.path)

    @property
    def initrd_path(self) -> Path:
        return self.resolve(self.initrd.path)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: Path) -> Manifest:
        try:
            if d.get("schema") != SCHEMA:
                raise VmtoolError(
                    f"not a vmtool manifest (schema {d.get('schema')!r}, expected {SCHEMA!r})",
                    hint="give the manifest.json written by 'vmtool build'",
                )
            known = {"schema", "created", "vmtool_version", "source", "rootfs", "kernel", "initrd", "cmdline",
                     "fstab", "disk", "agent"}
            return cls(
                source=SourceInfo(**d["source"]),
                rootfs=RootfsInfo(**d["rootfs"]),
                kernel=BootFile(**d["kernel"]),
                initrd=BootFile(**d["initrd"]),
                cmdline=str(d["cmdline"]),
                fstab_before=d["fstab"]["before"],
                fstab_after=d["fstab"]["after"],
                created=str(d.get("created", "")),
                vmtool_version=str(d.get("vmtool_version", "")),
                disk=DiskInfo(**d["disk"]) if d.get("disk") else None,
                agent=d.get("agent"),
                extra={k: v for k, v in d.items() if k not in known},
                base_dir=base_dir,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise VmtoolError(
                f"manifest is missing or has a malformed field: {e}",
                hint="rebuild it with 'vmtool build'",
            ) from None


def load(path: str | os.PathLike[str]) -> Manifest:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise VmtoolError(f"{p}: too large to be a manifest", hint="give the manifest.json from 'vmtool build'")
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise VmtoolError(f"manifest {p} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VmtoolError(f"{p}: not valid JSON ({e})", hint="give the manifest.json from 'vmtool build'") from None
    if not isinstance(data, dict):
        raise VmtoolError(f"{p}: not a vmtool manifest", hint="give the manifest.json from 'vmtool build'")
    return Manifest.from_dict(data, p.parent)


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """Cheap check used by commands that take either a manifest or an image."""
    p = Path(path)
    if p.suffix != ".json":
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"schema"' in head and SCHEMA.encode() in head
