"""The only door to processes: every external command vmtool runs goes through run() or spawn().

argv is always a list (never a shell string), it is logged before it runs, the child gets LC_ALL=C and
no stdin unless asked, and failures become CommandError carrying the argv and the tail of stderr
(mkosi's run.py, pip's call_subprocess, nova's processutils.execute with prlimit).
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Union

from vmtool.errors import CommandError, ToolMissing

log = logging.getLogger("vmtool.run")


class Secret:
    """A value that must never reach a log line or an error message."""

    def __init__(self, value: str, redacted: str = "****") -> None:
        self.value = value
        self.redacted = redacted

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"Secret({self.redacted!r})"


Arg = Union[str, "os.PathLike[str]", Secret]

# Which Debian package provides a tool, for the hint of ToolMissing.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "tune2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_admin": "xfsprogs",
    "sfdisk": "fdisk",
    "sgdisk": "gdisk",
    "pvcreate": "lvm2",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "beanstalkd": "beanstalkd",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "openssl": "openssl",
    "objcopy": "binutils",
    "nft": "nftables",
    "dnsmasq": "dnsmasq-base",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits applied in the child before exec (prlimit), as nova does for qemu-img info."""

    cpu_seconds: int | None = None
    address_space: int | None = None
    file_size: int | None = None

    def apply(self) -> None:
        if self.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds))
        if self.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))
        if self.file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size, self.file_size))


# qemu-img info on an untrusted image: 30 s of CPU and 1 GiB of address space (nova's QEMU_IMG_LIMITS).
QEMU_IMG_LIMITS = Limits(cpu_seconds=30, address_space=1 << 30)


def render(argv: Sequence[Arg]) -> str:
    """The argv as a shell-quoted line for logs, with secrets redacted."""
    return shlex.join(str(a) if isinstance(a, Secret) else os.fspath(a) for a in argv)


def _shown(argv: Sequence[Arg]) -> list[str]:
    return [str(a) if isinstance(a, Secret) else os.fspath(a) for a in argv]


def _reveal(argv: Sequence[Arg]) -> list[str]:
    return [a.value if isinstance(a, Secret) else os.fspath(a) for a in argv]


def find_tool(name: str) -> str:
    """Absolute path of a program, or ToolMissing naming the Debian package that has it."""
    for d in ("/usr/sbin", "/sbin"):
        # Debian puts some tools in sbin, which is not on a non-root PATH.
        if not shutil.which(name) and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(name, package=PACKAGES.get(name))
    return path


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    base = dict(os.environ)
    base["LC_ALL"] = "C"
    base.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if "/usr/sbin" not in base["PATH"].split(":"):
        base["PATH"] += ":/usr/sbin:/sbin"
    if env:
        base.update(env)
    return base


def _preexec(limits: Limits | None, new_session: bool) -> Callable[[], None] | None:
    if limits is None and not new_session:
        return None

    def fn() -> None:
        if new_session:
            os.setsid()
        if limits is not None:
            limits.apply()

    return fn


def _tail(data: bytes | str | None, lines: int = 20) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    input: bytes | None = None,
    capture: bool = True,
    stdout: int | IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    limits: Limits | None = None,
    hint: str | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion. stdout/stderr are captured (bytes) unless capture=False."""
    if not argv:
        raise ValueError("empty argv")
    real = _reveal(argv)
    if os.sep not in real[0]:
        real[0] = find_tool(real[0])
    log.debug("+ %s", render(argv))
    try:
        proc = subprocess.run(
            real,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else (subprocess.PIPE if capture else None),
            stderr=subprocess.PIPE if capture else None,
            env=_env(env),
            cwd=cwd,
            timeout=timeout,
            preexec_fn=_preexec(limits, False),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(_shown(argv), -9, _tail(e.stderr), hint=hint, timed_out=True) from None
    except FileNotFoundError as e:
        raise ToolMissing(os.path.basename(str(e.filename or real[0]))) from None
    if check and proc.returncode not in ok_codes:
        raise CommandError(_shown(argv), proc.returncode, _tail(proc.stderr), hint=hint)
    return proc


def spawn(
    argv: Sequence[Arg],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.PIPE,
    limits: Limits | None = None,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-running command (a daemon, a VM) and return its Popen; the caller owns it."""
    real = _reveal(argv)
    if os.sep not in real[0]:
        real[0] = find_tool(real[0])
    log.debug("+ %s &", render(argv))
    try:
        return subprocess.Popen(
            real,
            env=_env(env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=_preexec(limits, new_session),
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise ToolMissing(os.path.basename(str(e.filename or real[0]))) from None


# Re-exported so callers never import subprocess themselves.
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired
