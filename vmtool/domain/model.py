"""The libvirt domain document as objects: plain XML <-> attribute mapping, no policy (nova's config.py).

Only what vmtool reads or changes is modelled; every other element stays in the tree untouched.
"""

from __future__ import annotations

from lxml import etree

from vmtool.domain.xml import XMLChildren, XMLObject, XMLProperty, append_child, libvirt_style, parse

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMTOOL_NS = "https://vmtool.readthedocs.io/xmlns/domain/1"


class Source(XMLObject):
    file = XMLProperty("./@file")
    dev = XMLProperty("./@dev")
    dir = XMLProperty("./@dir")
    path = XMLProperty("./@path")
    mode = XMLProperty("./@mode")
    network = XMLProperty("./@network")
    bridge = XMLProperty("./@bridge")


class Disk(XMLObject):
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


class Interface(XMLObject):
    type = XMLProperty("./@type")
    mac = XMLProperty("./mac/@address")
    model = XMLProperty("./model/@type")
    source_network = XMLProperty("./source/@network")


class CharDev(XMLObject):
    """<serial>, <console>, <parallel>, <channel>: a guest port backed by something on the host."""

    type = XMLProperty("./@type")
    source_path = XMLProperty("./source/@path")
    source_mode = XMLProperty("./source/@mode")
    target_type = XMLProperty("./target/@type")
    target_name = XMLProperty("./target/@name")
    target_port = XMLProperty("./target/@port")


class Graphics(XMLObject):
    type = XMLProperty("./@type")
    listen = XMLProperty("./@listen")
    autoport = XMLProperty("./@autoport")
    port = XMLProperty("./@port")
    socket = XMLProperty("./@socket")


class Listen(XMLObject):
    type = XMLProperty("./@type")
    address = XMLProperty("./@address")
    network = XMLProperty("./@network")
    socket = XMLProperty("./@socket")


class Domain(XMLObject):
    XML_NAME = "domain"

    type = XMLProperty("./@type")
    name = XMLProperty("./name")
    uuid = XMLProperty("./uuid")
    memory = XMLProperty("./memory", is_int=True)
    memory_unit = XMLProperty("./memory/@unit")
    current_memory = XMLProperty("./currentMemory", is_int=True)
    current_memory_unit = XMLProperty("./currentMemory/@unit")
    vcpu = XMLProperty("./vcpu", is_int=True)
    os_type = XMLProperty("./os/type")
    os_arch = XMLProperty("./os/type/@arch")
    os_machine = XMLProperty("./os/type/@machine")
    os_kernel = XMLProperty("./os/kernel")
    os_initrd = XMLProperty("./os/initrd")
    os_cmdline = XMLProperty("./os/cmdline")
    os_dtb = XMLProperty("./os/dtb")
    os_loader = XMLProperty("./os/loader")
    os_nvram = XMLProperty("./os/nvram")
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

    @classmethod
    def from_xml(cls, data: bytes | str) -> Domain:
        return cls(parse(data).getroot())

    def to_xml(self) -> str:
        etree.cleanup_namespaces(self.node)
        return libvirt_style(etree.tostring(self.node, encoding="unicode")) + "\n"

    def devices(self) -> etree._Element:
        dev = self.node.find("devices")
        if dev is None:
            dev = append_child(self.node, etree.Element("devices"))
        return dev

    def chardevs(self) -> list[CharDev]:
        return [*self.serials, *self.consoles, *self.parallels, *self.channels]

    def find_all(self, path: str, namespaces: dict[str, str] | None = None) -> list[etree._Element]:
        return list(self.node.findall(path, namespaces))
