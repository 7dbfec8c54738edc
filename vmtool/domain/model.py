"""The libvirt domain document as objects: plain XML <-> attribute mapping, no policy (nova's config.py).

Only what vmtool reads or changes is modelled; every other element stays in the tree untouched. Every
read or edit of a domain document goes through here; the decisions about it are domain/policy.py's and
domain/sanitise.py's.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from vmtool.domain.xml import (
    XMLChildren,
    XMLObject,
    XMLProperty,
    append_child,
    indent_of,
    index_after,
    libvirt_style,
    parse,
    reindent,
    remove,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMTOOL_NS = "https://vmtool.readthedocs.io/xmlns/domain/1"


class Element(XMLObject):
    """Any element vmtool only looks at, removes or names in a warning."""

    type = XMLProperty("./@type")


class Disk(XMLObject):
    XML_NAME = "disk"

    type = XMLProperty("./@type")
    device = XMLProperty("./@device")
    driver_name = XMLProperty("./driver/@name")
    driver_type = XMLProperty("./driver/@type")
    source_file = XMLProperty("./source/@file")
    source_dev = XMLProperty("./source/@dev")
    source_dir = XMLProperty("./source/@dir")
    target_dev = XMLProperty("./target/@dev")
    target_bus = XMLProperty("./target/@bus")

    @property
    def host_path(self) -> str | None:
        """The host file or device this disk reads, whatever its type."""
        found: str | None = self.source_file or self.source_dev or self.source_dir
        return found

    def set_host_path(self, path: str) -> None:
        """Rewrite whichever source attribute names the host path."""
        if self.source_file:
            self.source_file = path
        elif self.source_dev:
            self.source_dev = path
        else:
            self.source_dir = path

    def drop_backing_chain(self) -> None:
        """Remove <backingStore>: libvirt would open the files it names."""
        self.remove_all("backingStore")

    def make_file(self, path: Path, driver_type: str) -> None:
        """Turn this disk into a writable file disk reading `path` with an explicit qemu driver: the
        driver first, a new <source file> where the old source was, no backing chain, no <readonly>."""
        self.node.set("type", "file")
        self.node.set("device", "disk")
        had_driver = self.node.find("driver") is not None
        self.driver_name, self.driver_type = "qemu", driver_type
        if not had_driver:
            drv = self.node.find("driver")
            assert drv is not None
            remove(drv)
            append_child(self.node, drv, index=0)
        src = self.node.find("source")
        new = etree.Element("source", file=str(path))
        if src is not None:
            new.tail = src.tail
            src.addprevious(new)
            self.node.remove(src)
        else:
            append_child(self.node, new, index=1)
        self.drop_backing_chain()
        self.remove_all("readonly")


class Interface(XMLObject):
    type = XMLProperty("./@type")
    mac = XMLProperty("./mac/@address", after=())
    model = XMLProperty("./model/@type")
    source_network = XMLProperty("./source/@network")
    target_dev = XMLProperty("./target/@dev")
    target_managed = XMLProperty("./target/@managed")

    def remove_children_except(self, keep: set[str]) -> list[tuple[str, str]]:
        """Remove every child not named in `keep`; (tag, host path or device it named) of each."""
        gone = []
        for child in list(self.node):
            if child.tag not in keep:
                what = child.get("path") or child.get("dev") or child.get("file") or ""
                gone.append((str(child.tag), what))
                remove(child)
        return gone


class CharDev(XMLObject):
    """<serial>, <console>, <parallel>, <channel>: a guest port backed by something on the host."""

    type = XMLProperty("./@type")
    source_mode = XMLProperty("./source/@mode")
    source_path = XMLProperty("./source/@path")
    source_append = XMLProperty("./source/@append")
    target_type = XMLProperty("./target/@type")
    target_name = XMLProperty("./target/@name")
    target_port = XMLProperty("./target/@port")


class Listen(XMLObject):
    type = XMLProperty("./@type")
    address = XMLProperty("./@address")
    network = XMLProperty("./@network")
    socket = XMLProperty("./@socket")


class Graphics(XMLObject):
    type = XMLProperty("./@type")
    listen = XMLProperty("./@listen")
    autoport = XMLProperty("./@autoport")
    port = XMLProperty("./@port")
    socket = XMLProperty("./@socket")

    listens = XMLChildren(Listen, "./listen")


class Device(XMLObject):
    """Any other device: what vmtool checks of a <hostdev>, <tpm>, <input>, <rng> and the like."""

    type = XMLProperty("./@type")
    model = XMLProperty("./@model")
    backend_type = XMLProperty("./backend/@type")
    backend_model = XMLProperty("./backend/@model")
    backend_path = XMLProperty("./backend", strip=False)

    def describe(self) -> str:
        """The host resource the device names (' PATH' or ' ADDRESS'), for a warning; '' if none."""
        src = self.node.find("source")
        if src is not None:
            for a in ("dir", "file", "dev", "path", "name"):
                if src.get(a):
                    return f" {src.get(a)!r}"
            addr = src.find("address")
            if addr is not None:
                return " " + " ".join(str(k) + "=" + str(v) for k, v in addr.attrib.items())
        return ""


class SecLabel(XMLObject):
    XML_NAME = "seclabel"

    type = XMLProperty("./@type")
    model = XMLProperty("./@model")
    relabel = XMLProperty("./@relabel")
    label = XMLProperty("./label")


class CPU(XMLObject):
    XML_NAME = "cpu"

    mode = XMLProperty("./@mode")
    match = XMLProperty("./@match")
    check = XMLProperty("./@check")
    model_fallback = XMLProperty("./model/@fallback")
    model = XMLProperty("./model")
    topology_sockets = XMLProperty("./topology/@sockets", is_int=True)
    topology_dies = XMLProperty("./topology/@dies", is_int=True)
    topology_cores = XMLProperty("./topology/@cores", is_int=True)
    topology_threads = XMLProperty("./topology/@threads", is_int=True)


class Features(XMLObject):
    tcg_tb_cache = XMLProperty("./tcg/tb-cache", is_int=True)
    tcg_tb_cache_unit = XMLProperty("./tcg/tb-cache/@unit")

    def set_tb_cache_mib(self, mib: int) -> None:
        """<tcg><tb-cache unit='MiB'>: the size of TCG's translation cache, replacing any given."""
        tcg = self.node.find("tcg")
        if tcg is None:
            tcg = append_child(self.node, etree.Element("tcg"))
        for el in tcg.findall("tb-cache"):
            remove(el)
        tb = etree.Element("tb-cache", unit="MiB")
        tb.text = str(mib)
        append_child(tcg, tb)


class OS(XMLObject):
    """<os>. Host paths are read as written (strip=False): that is what libvirt opens."""

    type = XMLProperty("./type")
    arch = XMLProperty("./type/@arch")
    machine = XMLProperty("./type/@machine")
    kernel = XMLProperty("./kernel", strip=False)
    initrd = XMLProperty("./initrd", strip=False)
    dtb = XMLProperty("./dtb", strip=False)
    cmdline = XMLProperty("./cmdline")
    loader = XMLProperty("./loader", strip=False)
    nvram = XMLProperty("./nvram", strip=False)
    nvram_template = XMLProperty("./nvram/@template")

    acpi_tables = XMLChildren(Element, "./acpi/table")

    def remove_cmdlines(self) -> None:
        self.remove_all("cmdline")

    def remove_nvram_sources(self) -> int:
        """Remove what is inside <nvram> (a <source> naming host storage); how many nodes there were."""
        nvram = self.node.find("nvram")
        if nvram is None:
            return 0
        kids = list(nvram)
        for c in kids:
            remove(c)
        return len(kids)

    def remove_empty_acpi(self) -> None:
        acpi = self.node.find("acpi")
        if acpi is not None and not len(acpi):
            remove(acpi)


class Domain(XMLObject):
    XML_NAME = "domain"

    type = XMLProperty("./@type")
    name = XMLProperty("./name")
    uuid = XMLProperty("./uuid", after=("name",))
    memory = XMLProperty("./memory", is_int=True)
    memory_unit = XMLProperty("./memory/@unit")
    current_memory = XMLProperty("./currentMemory", is_int=True)
    current_memory_unit = XMLProperty("./currentMemory/@unit")
    vcpu = XMLProperty("./vcpu", is_int=True)
    vcpu_current = XMLProperty("./vcpu/@current")
    vcpu_cpuset = XMLProperty("./vcpu/@cpuset")
    os_type = XMLProperty("./os/type")
    os_arch = XMLProperty("./os/type/@arch")
    os_machine = XMLProperty("./os/type/@machine")
    os_kernel = XMLProperty("./os/kernel", strip=False)
    os_initrd = XMLProperty("./os/initrd", strip=False)
    os_cmdline = XMLProperty("./os/cmdline")
    os_dtb = XMLProperty("./os/dtb", strip=False)
    os_loader = XMLProperty("./os/loader", strip=False)
    os_nvram = XMLProperty("./os/nvram", strip=False)
    os_nvram_template = XMLProperty("./os/nvram/@template")
    emulator = XMLProperty("./devices/emulator")
    on_poweroff = XMLProperty("./on_poweroff")
    on_reboot = XMLProperty("./on_reboot")
    on_crash = XMLProperty("./on_crash")

    disks = XMLChildren(Disk, "./devices/disk")
    interfaces = XMLChildren(Interface, "./devices/interface")
    serials = XMLChildren(CharDev, "./devices/serial")
    consoles = XMLChildren(CharDev, "./devices/console")
    parallels = XMLChildren(CharDev, "./devices/parallel")
    channels = XMLChildren(CharDev, "./devices/channel")
    graphics = XMLChildren(Graphics, "./devices/graphics")
    audios = XMLChildren(Element, "./devices/audio")
    seclabels = XMLChildren(SecLabel, "./seclabel")
    bootloaders = XMLChildren(Element, "./bootloader")
    bootloader_args = XMLChildren(Element, "./bootloader_args")

    @classmethod
    def from_xml(cls, data: bytes | str) -> Domain:
        return cls(parse(data).getroot())

    def to_xml(self) -> str:
        etree.cleanup_namespaces(self.node)
        return libvirt_style(etree.tostring(self.node, encoding="unicode")) + "\n"

    def _ensure(self, tag: str, after: tuple[str, ...]) -> etree._Element:
        el = self.node.find(tag)
        if el is None:
            el = append_child(self.node, etree.Element(tag), index=index_after(self.node, after))
        return el

    def ensure_os(self) -> OS:
        """<os>, made after <vcpu> or <memory> when missing."""
        return OS(self._ensure("os", ("vcpu", "memory")))

    def ensure_features(self) -> Features:
        """<features>, made after <os> when missing."""
        return Features(self._ensure("features", ("os",)))

    def _devices(self) -> etree._Element:
        dev = self.node.find("devices")
        if dev is None:
            dev = append_child(self.node, etree.Element("devices"))
        return dev

    def devices_of(self, tag: str) -> list[Device]:
        """The <devices> children named `tag`, in document order."""
        return [Device(el) for el in self._devices().findall(tag)]

    def top_level(self, tag: str) -> list[Element]:
        """The children of <domain> named `tag`, in document order."""
        return [Element(el) for el in self.node.findall(tag)]

    def chardevs(self) -> list[CharDev]:
        return [*self.serials, *self.consoles, *self.parallels, *self.channels]

    def qemu_elements(self) -> list[Element]:
        """Children of <domain> in libvirt's qemu namespace (qemu:commandline and the like)."""
        return [Element(el) for el in self.node if isinstance(el.tag, str) and el.tag.startswith(f"{{{QEMU_NS}}}")]

    def all_seclabels(self) -> list[SecLabel]:
        """Every <seclabel> in the document: the domain's own and those of its devices."""
        return [SecLabel(el) for el in self.node.iter("seclabel")]

    def set_cpu(self, cpu: CPU) -> None:
        """Put a new <cpu> in place of the old one (or after <vcpu>/<memory>)."""
        old = self.node.find("cpu")
        if old is not None:
            cpu.node.tail = old.tail
            old.addprevious(cpu.node)
            self.node.remove(old)
            cpu.reindent()
        else:
            append_child(self.node, cpu.node, index=index_after(self.node, ("vcpu", "memory")))

    def set_vmtool_instance(self, entries: dict[str, dict[str, str]], job: str | None) -> None:
        """Replace vmtool's <metadata><vmtool:instance> with one <vmtool:KEY attrs/> per entry."""
        md = self.node.find("metadata")
        if md is None:
            md = append_child(self.node, etree.Element("metadata"),
                              index=index_after(self.node, ("description", "title", "uuid")))
        for old in md.findall(f"{{{VMTOOL_NS}}}instance"):
            remove(old)
        inst = etree.Element(f"{{{VMTOOL_NS}}}instance", nsmap={"vmtool": VMTOOL_NS})
        for key, attrs in entries.items():
            etree.SubElement(inst, f"{{{VMTOOL_NS}}}{key}", attrs)
        if job:
            inst.set("job", job)
        append_child(md, inst)
        reindent(inst, indent_of(inst))
