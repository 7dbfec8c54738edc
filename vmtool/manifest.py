"""manifest.json: what `vmtool build` made, read by stage, launch, queue and publish.

Schema `vmtool.manifest/1` is documented in docs/manifest.md. Paths inside are relative to the
manifest's directory (so a build directory can be moved or copied as a whole); `resolve()` makes
them absolute and refuses any that leave that directory.

A `Manifest` and its parts are frozen: a changed manifest is a new object made with
`dataclasses.replace()` (e.g. `replace(m, disk=info)`), so one loaded at the CLI's edge can be handed
down to every layer without any of them re-reading the file or seeing it change under them.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vmtool.errors import VmtoolError
from vmtool.fsutil import write_atomic
from vmtool.image.formats import ImageFormat  # noqa: F401  (re-exported: a manifest's formats)

SCHEMA = "vmtool.manifest/1"
MAX_MANIFEST_BYTES = 4 << 20
HINT = "give the manifest.json written by 'vmtool build'"


class FrozenDict(dict[str, Any]):
    """A JSON object that cannot be changed: the free-form parts of a frozen Manifest (agent, extra).

    A dict subclass, so json.dumps and equality with plain dicts work as before.
    """

    def _readonly(self, *_a: object, **_k: object) -> NoReturn:
        raise TypeError("a manifest is frozen: make a changed copy with dataclasses.replace()")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle would otherwise rebuild it item by item with __setitem__.
        return (FrozenDict, (dict(self),))


def freeze(value: Any) -> Any:
    """A deep read-only copy of a JSON value: objects become FrozenDicts, arrays tuples."""
    if isinstance(value, Mapping):
        return FrozenDict((str(k), freeze(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON value of a frozen one (dicts and lists), for callers that edit it."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class SourceInfo:
    path: str
    format: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RootfsInfo:
    path: str
    format: str  # an ImageFormat's value
    fstype: str  # ext4 | ext3 | ext2 | xfs | ...
    label: str
    uuid: str
    virtual_size: int
    allocated_size: int
    sha256: str


@dataclass(frozen=True)
class BootFile:
    path: str
    version: str
    sha256: str


@dataclass(frozen=True)
class DiskInfo:
    """A bootable whole-disk image (publish issue: GPT + ESP + root), when built with --disk."""

    path: str
    format: str
    firmware: str  # "uefi"
    virtual_size: int
    sha256: str
    boot: str = ""  # how it boots, e.g. "uki" or "grub"


@dataclass(frozen=True)
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
    agent: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=FrozenDict)
    base_dir: Path = field(default=Path("."), compare=False, repr=False)

    def __post_init__(self) -> None:
        # The free-form parts are copied read-only, so a caller's dict cannot change this manifest later.
        if self.agent is not None:
            object.__setattr__(self, "agent", freeze(self.agent))
        object.__setattr__(self, "extra", freeze(self.extra))
        object.__setattr__(self, "base_dir", Path(self.base_dir))

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
            "agent": thaw(self.agent),
        }
        d.update(thaw(self.extra))
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
                    hint=HINT,
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
    """Read and check a manifest.json; every way it can fail is a VmtoolError with a hint."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO given by mistake is refused below instead of blocking the open.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        _unreadable(p, e)
    try:
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                _unreadable(p, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
            if not stat.S_ISREG(st.st_mode):
                raise VmtoolError(f"manifest {p} is not a regular file", hint=HINT)
            if st.st_size > MAX_MANIFEST_BYTES:
                raise VmtoolError(f"{p}: too large to be a manifest", hint=HINT)
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        _unreadable(p, e)
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VmtoolError(f"{p}: not valid JSON ({e})", hint=HINT) from None
    if not isinstance(data, dict):
        raise VmtoolError(f"{p}: not a vmtool manifest", hint=HINT)
    return Manifest.from_dict(data, p.parent)


def _unreadable(p: Path, e: OSError) -> NoReturn:
    if e.errno == errno.ENOENT:
        raise VmtoolError(f"manifest {p} does not exist", hint=HINT) from None
    if e.errno == errno.EISDIR:
        inside = p / "manifest.json"
        raise VmtoolError(
            f"manifest {p} is a directory",
            hint=f"give the manifest file in it: {inside}" if inside.is_file() else HINT,
        ) from None
    if e.errno in (errno.EACCES, errno.EPERM):
        raise VmtoolError(
            f"manifest {p} cannot be read: permission denied",
            hint="check the permissions of the file and its directories for the user running vmtool",
        ) from None
    raise VmtoolError(f"manifest {p} cannot be read: {e.strerror or e}", hint=HINT) from None


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
