"""Decisions about a domain for this host and slot (nova's designer.py): sizes, CPU mode, devices,
and what to do with hostile elements. The XML itself is edited through domain/model.py.

Rules, in the order `render()` applies them:
- the root must be <domain type='kvm'|'qemu'>, arch the host's; the type becomes 'kvm' when the KVM
  probe passed, else 'qemu' (TCG) with a CPU model TCG runs; with KVM the CPU is host-passthrough;
- name (unique per job), uuid and MACs are new; the emulator is the host's; the machine type is kept
  when the host's qemu has it, else mapped to the host's q35 or pc;
- vCPUs = what the job asks (--cpus, else the XML's, else the slot's when a slot ad exists, else 1),
  at most the slot's; memory = what the job asks (--memory, else the XML's, else as much as the slot
  allows), at most the slot minus qemu's overhead (`qemu_overhead_mib`);
- disks with device='disk' become the staged overlays in order (explicit qcow2 driver); every other
  disk or cdrom reading a host path outside the sandbox is removed, as are block/network/volume disks;
- NICs become user-mode networking (or a named libvirt network, or none), with new MACs;
- serial/console/parallel/channel devices backed by host files, devices, sockets or the network
  outside the sandbox are removed; the serial console goes to a file in the sandbox;
- graphics are removed (or, with graphics=True, bound to 127.0.0.1) with what depends on them
  (spice channels, USB redirection, host audio);
- removed as hostile, with a warning each: <hostdev>, <filesystem> (host paths), <shmem>, <smartcard>,
  passthrough <tpm>/<input>, <redirdev>, <lease>, qemu:commandline/capabilities/override and any other
  element in the qemu namespace, <seclabel> (vmtool sets its own), <bootloader>, host ACPI tables,
  kernel/initrd/dtb/loader/nvram paths outside the sandbox and the firmware directories;
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

from lxml import etree

from vmtool.domain.model import QEMU_NS, VMTOOL_NS, Disk, Domain
from vmtool.domain.slot import Slot
from vmtool.domain.xml import append_child, reindent, remove
from vmtool.errors import DomainError, ImageError
from vmtool.image import formats

FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/qemu", "/usr/share/seabios",
                 "/usr/share/edk2", "/usr/share/AAVMF", "/usr/lib/ipxe")
TCG_CPU_MODEL = "qemu64"
TCG_TB_CACHE_MIB = 128
DEFAULT_MEMORY_MIB = 512
VMTOOL_PREFIX = "vmtool"

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


@dataclass(frozen=True)
class HostFacts:
    """What this host can run (from libvirt's capabilities and the KVM probe; see vmtool.launch.host)."""

    emulator: str
    arch: str = "x86_64"
    machines: tuple[str, ...] = ("pc", "q35")
    domain_types: tuple[str, ...] = ("qemu",)
    kvm: bool = False
    kvm_reason: str = ""

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm else "tcg"


@dataclass(frozen=True)
class RenderOptions:
    sandbox: Path
    disks: tuple[Path, ...] = ()
    name: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    memory_limit_mib: int | None = None
    manifest: Path | None = None
    console_log: Path | None = None
    channels: tuple[tuple[str, Path], ...] = ()
    network: str = "user"  # "user", "none" or the name of a libvirt network
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


def qemu_overhead_mib(memory_mib: int, accel: str) -> int:
    """Memory qemu needs beyond the guest's RAM: max(64 MiB, 5%), plus, under TCG, its translation cache
    (capped with <tb-cache>) and 32 MiB. The cap is 128 MiB: a Linux boot translated ~75-100 MiB of code
    here, and a 64 MiB cache made boots ~10% slower (flushes); qemu's own default is 1 GiB."""
    base = max(64, -(-memory_mib * 5 // 100))
    return base + (TCG_TB_CACHE_MIB + 32 if accel == "tcg" else 0)


def max_guest_memory(slot_mib: int, accel: str) -> int:
    """The largest guest memory m with m + overhead(m) <= slot memory."""
    lo, hi = 0, slot_mib
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + qemu_overhead_mib(mid, accel) <= slot_mib:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _to_mib(value: int, unit: str | None) -> int:
    unit = (unit or "KiB").lower()
    factors = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
               "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40,
               "tb": 10**12}
    if unit not in factors:
        raise DomainError(f"domain XML: unknown memory unit {unit!r}", hint="use KiB, MiB or GiB")
    return value * factors[unit] // (1 << 20)


def _under(path: Path, roots: list[Path]) -> bool:
    for r in roots:
        if path == r or r in path.parents:
            return True
    return False


class _Renderer:
    def __init__(self, dom: Domain, opts: RenderOptions, host: HostFacts, slot: Slot) -> None:
        self.dom = dom
        self.opts = opts
        self.host = host
        self.slot = slot
        self.sandbox = opts.sandbox.resolve()
        self.rng = random.Random(opts.seed) if opts.seed is not None else random.SystemRandom()
        self.warnings: list[str] = []
        self.template = False
        self.changes: list[str] = []
        self.allowed = [self.sandbox]
        if opts.manifest is not None:
            self.allowed.append(opts.manifest.resolve().parent)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def local(self, raw: str | None) -> Path | None:
        """A host path named by the XML, resolved (relative = sandbox); None if empty."""
        if not raw:
            return None
        p = Path(raw)
        if not p.is_absolute():
            p = self.sandbox / p
        return Path(os.path.realpath(p))

    def allowed_path(self, raw: str | None, extra: tuple[str, ...] = ()) -> bool:
        p = self.local(raw)
        return p is not None and _under(p, self.allowed + [Path(d) for d in extra])

    # -- identity -------------------------------------------------------------------------------------

    def identity(self) -> tuple[str, str]:
        d = self.dom
        if d.node.tag != "domain":
            raise DomainError(f"not a libvirt domain XML (root element <{d.node.tag}>)",
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
        if d.node.find("uuid") is None:
            name_el = d.node.find("name")
            append_child(d.node, etree.Element("uuid"),
                         index=None if name_el is None else list(d.node).index(name_el) + 1)
        d.uuid = uid
        self.changes.append(f"name {old_name!r} -> {name!r}, new uuid")
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
            self.changes.append(f"machine type {m!r} is not in this host's qemu; using {family!r}")
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
        xml_mem = _to_mib(d.memory, d.memory_unit) if d.memory and not self.template else None
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
        vcpu = d.node.find("vcpu")
        if vcpu is None:
            d.vcpu = cpus
            vcpu = d.node.find("vcpu")
        assert vcpu is not None
        vcpu.text = str(cpus)
        for a in ("current", "cpuset"):
            if a in vcpu.attrib:
                del vcpu.attrib[a]
        d.memory, d.memory_unit = mem, "MiB"
        if d.node.find("currentMemory") is not None:
            d.current_memory, d.current_memory_unit = mem, "MiB"
        if xml_vcpu != cpus or xml_mem != mem:
            self.changes.append(f"size {xml_vcpu} vCPU / {xml_mem} MiB -> {cpus} vCPU / {mem} MiB")
        return cpus, mem, limit

    def cpu(self, cpus: int) -> None:
        d = self.dom
        old = d.node.find("cpu")
        new = etree.Element("cpu")
        if self.host.kvm:
            new.set("mode", "host-passthrough")
            new.set("check", "none")
        else:
            new.set("mode", "custom")
            new.set("match", "exact")
            new.set("check", "none")
            model = etree.SubElement(new, "model", fallback="forbid")
            model.text = TCG_CPU_MODEL
        etree.SubElement(new, "topology", sockets="1", dies="1", cores=str(cpus), threads="1")
        if old is not None:
            new.tail = old.tail
            old.addprevious(new)
            d.node.remove(old)
            reindent(new, _indent(new))
        else:
            append_child(d.node, new, index=_index_after(d.node, ("vcpu", "memory")))
        if not self.host.kvm:
            feats = d.node.find("features")
            if feats is None:
                feats = append_child(d.node, etree.Element("features"), index=_index_after(d.node, ("os",)))
            for bad in ("kvm", "pmu", "hyperv", "smm"):
                for el in feats.findall(bad):
                    if bad == "hyperv" or bad == "kvm":
                        remove(el)
                        self.changes.append(f"<features><{bad}> removed (not available under TCG)")
            tcg = feats.find("tcg")
            if tcg is None:
                tcg = append_child(feats, etree.Element("tcg"))
            for el in tcg.findall("tb-cache"):
                remove(el)
            tb = etree.Element("tb-cache", unit="MiB")
            tb.text = str(TCG_TB_CACHE_MIB)
            append_child(tcg, tb)

    # -- boot ----------------------------------------------------------------------------------------

    def boot(self) -> None:
        d = self.dom
        osn = d.node.find("os")
        if osn is None:
            osn = append_child(d.node, etree.Element("os"), index=_index_after(d.node, ("vcpu", "memory")))
        for tag in ("bootloader", "bootloader_args"):
            for el in d.node.findall(tag):
                self.warn(f"<{tag}> {el.text!r} removed: runs a program on the host")
                remove(el)
        for tag in ("kernel", "initrd", "dtb"):
            bootfile = osn.find(tag)
            if bootfile is not None and not self.allowed_path(bootfile.text):
                self.warn(f"<os><{tag}> {bootfile.text!r} removed: outside the sandbox")
                remove(bootfile)
                if tag == "kernel":
                    for c in osn.findall("cmdline"):
                        remove(c)
        loader = osn.find("loader")
        if loader is not None and loader.text and not self.allowed_path(loader.text, FIRMWARE_DIRS):
            self.warn(f"<os><loader> {loader.text!r} removed: not in the sandbox or a firmware directory")
            remove(loader)
        nvram = osn.find("nvram")
        if nvram is not None:
            tmpl = nvram.get("template")
            if tmpl and not self.allowed_path(tmpl, FIRMWARE_DIRS):
                self.warn(f"<os><nvram template> {tmpl!r} removed: not in a firmware directory")
                del nvram.attrib["template"]
            if nvram.text and nvram.text.strip() and not self.allowed_path(nvram.text):
                path = self.sandbox / f"{d.name}_VARS.fd"
                self.changes.append(f"nvram {nvram.text.strip()!r} -> {str(path)!r}")
                nvram.text = str(path)
            for c in list(nvram):
                self.warn("<os><nvram> source removed (vmtool keeps nvram in the sandbox)")
                remove(c)
        acpi = osn.find("acpi")
        if acpi is not None:
            for t in acpi.findall("table"):
                if not self.allowed_path(t.text):
                    self.warn(f"<os><acpi><table> {t.text!r} removed: outside the sandbox")
                    remove(t)
            if not len(acpi):
                remove(acpi)
        if self.opts.manifest is not None:
            from vmtool.manifest import load

            man = load(self.opts.manifest)
            cmdline = man.cmdline.split()
            if not any(a.startswith("console=") for a in cmdline):
                cmdline.append("console=ttyS0")
            cmdline += list(self.opts.extra_cmdline)
            d.os_kernel = str(man.kernel_path)
            d.os_initrd = str(man.initrd_path)
            d.os_cmdline = shlex.join(cmdline) if any(" " in a for a in cmdline) else " ".join(cmdline)
            self.changes.append(f"direct kernel boot from {man.kernel_path}")
        elif self.opts.extra_cmdline:
            if d.os_kernel is None:
                raise DomainError("extra kernel arguments need direct kernel boot",
                                  hint="give --manifest, or drop the extra kernel arguments")
            d.os_cmdline = " ".join([d.os_cmdline or "", *self.opts.extra_cmdline]).strip()
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
            if disk.type in ("block", "network", "volume", "nvme", "vhostuser", "vhostvdpa", "dir"):
                self.warn(f"{what} of type {disk.type!r} removed: only files in the sandbox are allowed")
                disk.remove()
                continue
            src = disk.host_path
            if src is None:
                used.add(disk.target_dev or "")
                continue  # an empty cdrom tray
            if not self.allowed_path(src):
                self.warn(f"{what} {src!r} removed: outside the sandbox")
                disk.remove()
                continue
            fmt, why = _sandbox_image_format(self.local(src))
            if why:
                self.warn(f"{what} {src!r} removed: {why}")
                disk.remove()
                continue
            if fmt and disk.driver_type != fmt:
                # explicit, so neither libvirt nor qemu probes a format from the guest's data
                disk.driver_name, disk.driver_type = "qemu", fmt
            self._drop_backing(disk)
            used.add(disk.target_dev or "")
        for p in overlays:
            n = 0
            while f"vd{chr(ord('a') + n)}" in used:
                n += 1
            dev = f"vd{chr(ord('a') + n)}"
            used.add(dev)
            disk = self.dom.disks.add(type="file", device="disk")
            disk.driver_name = "qemu"
            disk.target_dev, disk.target_bus = dev, "virtio"
            self._to_overlay(disk, p)
            reindent(disk.node, _indent(disk.node))

    def _drop_backing(self, disk: Disk) -> None:
        for b in disk.node.findall("backingStore"):
            remove(b)

    def _to_overlay(self, disk: Disk, path: Path) -> None:
        old = disk.host_path
        disk.node.set("type", "file")
        disk.node.set("device", "disk")
        drv = disk.node.find("driver")
        disk.driver_name, disk.driver_type = "qemu", "qcow2"
        if drv is None:
            drv = disk.node.find("driver")
            assert drv is not None
            remove(drv)
            append_child(disk.node, drv, index=0)
        src = disk.node.find("source")
        new = etree.Element("source", file=str(path.resolve()))
        if src is not None:
            new.tail = src.tail
            src.addprevious(new)
            disk.node.remove(src)
        else:
            append_child(disk.node, new, index=1)
        self._drop_backing(disk)
        for ro in disk.node.findall("readonly"):
            remove(ro)
        if disk.target_dev is None:
            disk.target_dev = "vda"
        self.changes.append(f"disk {disk.target_dev}" + (f" {old!r}" if old else "") + f" -> overlay {path}")

    def mac(self) -> str:
        b = [0x52, 0x54, 0x00] + [self.rng.getrandbits(8) for _ in range(3)]
        return ":".join(f"{x:02x}" for x in b)

    def interfaces(self) -> None:
        keep = {"mac", "model", "address", "boot", "mtu", "link", "alias", "acpi"}
        for nic in list(self.dom.interfaces):
            if self.opts.network == "none":
                self.changes.append(f"interface {nic.type!r} removed (--network none)")
                nic.remove()
                continue
            old = nic.type
            for child in list(nic.node):
                if child.tag not in keep:
                    if child.tag in ("script", "rom", "backend", "downscript") or old in ("ethernet", "hostdev",
                                                                                          "direct", "vhostuser"):
                        what = child.get("path") or child.get("dev") or child.get("file") or ""
                        self.warn(f"<interface type={old!r}> <{child.tag}> {what!r} removed: host resource")
                    remove(child)
            nic.node.attrib.clear()
            self._net_type(nic.node)
            if nic.node.find("mac") is None:
                append_child(nic.node, etree.Element("mac"), index=0)
            nic.mac = self.mac()
            if nic.model is None:
                nic.model = "virtio"
            self.changes.append(f"interface {old!r} -> {nic.type!r}, new MAC")

    def _net_type(self, node: etree._Element) -> None:
        from vmtool.domain.model import Interface

        nic = Interface(node)
        if self.opts.network == "user":
            node.set("type", "user")
            nic.source_network = None
        else:
            node.set("type", "network")
            nic.source_network = self.opts.network

    def chardevs(self) -> None:
        graphics_kept = self.opts.graphics
        for ch in self.dom.chardevs():
            kind = f"<{ch.tag} type={ch.type!r}>"
            t = ch.type or "pty"
            if t in ("spicevmc", "spiceport", "qemu-vdagent") and not graphics_kept:
                self.changes.append(f"{kind} removed with the graphics")
                ch.remove()
            elif t in ("pty", "null", "vc", "stdio") or (t == "unix" and ch.source_path is None):
                if ch.tag in ("serial", "console"):
                    ch.remove()  # the console is vmtool's (below)
            elif t in ("file", "pipe", "unix") and self.allowed_path(ch.source_path):
                pass
            elif t in ("spicevmc", "spiceport", "qemu-vdagent"):
                pass
            else:
                where = ch.source_path or t
                self.warn(f"{kind} {where!r} removed: connects to the host outside the sandbox")
                ch.remove()
        log = self.console_log
        serial = self.dom.serials.add(type="file")
        src = etree.SubElement(serial.node, "source", path=str(log))
        src.set("append", "off")
        etree.SubElement(serial.node, "target", port="0")
        reindent(serial.node, _indent(serial.node))
        for cname, sock in self.opts.channels:
            ch = self.dom.channels.add(type="unix")
            etree.SubElement(ch.node, "source", mode="bind", path=str(sock))
            etree.SubElement(ch.node, "target", type="virtio", name=cname)
            reindent(ch.node, _indent(ch.node))

    def graphics(self) -> None:
        for g in list(self.dom.graphics):
            if not self.opts.graphics or g.type not in ("vnc", "spice"):
                self.changes.append(f"<graphics type={g.type!r}> removed")
                g.remove()
                continue
            for ls in g.node.findall("listen"):
                remove(ls)
            if g.socket:
                g.socket = None
            g.listen = "127.0.0.1"
            g.autoport = "yes"
            g.port = None
            etree.SubElement(g.node, "listen", type="address", address="127.0.0.1")
            reindent(g.node, _indent(g.node))
            self.changes.append(f"<graphics type={g.type!r}> bound to 127.0.0.1")
        for a in list(self.dom.node.findall("devices/audio")):
            if a.get("type") not in ("none", "spice") or (a.get("type") == "spice" and not self.opts.graphics):
                self.changes.append(f"<audio type={a.get('type')!r}> removed")
                remove(a)

    def hostile(self) -> None:
        d = self.dom
        dev = d.devices()
        for tag, why in HOSTILE_DEVICES.items():
            for el in dev.findall(tag):
                if tag == "filesystem" and el.get("type") == "ram":
                    continue
                detail = _describe(el)
                self.warn(f"<{tag}>{detail} removed: {why}")
                remove(el)
        for el in dev.findall("tpm"):
            if el.get("model") is not None and el.find("backend") is not None and \
                    el.find("backend").get("type") == "passthrough":  # type: ignore[union-attr]
                self.warn("<tpm> with a passthrough backend removed: host TPM")
                remove(el)
        for el in dev.findall("input"):
            if el.get("type") in ("passthrough", "evdev"):
                self.warn(f"<input type={el.get('type')!r}> removed: host input device")
                remove(el)
        for el in dev.findall("rng"):
            be = el.find("backend")
            ok = be is not None and be.get("model") in ("random", "builtin") and \
                (be.text or "/dev/urandom").strip() in ("/dev/random", "/dev/urandom", "/dev/hwrng")
            if not ok:
                self.warn("<rng> with a backend other than the host's /dev/urandom removed")
                remove(el)
        qemu_els = [el for el in d.node if isinstance(el.tag, str) and el.tag.startswith(f"{{{QEMU_NS}}}")]
        for el in qemu_els:
            self.warn(f"<qemu:{etree.QName(el).localname}> removed: passes options to qemu past libvirt")
            remove(el)
        for el in list(d.node.iter("seclabel")):
            if el.getparent() is d.node:
                self.changes.append("<seclabel> replaced by vmtool's")
                if el.get("type") == "none" or el.get("relabel") == "no":
                    self.warn(f"<seclabel type={el.get('type')!r}> removed: vmtool sets its own")
            else:
                self.warn(f"<{el.getparent().tag}><seclabel> removed")  # type: ignore[union-attr]
            remove(el)
        for tag in POLICY_ELEMENTS:
            for el in d.node.findall(tag):
                self.changes.append(f"<{tag}> removed (vmtool sets limits on the cgroup)")
                remove(el)

    def seclabel(self) -> None:
        uid, gid = self.opts.run_as or (os.getuid(), os.getgid())
        sec = etree.Element("seclabel", type="static", model="dac", relabel="no")
        lab = etree.SubElement(sec, "label")
        lab.text = f"+{uid}:+{gid}"
        append_child(self.dom.node, sec)
        reindent(sec, _indent(sec))

    def metadata(self, cpus: int, mem: int, limit: int) -> None:
        d = self.dom
        md = d.node.find("metadata")
        if md is None:
            md = append_child(d.node, etree.Element("metadata"), index=_index_after(d.node, ("description",
                                                                                             "title", "uuid")))
        for old in md.findall(f"{{{VMTOOL_NS}}}instance"):
            remove(old)
        inst = etree.Element(f"{{{VMTOOL_NS}}}instance", nsmap={"vmtool": VMTOOL_NS})
        s = self.slot
        etree.SubElement(inst, f"{{{VMTOOL_NS}}}slot", source=s.source, cpus=str(s.cpus),
                         memory_mib=str(s.memory_mib))
        etree.SubElement(inst, f"{{{VMTOOL_NS}}}size", cpus=str(cpus), memory_mib=str(mem),
                         cgroup_memory_mib=str(limit), accel=self.host.accel)
        etree.SubElement(inst, f"{{{VMTOOL_NS}}}origin", name=self._orig[0], uuid=self._orig[1])
        if s.job_id:
            inst.set("job", s.job_id)
        append_child(md, inst)
        reindent(inst, _indent(inst))

    @property
    def console_log(self) -> Path:
        return (self.opts.console_log or self.sandbox / f"{self.dom.name}.console.log").resolve()


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


def _indent(node: etree._Element) -> str:
    from vmtool.domain.xml import _indent_of

    return _indent_of(node)


def _index_after(parent: etree._Element, tags: tuple[str, ...]) -> int | None:
    for t in tags:
        el = parent.find(t)
        if el is not None:
            return list(parent).index(el) + 1
    return None


def _describe(el: etree._Element) -> str:
    src = el.find("source")
    if src is not None:
        for a in ("dir", "file", "dev", "path", "name"):
            if src.get(a):
                return f" {src.get(a)!r}"
        addr = src.find("address")
        if addr is not None:
            return " " + " ".join(str(k) + "=" + str(v) for k, v in addr.attrib.items())
    return ""


TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "domain.xml"


def render(source: bytes | str | None, opts: RenderOptions, host: HostFacts, slot: Slot) -> Rendered:
    """Rewrite a domain XML (or vmtool's template when None) for this host and slot."""
    text = TEMPLATE.read_text() if source is None else (source.decode() if isinstance(source, bytes) else source)
    dom = Domain.from_xml(text)
    r = _Renderer(dom, opts, host, slot)
    r.template = source is None
    name, uid = r.identity()
    r.machine()
    r.emulator()
    cpus, mem, limit = r.sizes()
    r.cpu(cpus)
    r.boot()
    r.hostile()
    r.disks()
    r.interfaces()
    r.graphics()
    r.chardevs()
    r.seclabel()
    r.metadata(cpus, mem, limit)
    if not opts.disks and opts.manifest is None and not any(True for _ in dom.disks) and dom.os_kernel is None:
        raise DomainError("the domain has nothing to boot from", hint="give --disk OVERLAY or --manifest")
    return Rendered(
        xml=dom.to_xml(), source_xml=text if text.endswith("\n") else text + "\n", name=name, uuid=uid,
        cpus=cpus, memory_mib=mem, memory_limit_mib=limit, console_log=r.console_log, accel=host.accel,
        slot=slot, warnings=r.warnings, changes=r.changes,
    )
