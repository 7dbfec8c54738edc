"""Decisions about a domain for this host and slot (nova's designer.py): sizes, CPU mode, boot, disks,
network, console. The XML is read and edited through domain/model.py; hostile parts are removed by
domain/sanitise.py, sizes computed by domain/sizing.py.

Rules, in the order `render()` applies them:
- the root must be <domain type='kvm'|'qemu'>, arch the host's; the type becomes 'kvm' when the KVM
  probe passed, else 'qemu' (TCG) with a CPU model TCG runs; with KVM the CPU is host-passthrough;
- name (unique per job), uuid and MACs are new; the emulator is the host's; the machine type is kept
  when the host's qemu has it, else mapped to the host's q35 or pc;
- vCPUs = what the job asks (--cpus, else the XML's, else the slot's when a slot ad exists, else 1),
  at most the slot's; memory = what the job asks (--memory, else the XML's, else as much as the slot
  allows), at most the slot minus qemu's overhead (`sizing.qemu_overhead_mib`);
- boot: the build's kernel, initrd and command line when given (`BootFiles`);
- disks with device='disk' become the staged overlays in order (explicit qcow2 driver); every other
  disk or cdrom reading a host path outside the sandbox is removed, as are block/network/volume disks;
- NICs become user-mode networking (or a named libvirt network, or none, or with 'nat' a tap vmtool
  made, managed='no', in front of the VM's own network namespace), with new MACs;
- serial/console/parallel/channel devices backed by host files, devices, sockets or the network
  outside the sandbox are removed; the serial console goes to a file in the sandbox;
- graphics are removed (or, with graphics=True, bound to 127.0.0.1) with what depends on them
  (spice channels, USB redirection, host audio);
- removed as hostile, with a warning each (sanitise.py): <hostdev>, <filesystem> (host paths), <shmem>,
  <smartcard>, passthrough <tpm>/<input>, <redirdev>, <lease>, qemu:commandline/capabilities/override
  and any other element in the qemu namespace, <seclabel> (vmtool sets its own), <bootloader>, host
  ACPI tables, kernel/initrd/dtb/loader/nvram paths outside the sandbox and the firmware directories;
- removed as vmtool's business (noted, no warning): memtune, cputune, numatune, blkiotune, resource,
  memoryBacking, maxMemory, vcpus, perf, launchSecurity (limits live in the slot's cgroup).
Everything else is left exactly as it was.
"""

from __future__ import annotations

import difflib
import os
import random
import shlex
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmtool.datafiles import data_file
from vmtool.domain import sanitise
from vmtool.domain.model import CPU, Disk, Domain, Interface
from vmtool.domain.sanitise import Notes, Sandbox
from vmtool.domain.sizing import TCG_TB_CACHE_MIB, max_guest_memory, qemu_overhead_mib, to_mib
from vmtool.domain.slot import Slot
from vmtool.errors import DomainError, ImageError
from vmtool.image import formats

if TYPE_CHECKING:
    from vmtool.launch.host import HostFacts
    from vmtool.manifest import Manifest

TCG_CPU_MODEL = "qemu64"
DEFAULT_MEMORY_MIB = 512
VMTOOL_PREFIX = "vmtool"
DISK_BUS_PREFIX = {"virtio": "vd", "sata": "sd", "ide": "hd"}
NAT_TAP_PLACEHOLDER = "vmt-tap"  # what `vmtool domain render --network nat` shows; launch names the real one
BLOCK_DISK_TYPES = ("block", "network", "volume", "nvme", "vhostuser", "vhostvdpa", "dir")


@dataclass(frozen=True)
class BootFiles:
    """Direct kernel boot from a build: what render needs of its manifest."""

    kernel: Path
    initrd: Path
    cmdline: str
    build_dir: Path  # the build's directory: the domain may name files in it, as in the sandbox
    # The disk bus the initrd can boot from (the build's initrd check): virtio, else sata, else ide.
    disk_bus: str = "virtio"

    @classmethod
    def of(cls, manifest: Manifest) -> BootFiles:
        initrd = (manifest.extra.get("guest") or {}).get("initrd") or {}
        buses = [b for b in initrd.get("buses") or () if b in DISK_BUS_PREFIX]
        return cls(kernel=manifest.kernel_path, initrd=manifest.initrd_path, cmdline=manifest.cmdline,
                   build_dir=manifest.base_dir.resolve(), disk_bus=buses[0] if buses else "virtio")


@dataclass(frozen=True)
class RenderOptions:
    sandbox: Path
    disks: tuple[Path, ...] = ()
    name: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    memory_limit_mib: int | None = None
    boot: BootFiles | None = None
    console_log: Path | None = None
    channels: tuple[tuple[str, Path], ...] = ()
    network: str = "user"  # "user", "none", "nat" (vmtool.launch.netns) or the name of a libvirt network
    tap: str | None = None  # with network="nat": the tap vmtool made for qemu (None: a placeholder name)
    graphics: bool = False
    extra_cmdline: tuple[str, ...] = ()
    run_as: tuple[int, int] | None = None  # (uid, gid) qemu runs as; None: this process's
    seed: int | None = None  # makes name, uuid and MACs reproducible (golden tests)


@dataclass
class Rendered:
    xml: str
    source_xml: str
    name: str
    uuid: str
    cpus: int
    memory_mib: int
    memory_limit_mib: int
    console_log: Path
    accel: str
    slot: Slot
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def diff(self, a: str = "input", b: str = "rendered") -> str:
        return "".join(difflib.unified_diff(self.source_xml.splitlines(True), self.xml.splitlines(True), a, b))


class _Renderer:
    def __init__(self, dom: Domain, opts: RenderOptions, host: HostFacts, slot: Slot) -> None:
        self.dom = dom
        self.opts = opts
        self.host = host
        self.slot = slot
        self.sandbox = Sandbox(opts.sandbox, opts.boot.build_dir if opts.boot is not None else None)
        self.rng = random.Random(opts.seed) if opts.seed is not None else random.SystemRandom()
        self.notes = Notes()
        self.template = False
        self._orig = ("", "")

    def warn(self, msg: str) -> None:
        self.notes.warn(msg)

    def change(self, msg: str) -> None:
        self.notes.change(msg)

    # -- identity -------------------------------------------------------------------------------------

    def identity(self) -> tuple[str, str]:
        d = self.dom
        if d.tag != "domain":
            raise DomainError(f"not a libvirt domain XML (root element <{d.tag}>)",
                              hint="give the output of 'virsh dumpxml NAME'")
        if d.type not in ("kvm", "qemu"):
            raise DomainError(f"domain type {d.type!r} is not supported (only kvm and qemu)",
                              hint="export the VM from a KVM/QEMU host")
        arch = d.os_arch or self.host.arch
        if arch != self.host.arch:
            raise DomainError(f"the domain is for {arch}, this host runs {self.host.arch} guests",
                              hint="vmtool does not emulate other architectures")
        if d.os_type not in (None, "hvm"):
            raise DomainError(f"OS type {d.os_type!r} is not supported (only hvm)")
        old_name, old_uuid = d.name, d.uuid
        if self.opts.name:
            name = self.opts.name
        else:
            tag = self.slot.job_id or str(os.getpid())
            name = f"{VMTOOL_PREFIX}-{tag}-{self.rng.getrandbits(32):08x}"
        uid = str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))
        d.name = name
        d.uuid = uid
        self.change(f"name {old_name!r} -> {name!r}, new uuid")
        # Keep the original identity in our metadata for the record.
        self._orig = (old_name or "", old_uuid or "")
        d.type = "kvm" if self.host.kvm else "qemu"
        return name, uid

    def machine(self) -> None:
        d = self.dom
        d.os_arch = self.host.arch
        m = d.os_machine
        if m and m in self.host.machines:
            return
        family = "q35" if m and "q35" in m else "pc"
        if family not in self.host.machines:
            family = self.host.machines[0] if self.host.machines else "pc"
        if m:
            self.change(f"machine type {m!r} is not in this host's qemu; using {family!r}")
        d.os_machine = family

    def emulator(self) -> None:
        d = self.dom
        old = d.emulator
        if old and old != self.host.emulator:
            self.warn(f"emulator {old!r} replaced by this host's {self.host.emulator!r}")
        d.emulator = self.host.emulator

    # -- sizes ----------------------------------------------------------------------------------------

    def sizes(self) -> tuple[int, int, int]:
        d, slot, accel = self.dom, self.slot, self.host.accel
        xml_vcpu = None if self.template else d.vcpu
        has_ad = slot.source in ("machine-ad", "job-ad")
        cpus = self.opts.cpus or (slot.cpus if has_ad else None) or xml_vcpu or 1
        if cpus > slot.cpus:
            self.warn(f"{cpus} vCPUs asked, the slot has {slot.cpus}: using {slot.cpus}")
            cpus = slot.cpus
        xml_mem = to_mib(d.memory, d.memory_unit) if d.memory and not self.template else None
        cap = max_guest_memory(slot.memory_mib, accel)
        if cap < 32:
            raise DomainError(f"the slot's {slot.memory_mib} MiB leave no room for a guest after qemu's "
                              f"overhead of {qemu_overhead_mib(32, accel)} MiB",
                              hint="ask for a bigger slot (request_memory)")
        asked = self.opts.memory_mib or xml_mem or (cap if has_ad else min(cap, DEFAULT_MEMORY_MIB))
        mem = asked
        if asked > cap:
            self.warn(f"{asked} MiB of guest memory asked, the slot ({slot.memory_mib} MiB, {slot.source}) "
                      f"allows {cap} MiB after qemu's overhead: using {cap} MiB")
            mem = cap
        limit = self.opts.memory_limit_mib or min(slot.memory_mib, mem + qemu_overhead_mib(mem, accel))
        d.vcpu = cpus
        d.vcpu_current = None
        d.vcpu_cpuset = None
        d.memory, d.memory_unit = mem, "MiB"
        if d.has("./currentMemory"):
            d.current_memory, d.current_memory_unit = mem, "MiB"
        if xml_vcpu != cpus or xml_mem != mem:
            self.change(f"size {xml_vcpu} vCPU / {xml_mem} MiB -> {cpus} vCPU / {mem} MiB")
        return cpus, mem, limit

    def cpu(self, cpus: int) -> None:
        d = self.dom
        cpu = CPU.new()
        if self.host.kvm:
            cpu.mode, cpu.check = "host-passthrough", "none"
        else:
            cpu.mode, cpu.match, cpu.check = "custom", "exact", "none"
            cpu.model_fallback = "forbid"
            cpu.model = TCG_CPU_MODEL
        cpu.topology_sockets, cpu.topology_dies, cpu.topology_cores, cpu.topology_threads = 1, 1, cpus, 1
        d.set_cpu(cpu)
        if not self.host.kvm:
            feats = d.ensure_features()
            for bad in ("kvm", "hyperv"):
                for _ in range(feats.remove_all(bad)):
                    self.change(f"<features><{bad}> removed (not available under TCG)")
            feats.set_tb_cache_mib(TCG_TB_CACHE_MIB)

    # -- boot ----------------------------------------------------------------------------------------

    def boot(self) -> None:
        d = self.dom
        sanitise.boot_paths(d, self.sandbox, self.notes)
        boot = self.opts.boot
        if boot is not None:
            cmdline = boot.cmdline.split()
            if not any(a.startswith("console=") for a in cmdline):
                cmdline.append("console=ttyS0")
            cmdline += kernel_words(self.opts.extra_cmdline)
            d.os_kernel = str(boot.kernel)
            d.os_initrd = str(boot.initrd)
            d.os_cmdline = kernel_cmdline(cmdline)
            self.change(f"direct kernel boot from {boot.kernel}")
        elif self.opts.extra_cmdline:
            if d.os_kernel is None:
                raise DomainError("extra kernel arguments need direct kernel boot",
                                  hint="give --manifest, or drop the extra kernel arguments")
            d.os_cmdline = " ".join([d.os_cmdline or "", kernel_cmdline(kernel_words(self.opts.extra_cmdline))]).strip()
        d.on_poweroff = "destroy"
        d.on_crash = "destroy"
        if d.on_reboot is None:
            d.on_reboot = "restart"

    # -- devices -------------------------------------------------------------------------------------

    def disks(self) -> None:
        overlays = list(self.opts.disks)
        for p in overlays:
            _check_overlay(p)
        used: set[str] = set()
        for disk in list(self.dom.disks):
            if disk.device in (None, "disk") and overlays:
                self._to_overlay(disk, overlays.pop(0))
                used.add(disk.target_dev or "")
                continue
            what = f"<disk device={disk.device or 'disk'!r} target={disk.target_dev!r}>"
            if disk.type in BLOCK_DISK_TYPES:
                self.warn(f"{what} of type {disk.type!r} removed: only files in the sandbox are allowed")
                disk.remove()
                continue
            src = disk.host_path
            if src is None:
                used.add(disk.target_dev or "")
                continue  # an empty cdrom tray
            if not self.sandbox.allows(src):
                self.warn(f"{what} {src!r} removed: outside the sandbox")
                disk.remove()
                continue
            if self.sandbox.absolute(src) != src:
                disk.set_host_path(self.sandbox.absolute(src))
            fmt, why = _sandbox_image_format(self.sandbox.local(src))
            if why:
                self.warn(f"{what} {src!r} removed: {why}")
                disk.remove()
                continue
            if fmt and disk.driver_type != fmt:
                # explicit, so neither libvirt nor qemu probes a format from the guest's data
                disk.driver_name, disk.driver_type = "qemu", fmt
            disk.drop_backing_chain()
            used.add(disk.target_dev or "")
        bus = self.opts.boot.disk_bus if self.opts.boot is not None else "virtio"
        prefix = DISK_BUS_PREFIX[bus]
        if bus != "virtio" and overlays:
            self.change(f"disks on the {bus} bus: the build's initrd has no virtio disk driver")
        for p in overlays:
            n = 0
            while f"{prefix}{chr(ord('a') + n)}" in used:
                n += 1
            dev = f"{prefix}{chr(ord('a') + n)}"
            used.add(dev)
            disk = self.dom.disks.add(type="file", device="disk")
            disk.driver_name = "qemu"
            disk.target_dev, disk.target_bus = dev, bus
            self._to_overlay(disk, p)
            disk.reindent()

    def _to_overlay(self, disk: Disk, path: Path) -> None:
        old = disk.host_path
        disk.make_file(path.resolve(), "qcow2")
        if disk.target_dev is None:
            disk.target_dev = "vda"
        self.change(f"disk {disk.target_dev}" + (f" {old!r}" if old else "") + f" -> overlay {path}")

    def mac(self) -> str:
        b = [0x52, 0x54, 0x00] + [self.rng.getrandbits(8) for _ in range(3)]
        return ":".join(f"{x:02x}" for x in b)

    def interfaces(self) -> None:
        for nic in list(self.dom.interfaces):
            if self.opts.network == "none":
                self.change(f"interface {nic.type!r} removed (--network none)")
                nic.remove()
                continue
            old = nic.type
            sanitise.host_nic_parts(nic, self.notes)
            self._net_type(nic)
            nic.mac = self.mac()
            if nic.model is None:
                nic.model = "virtio"
            self.change(f"interface {old!r} -> {nic.type!r}, new MAC")

    def _net_type(self, nic: Interface) -> None:
        if self.opts.network == "user":
            nic.type = "user"
            nic.source_network = None
            nic.target_dev = None
        elif self.opts.network == "nat":
            # A tap vmtool made beforehand (managed='no': libvirt neither creates nor deletes it);
            # the guest's own network namespace is behind it (vmtool.launch.netns).
            nic.type = "ethernet"
            nic.source_network = None
            nic.target_dev, nic.target_managed = self.opts.tap or NAT_TAP_PLACEHOLDER, "no"
        else:
            nic.type = "network"
            nic.source_network = self.opts.network

    def chardevs(self) -> None:
        sanitise.host_chardevs(self.dom, self.sandbox, self.notes, graphics=self.opts.graphics)
        serial = self.dom.serials.add(type="file")
        serial.source_path = str(self.console_log)
        serial.source_append = "off"
        serial.target_port = "0"
        serial.reindent()
        for cname, sock in self.opts.channels:
            ch = self.dom.channels.add(type="unix")
            ch.source_mode, ch.source_path = "bind", str(sock)
            ch.target_type, ch.target_name = "virtio", cname
            ch.reindent()

    def graphics(self) -> None:
        for g in list(self.dom.graphics):
            if not self.opts.graphics or g.type not in ("vnc", "spice"):
                self.change(f"<graphics type={g.type!r}> removed")
                g.remove()
                continue
            for ls in list(g.listens):
                ls.remove()
            if g.socket:
                g.socket = None
            g.listen = "127.0.0.1"
            g.autoport = "yes"
            g.port = None
            g.listens.add(type="address", address="127.0.0.1")
            g.reindent()
            self.change(f"<graphics type={g.type!r}> bound to 127.0.0.1")
        for a in list(self.dom.audios):
            if a.type not in ("none", "spice") or (a.type == "spice" and not self.opts.graphics):
                self.change(f"<audio type={a.type!r}> removed")
                a.remove()

    def seclabel(self) -> None:
        if "dac" not in self.host.secmodels:
            # qemu:///session runs qemu as the caller and refuses a DAC label ("Security driver model
            # 'dac' is not available"); qemu then has exactly the job user's rights.
            return
        uid, gid = self.opts.run_as or (os.getuid(), os.getgid())
        sec = self.dom.seclabels.add(type="static", model="dac", relabel="no")
        sec.label = f"+{uid}:+{gid}"
        sec.reindent()

    def metadata(self, cpus: int, mem: int, limit: int) -> None:
        s = self.slot
        self.dom.set_vmtool_instance({
            "slot": {"source": s.source, "cpus": str(s.cpus), "memory_mib": str(s.memory_mib)},
            "size": {"cpus": str(cpus), "memory_mib": str(mem), "cgroup_memory_mib": str(limit),
                     "accel": self.host.accel},
            "origin": {"name": self._orig[0], "uuid": self._orig[1]},
        }, s.job_id)

    @property
    def console_log(self) -> Path:
        return (self.opts.console_log or self.sandbox.root / f"{self.dom.name}.console.log").resolve()


# Images in the sandbox are the job's: they stand alone. The overlays given with --disk are vmtool's own,
# staged on a base in a cache render does not know. Render reads headers only; it runs no qemu-img.
SANDBOX_DISK_POLICY = formats.Policy(whole_sectors=False, qemu=False)
OVERLAY_POLICY = formats.Policy(backing_roots=formats.ANYWHERE, qemu=False)


def _sandbox_image_format(p: Path | None) -> tuple[str | None, str]:
    """(format, '') of a file the domain keeps from the sandbox, or (None, why it is refused)."""
    if p is None or not p.exists():
        return None, ""  # libvirt reports a missing file itself
    try:
        info = formats.check(p, None, SANDBOX_DISK_POLICY)
    except ImageError as e:
        return None, f"{e.message} ({e.hint})" if e.hint else e.message
    return info.format, ""


def _check_overlay(p: Path) -> None:
    """A --disk overlay: qcow2, its backing file (a staged base) a plain file with its format named."""
    formats.check(p, "qcow2", OVERLAY_POLICY, what=f"disk {p}", error=DomainError)


def kernel_words(args: tuple[str, ...] | list[str]) -> list[str]:
    """Each --append ARG split into words the shell's way: "a=1 b" is two arguments, 'm="x y"' one."""
    out: list[str] = []
    for a in args:
        try:
            out += shlex.split(a)
        except ValueError as e:
            raise DomainError(f"--append {a!r}: {e}", hint='close the quote, e.g. --append \'msg="a b"\'') from None
    return out


def kernel_cmdline(words: list[str]) -> str:
    """Join words the way the kernel parses them (parse_args): it knows double quotes, not single
    ones, and cannot escape a double quote; a value with blanks becomes key="value"."""
    out = []
    for w in words:
        if '"' in w:
            raise DomainError(f"kernel argument {w!r} contains a double quote, which the kernel cannot parse",
                              hint="drop the quote from the argument")
        if any(c.isspace() for c in w):
            key, eq, value = w.partition("=")
            w = f'{key}="{value}"' if eq and key and not any(c.isspace() for c in key) else f'"{w}"'
        out.append(w)
    return " ".join(out)


def render(source: bytes | str | None, opts: RenderOptions, host: HostFacts, slot: Slot) -> Rendered:
    """Rewrite a domain XML (or vmtool's template when None) for this host and slot."""
    if source is None:
        text = data_file("templates", "domain/domain.xml").read_text()
    else:
        text = source.decode() if isinstance(source, bytes) else source
    dom = Domain.from_xml(text)
    r = _Renderer(dom, opts, host, slot)
    r.template = source is None
    name, uid = r.identity()
    r.machine()
    r.emulator()
    cpus, mem, limit = r.sizes()
    r.cpu(cpus)
    r.boot()
    sanitise.hostile_devices(dom, r.notes)
    r.disks()
    r.interfaces()
    r.graphics()
    r.chardevs()
    r.seclabel()
    r.metadata(cpus, mem, limit)
    if not opts.disks and opts.boot is None and not any(True for _ in dom.disks) and dom.os_kernel is None:
        raise DomainError("the domain has nothing to boot from", hint="give --disk OVERLAY or --manifest")
    return Rendered(
        xml=dom.to_xml(), source_xml=text if text.endswith("\n") else text + "\n", name=name, uuid=uid,
        cpus=cpus, memory_mib=mem, memory_limit_mib=limit, console_log=r.console_log, accel=host.accel,
        slot=slot, warnings=r.notes.warnings, changes=r.notes.changes,
    )
