"""Which init a guest runs, and how `vmtool build --agent` hooks the agent into it.

The init is read from the guest tree (never run): /sbin/init's target and content, and the files each
init system needs. Each init gets the agent started its own way, from templates/init/:
- vmtool: the embedded default guest's /sbin/init runs /etc/vmtool/rc.d/* and powers off itself;
- systemd: a unit ordered after local-fs.target, enabled in multi-user.target.wants, whose wrapper
  powers the guest off through `systemctl poweroff` after STOP;
- sysvinit: a `once` entry appended to /etc/inittab, run after the runlevel's rc scripts;
- openrc: a service in /etc/init.d added to the default runlevel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmtool.datafiles import data_file
from vmtool.errors import ImageError
from vmtool.image.guesttree import S_IFMT, S_IFREG

KINDS = ("vmtool", "systemd", "sysvinit", "openrc")
BOOT_WRAPPER = "/usr/lib/vmtool/agent-boot"
SYSTEMD_UNIT = "/etc/systemd/system/vmtool-agent.service"
SYSTEMD_WANTS = "/etc/systemd/system/multi-user.target.wants/vmtool-agent.service"
OPENRC_SERVICE = "/etc/init.d/vmtool-agent"
OPENRC_LINK = "/etc/runlevels/default/vmtool-agent"
INITTAB = "/etc/inittab"
POWEROFF = {
    "vmtool": "",  # its /sbin/init powers off after rc.d
    "systemd": "systemctl poweroff --no-block",
    "sysvinit": "/sbin/poweroff",
    "openrc": "/sbin/poweroff",
}
VMTOOL_INIT_MARK = b"vmtool default guest init"


class TreeReader(Protocol):
    def resolve(self, path: str, *, what: str = "") -> str: ...

    def lstat(self, path: str) -> tuple[int, int, int] | None: ...

    def read_file(self, path: str, limit: int) -> bytes: ...


@dataclass(frozen=True)
class InitSystem:
    kind: str  # one of KINDS, or "unknown"
    evidence: str  # what was seen, for inspect and the manifest

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "evidence": self.evidence}


@dataclass(frozen=True)
class Hook:
    """What --agent adds for this init: files (path -> (content, mode)) and symlinks (path -> target)."""

    files: dict[str, tuple[bytes, int]]
    symlinks: dict[str, str]
    description: str


def _exists(tree: TreeReader, path: str) -> bool:
    try:
        tree.resolve(path)
        return True
    except ImageError:
        return False


def detect(tree: TreeReader) -> InitSystem:
    """The guest's init system, from /sbin/init (what the kernel runs when the cmdline names none)."""
    try:
        real = tree.resolve("/sbin/init", what="/sbin/init")
    except ImageError as e:
        return InitSystem("unknown", f"/sbin/init: {e.message}")
    base = real.rsplit("/", 1)[-1]
    if base == "systemd":
        return InitSystem("systemd", f"/sbin/init -> {real}")
    if base == "openrc-init":
        return InitSystem("openrc", f"/sbin/init -> {real}")
    st = tree.lstat(real)
    head = b""
    if st is not None and st[1] & S_IFMT == S_IFREG and st[2] <= 64 << 10:  # a script, not a binary
        head = tree.read_file(real, 64 << 10)
    if VMTOOL_INIT_MARK in head:
        return InitSystem("vmtool", f"{real} is vmtool's default guest init")
    inittab = b""
    if _exists(tree, INITTAB):
        inittab = tree.read_file(tree.resolve(INITTAB), 1 << 20)
    if b"openrc" in inittab and (_exists(tree, "/sbin/openrc") or _exists(tree, "/usr/sbin/openrc")):
        return InitSystem("openrc", f"{real} with /etc/inittab running openrc")
    if base in ("init", "busybox") and inittab:
        return InitSystem("sysvinit", f"{real} with /etc/inittab")
    return InitSystem("unknown", f"/sbin/init -> {real}" + ("" if inittab else ", no /etc/inittab"))


def hook(init: InitSystem, tree: TreeReader) -> Hook:
    """How the agent is started on this init; an init vmtool cannot hook is refused."""
    kind = init.kind
    if kind not in KINDS:
        raise ImageError(
            f"vmtool cannot start its agent on this image's init ({init.evidence})",
            hint="the agent hooks into systemd, sysvinit (/etc/inittab), OpenRC or vmtool's own init; "
            "start /usr/lib/vmtool/agent-boot from your init yourself and build without --agent",
        )
    wrapper = data_file("templates", "init/agent-boot").read_bytes()
    files: dict[str, tuple[bytes, int]] = {}
    links: dict[str, str] = {}
    if kind == "vmtool":
        return Hook(files, links, "started by vmtool's own init from /etc/vmtool/rc.d")
    files[BOOT_WRAPPER] = (wrapper, 0o755)
    if kind == "systemd":
        files[SYSTEMD_UNIT] = (data_file("templates", "init/vmtool-agent.service").read_bytes(), 0o644)
        links[SYSTEMD_WANTS] = "../vmtool-agent.service"
        return Hook(files, links, f"systemd unit {SYSTEMD_UNIT}, wanted by multi-user.target")
    if kind == "openrc":
        files[OPENRC_SERVICE] = (data_file("templates", "init/vmtool-agent.openrc").read_bytes(), 0o755)
        links[OPENRC_LINK] = OPENRC_SERVICE
        return Hook(files, links, f"OpenRC service {OPENRC_SERVICE} in the default runlevel")
    current = tree.read_file(tree.resolve(INITTAB), 1 << 20)
    entry = data_file("templates", "init/inittab.line").read_bytes()
    line = [ln for ln in entry.splitlines() if ln and not ln.startswith(b"#")][0]
    if line not in current.splitlines():
        if current and not current.endswith(b"\n"):
            current += b"\n"
        current += entry
    files[INITTAB] = (current, 0o644)
    return Hook(files, links, "a `once` entry in /etc/inittab, after the runlevel's rc scripts")


def poweroff_command(kind: str) -> str:
    return POWEROFF.get(kind, "")
