"""Hostile parts of a domain XML: what would hand the guest (or qemu) host resources, removed with a warning.

A domain XML comes from the job, so it is untrusted: host devices, host paths outside the sandbox,
programs run on the host and options passed to qemu past libvirt are removed here, each with a warning
saying what and why. Elements that are vmtool's business (limits live in the slot's cgroup) are removed
with a note. The edits go through domain/model.py; what the domain becomes otherwise is domain/policy.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vmtool.domain.model import Domain, Interface

FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/qemu", "/usr/share/seabios",
                 "/usr/share/edk2", "/usr/share/AAVMF", "/usr/lib/ipxe")

# Elements removed because vmtool, not the XML, decides about them (limits live in the cgroup).
POLICY_ELEMENTS = ("memtune", "cputune", "numatune", "blkiotune", "resource", "memoryBacking", "maxMemory",
                   "vcpus", "perf", "launchSecurity", "iothreadids")
# Devices removed outright because they hand host resources to the guest.
HOSTILE_DEVICES = {
    "hostdev": "host device passthrough",
    "filesystem": "host directory passthrough",
    "shmem": "host shared memory",
    "smartcard": "host smartcard",
    "redirdev": "USB redirection",
    "lease": "host lock lease",
    "nvram": "host nvram device",
}
# Interface children kept when the interface becomes vmtool's networking; the rest name host resources.
NIC_KEEP = {"mac", "model", "address", "boot", "mtu", "link", "alias", "acpi"}
HOST_NIC_TYPES = ("ethernet", "hostdev", "direct", "vhostuser")
HOST_NIC_PARTS = ("script", "rom", "backend", "downscript")
SPICE_CHARDEVS = ("spicevmc", "spiceport", "qemu-vdagent")


@dataclass
class Notes:
    """What a render did: warnings (something of the job's was refused) and changes (for the record)."""

    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def change(self, msg: str) -> None:
        self.changes.append(msg)


class Sandbox:
    """The host directories a domain may name: the job's sandbox and, for direct kernel boot, the build's."""

    def __init__(self, root: Path, build_dir: Path | None = None) -> None:
        self.root = root.resolve()
        self.allowed = [self.root] + ([build_dir.resolve()] if build_dir is not None else [])

    def local(self, raw: str | None) -> Path | None:
        """A host path named by the XML, resolved (relative = sandbox); None if empty."""
        if not raw:
            return None
        p = Path(raw)
        if not p.is_absolute():
            p = self.root / p
        return Path(os.path.realpath(p))

    def allows(self, raw: str | None, extra: tuple[str, ...] = ()) -> bool:
        p = self.local(raw)
        return p is not None and _under(p, self.allowed + [Path(d) for d in extra])

    def absolute(self, raw: str) -> str:
        """`raw` as it must stand in the rendered XML: libvirtd and qemu resolve a relative path from their
        own working directory, not the sandbox, so `etc/passwd` checked as sandbox/etc/passwd would open
        /etc/passwd. A relative path is written back as the sandbox path it was checked as."""
        return raw if Path(raw).is_absolute() else str(self.local(raw))


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def boot_paths(dom: Domain, sandbox: Sandbox, notes: Notes) -> None:
    """Boot loaders run on the host; kernel, initrd, dtb, ACPI tables and nvram from outside the sandbox,
    firmware from outside the sandbox and the firmware directories."""
    os_ = dom.ensure_os()
    for bl in [*dom.bootloaders, *dom.bootloader_args]:
        notes.warn(f"<{bl.tag}> {bl.text!r} removed: runs a program on the host")
        bl.remove()
    for tag in ("kernel", "initrd", "dtb"):
        if os_.has(f"./{tag}"):
            path = getattr(os_, tag)
            if not sandbox.allows(path):
                notes.warn(f"<os><{tag}> {path!r} removed: outside the sandbox")
                setattr(os_, tag, None)
                if tag == "kernel":
                    os_.remove_cmdlines()
            elif path and sandbox.absolute(path) != path:
                setattr(os_, tag, sandbox.absolute(path))
    if os_.loader and not sandbox.allows(os_.loader, FIRMWARE_DIRS):
        notes.warn(f"<os><loader> {os_.loader!r} removed: not in the sandbox or a firmware directory")
        os_.loader = None
    elif os_.loader and sandbox.absolute(os_.loader) != os_.loader:
        os_.loader = sandbox.absolute(os_.loader)
    if os_.has("./nvram"):
        tmpl = os_.nvram_template
        if tmpl and not sandbox.allows(tmpl, FIRMWARE_DIRS):
            notes.warn(f"<os><nvram template> {tmpl!r} removed: not in a firmware directory")
            os_.nvram_template = None
        elif tmpl and sandbox.absolute(tmpl) != tmpl:
            os_.nvram_template = sandbox.absolute(tmpl)
        nvram = os_.nvram
        if nvram and nvram.strip() and not sandbox.allows(nvram):
            path = sandbox.root / f"{dom.name}_VARS.fd"
            notes.change(f"nvram {nvram.strip()!r} -> {str(path)!r}")
            os_.nvram = str(path)
        elif nvram and nvram.strip() and sandbox.absolute(nvram.strip()) != nvram.strip():
            os_.nvram = sandbox.absolute(nvram.strip())
        for _ in range(os_.remove_nvram_sources()):
            notes.warn("<os><nvram> source removed (vmtool keeps nvram in the sandbox)")
    for table in list(os_.acpi_tables):
        if not sandbox.allows(table.text):
            notes.warn(f"<os><acpi><table> {table.text!r} removed: outside the sandbox")
            table.remove()
        elif table.text and sandbox.absolute(table.text) != table.text:
            table.text = sandbox.absolute(table.text)
    os_.remove_empty_acpi()


def hostile_devices(dom: Domain, notes: Notes) -> None:
    """Host passthrough devices, qemu-namespace elements, the XML's own security labels, and the
    tuning elements that are vmtool's (cgroup) business."""
    for tag, why in HOSTILE_DEVICES.items():
        for dev in dom.devices_of(tag):
            if tag == "filesystem" and dev.type == "ram":
                continue
            notes.warn(f"<{tag}>{dev.describe()} removed: {why}")
            dev.remove()
    for dev in dom.devices_of("tpm"):
        if dev.model is not None and dev.has("./backend") and dev.backend_type == "passthrough":
            notes.warn("<tpm> with a passthrough backend removed: host TPM")
            dev.remove()
    for dev in dom.devices_of("input"):
        if dev.type in ("passthrough", "evdev"):
            notes.warn(f"<input type={dev.type!r}> removed: host input device")
            dev.remove()
    for dev in dom.devices_of("rng"):
        ok = dev.has("./backend") and dev.backend_model in ("random", "builtin") and \
            (dev.backend_path or "/dev/urandom").strip() in ("/dev/random", "/dev/urandom", "/dev/hwrng")
        if not ok:
            notes.warn("<rng> with a backend other than the host's /dev/urandom removed")
            dev.remove()
    for el in dom.qemu_elements():
        notes.warn(f"<qemu:{el.tag.split('}', 1)[1]}> removed: passes options to qemu past libvirt")
        el.remove()
    for sec in dom.all_seclabels():
        if sec.is_child_of(dom):
            notes.change("<seclabel> replaced by vmtool's")
            if sec.type == "none" or sec.relabel == "no":
                notes.warn(f"<seclabel type={sec.type!r}> removed: vmtool sets its own")
        else:
            notes.warn(f"<{sec.parent_tag}><seclabel> removed")
        sec.remove()
    for tag in POLICY_ELEMENTS:
        for el in dom.top_level(tag):
            notes.change(f"<{tag}> removed (vmtool sets limits on the cgroup)")
            el.remove()


def host_chardevs(dom: Domain, sandbox: Sandbox, notes: Notes, *, graphics: bool) -> None:
    """Serial, console, parallel and channel devices backed by host files, devices, sockets or the
    network outside the sandbox; SPICE ones go with the graphics; the XML's own consoles make way for
    vmtool's."""
    for ch in dom.chardevs():
        kind = f"<{ch.tag} type={ch.type!r}>"
        t = ch.type or "pty"
        if t in SPICE_CHARDEVS and not graphics:
            notes.change(f"{kind} removed with the graphics")
            ch.remove()
        elif t in ("pty", "null", "vc", "stdio") or (t == "unix" and ch.source_path is None):
            if ch.tag in ("serial", "console"):
                ch.remove()  # the console is vmtool's
        elif t in ("file", "pipe", "unix") and sandbox.allows(ch.source_path):
            if ch.source_path and sandbox.absolute(ch.source_path) != ch.source_path:
                ch.source_path = sandbox.absolute(ch.source_path)
        elif t in SPICE_CHARDEVS:
            pass
        else:
            notes.warn(f"{kind} {ch.source_path or t!r} removed: connects to the host outside the sandbox")
            ch.remove()


def host_nic_parts(nic: Interface, notes: Notes) -> None:
    """Everything of an interface but its MAC, model, address and the like: scripts, ROMs, backends and
    sources name host resources (the interface's type and source are set by policy)."""
    old = nic.type
    for tag, what in nic.remove_children_except(NIC_KEEP):
        if tag in HOST_NIC_PARTS or old in HOST_NIC_TYPES:
            notes.warn(f"<interface type={old!r}> <{tag}> {what!r} removed: host resource")
    nic.clear_attributes()
