"""What `vmtool build` is asked for: frozen options whose choices are checked when they are made.

Kept apart from vmtool.image.build (which pulls in the whole image stack) so the CLI can name the
choices in its help without importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from vmtool.errors import ImageError, VmtoolError
from vmtool.image.fs import LABEL_MAX
from vmtool.manifest import ImageFormat
from vmtool.queue.agent import AgentMode

DEFAULT_LABEL = "cloudimg-rootfs"
LABEL_RE = re.compile(r"[A-Za-z0-9._-]+")


class Backend(StrEnum):
    AUTO = "auto"  # native when the root (and /boot) are ext2/3/4, else guestfs
    NATIVE = "native"  # e2fsprogs: no root, no appliance
    GUESTFS = "guestfs"  # a libguestfs appliance: any filesystem


E = TypeVar("E", bound=StrEnum)


def choice(kind: type[E], value: E | str, option: str) -> E:
    """`value` as a member of `kind`; anything else is the one user error naming the valid values."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(m.value for m in kind)
        raise VmtoolError(f"unknown {option} {value!r}", hint=f"use one of: {valid}") from None


@dataclass(frozen=True)
class BuildOptions:
    """What `vmtool build` was asked for. Choices are checked here, when the options are made.

    The enum fields also take their string values (as the CLI passes them); they are converted.
    """

    source: Path
    outdir: Path
    format: ImageFormat | None = None  # of the source; None: from its header
    label: str | None = None
    rootfs_format: ImageFormat = ImageFormat.RAW
    kernel_version: str | None = None
    ssh_keys: tuple[Path, ...] = ()
    backend: Backend = Backend.AUTO
    root: str | None = None
    force: bool = False
    agent: AgentMode | None = None
    disk: bool = False
    disk_format: ImageFormat = ImageFormat.RAW
    initrd_check: bool = True  # read the initrd to learn which disk buses it can boot from

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("source", Path(self.source))
        put("outdir", Path(self.outdir))
        put("ssh_keys", tuple(Path(k) for k in self.ssh_keys))
        if self.format is not None:
            put("format", choice(ImageFormat, self.format, "--format"))
        put("rootfs_format", choice(ImageFormat, self.rootfs_format, "--rootfs-format"))
        put("backend", choice(Backend, self.backend, "--backend"))
        if self.agent is not None:
            put("agent", choice(AgentMode, self.agent, "--agent"))
        put("disk_format", choice(ImageFormat, self.disk_format, "--disk-format"))
        if self.label is not None:
            check_label(self.label, "ext4", explicit=True)


def check_label(label: str, fstype: str, *, explicit: bool) -> None:
    if not LABEL_RE.fullmatch(label):
        raise ImageError(
            f"label {label!r} may only hold letters, digits, '.', '_' and '-'",
            hint="it goes on the kernel command line as root=LABEL=...; choose a simple --label",
        )
    limit = LABEL_MAX.get(fstype, 16)
    if len(label.encode()) > limit:
        what = "the label you gave" if explicit else f"the default label {label!r}"
        raise ImageError(
            f"{fstype} labels are limited to {limit} bytes and {what} has {len(label.encode())}",
            hint="give a shorter one, e.g. --label img-rootfs"
            if fstype == "xfs"
            else "give a shorter --label",
        )
