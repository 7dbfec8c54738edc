"""domain/model.py: each property and child accessor reads and edits the document in place, and leaves
everything it does not name exactly as it was. Also the arithmetic of domain/sizing.py and the path
checks of domain/sanitise.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmtool.domain.model import CPU, Domain
from vmtool.domain.sanitise import Sandbox
from vmtool.domain.sizing import to_mib
from vmtool.errors import DomainError

pytestmark = pytest.mark.unit


def dom(body: str, attrs: str = " type='kvm'") -> Domain:
    return Domain.from_xml(f"<domain{attrs}>\n{body}</domain>")


def test_text_stripped_but_host_paths_as_written() -> None:
    d = dom("  <name> web </name>\n  <os>\n    <kernel> /boot/vmlinuz\n</kernel>\n    <cmdline> ro </cmdline>\n"
            "  </os>\n")
    assert d.name == "web" and d.os_cmdline == "ro"
    os_ = d.ensure_os()
    assert os_.kernel == " /boot/vmlinuz\n" == d.os_kernel  # what libvirt would open
    assert os_.initrd is None and not os_.has("./initrd")


def test_placement_after_and_first() -> None:
    d = dom("  <name>a</name>\n  <memory>1</memory>\n  <devices>\n    <interface type='user'>\n"
            "      <model type='virtio'/>\n    </interface>\n  </devices>\n")
    d.uuid = "u"
    assert [c.tag for c in d.node] == ["name", "uuid", "memory", "devices"]
    nic = next(iter(d.interfaces))
    nic.mac = "52:54:00:00:00:01"
    assert [c.tag for c in nic.node] == ["mac", "model"]
    assert "<interface type='user'>\n      <mac address='52:54:00:00:00:01'/>\n      <model" in d.to_xml()


def test_vcpu_attributes_and_current_memory() -> None:
    d = dom("  <vcpu placement='static' current='1' cpuset='0-3'>4</vcpu>\n")
    assert d.vcpu == 4 and d.vcpu_current == "1" and d.vcpu_cpuset == "0-3"
    d.vcpu, d.vcpu_current, d.vcpu_cpuset = 2, None, None
    assert "<vcpu placement='static'>2</vcpu>" in d.to_xml()
    assert not d.has("./currentMemory")


def test_disk_make_file() -> None:
    d = dom("  <devices>\n    <disk type='block' device='cdrom'>\n      <source dev='/dev/sr0'/>\n"
            "      <target dev='sdb'/>\n      <readonly/>\n      <backingStore type='file'>\n"
            "        <source file='/etc/passwd'/>\n      </backingStore>\n    </disk>\n  </devices>\n")
    disk = next(iter(d.disks))
    assert disk.host_path == "/dev/sr0"
    disk.make_file(Path("/sb/root.qcow2"), "qcow2")
    assert disk.type == "file" and disk.device == "disk" and disk.host_path == "/sb/root.qcow2"
    assert [c.tag for c in disk.node] == ["driver", "source", "target"]
    assert disk.driver_name == "qemu" and disk.driver_type == "qcow2" and disk.source_dev is None
    assert "      <source file='/sb/root.qcow2'/>\n      <target dev='sdb'/>\n    </disk>" in d.to_xml()


def test_os_parts() -> None:
    d = dom("  <os>\n    <type>hvm</type>\n    <kernel>k</kernel>\n    <cmdline>a</cmdline>\n    <cmdline>b</cmdline>\n"
            "    <nvram template='/t.fd'>/v.fd<source file='/x'/></nvram>\n"
            "    <acpi>\n      <table type='slic'>/a.bin</table>\n    </acpi>\n  </os>\n")
    os_ = d.ensure_os()
    assert os_.nvram == "/v.fd" and os_.nvram_template == "/t.fd"
    assert [t.text for t in os_.acpi_tables] == ["/a.bin"]
    os_.remove_cmdlines()
    assert d.os_cmdline is None and os_.kernel == "k"
    assert os_.remove_nvram_sources() == 1 and os_.remove_nvram_sources() == 0
    next(iter(os_.acpi_tables)).remove()
    os_.remove_empty_acpi()
    assert not os_.has("./acpi") and "<nvram template='/t.fd'>/v.fd</nvram>" in d.to_xml()


def test_ensure_os_and_features_placement() -> None:
    d = dom("  <name>a</name>\n  <memory>1</memory>\n  <vcpu>1</vcpu>\n  <clock offset='utc'/>\n")
    d.ensure_os()
    d.ensure_features()
    assert [c.tag for c in d.node] == ["name", "memory", "vcpu", "os", "features", "clock"]


def test_set_cpu_replaces_in_place_or_after_vcpu() -> None:
    d = dom("  <vcpu>1</vcpu>\n  <cpu mode='host-model'>\n    <feature name='x'/>\n  </cpu>\n  <clock/>\n")
    cpu = CPU.new()
    cpu.mode, cpu.check = "custom", "none"
    cpu.model_fallback, cpu.model = "forbid", "qemu64"
    cpu.topology_sockets, cpu.topology_cores = 1, 2
    d.set_cpu(cpu)
    assert ("  <cpu mode='custom' check='none'>\n    <model fallback='forbid'>qemu64</model>\n"
            "    <topology sockets='1' cores='2'/>\n  </cpu>\n  <clock/>") in d.to_xml()
    assert cpu.topology_cores == 2 and cpu.model == "qemu64"
    d2 = dom("  <memory>1</memory>\n  <vcpu>1</vcpu>\n  <clock/>\n")
    d2.set_cpu(CPU.new())
    assert [c.tag for c in d2.node] == ["memory", "vcpu", "cpu", "clock"]


def test_features_tb_cache_replaced() -> None:
    d = dom("  <features>\n    <acpi/>\n    <kvm/>\n    <tcg>\n      <tb-cache unit='KiB'>1</tb-cache>\n"
            "    </tcg>\n  </features>\n")
    f = d.ensure_features()
    assert f.tcg_tb_cache == 1 and f.tcg_tb_cache_unit == "KiB"
    assert f.remove_all("kvm") == 1 and f.remove_all("kvm") == 0
    f.set_tb_cache_mib(128)
    assert f.tcg_tb_cache == 128 and f.tcg_tb_cache_unit == "MiB"
    assert len(f.node.findall("tcg/tb-cache")) == 1


def test_devices_seclabels_and_qemu_elements() -> None:
    d = dom("  <devices>\n    <hostdev mode='subsystem' type='pci'>\n      <source>\n"
            "        <address domain='0' bus='1'/>\n      </source>\n    </hostdev>\n"
            "    <filesystem type='mount'>\n      <source dir='/home'/>\n    </filesystem>\n"
            "    <rng model='virtio'>\n      <backend model='random'> /dev/urandom </backend>\n    </rng>\n"
            "    <disk type='file'>\n      <seclabel relabel='no'/>\n    </disk>\n  </devices>\n"
            "  <seclabel type='none'/>\n  <qemu:commandline>\n    <qemu:arg value='-x'/>\n  </qemu:commandline>\n",
            " type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'")
    assert [h.describe() for h in d.devices_of("hostdev")] == [" domain=0 bus=1"]
    assert [f.describe() for f in d.devices_of("filesystem")] == [" '/home'"]
    rng = d.devices_of("rng")[0]
    assert rng.backend_model == "random" and rng.backend_path == " /dev/urandom " and rng.backend_type is None
    labels = d.all_seclabels()
    assert [(s.parent_tag, s.is_child_of(d), s.relabel) for s in labels] == [("disk", False, "no"),
                                                                              ("domain", True, None)]
    assert [len(d.top_level("seclabel")), len(d.seclabels)] == [1, 1]
    [q] = d.qemu_elements()
    q.remove()
    assert "qemu:" not in d.to_xml() and d.devices_of("shmem") == []


def test_interface_children_and_attributes() -> None:
    d = dom("  <devices>\n    <interface type='ethernet' trustGuestRxFilters='yes'>\n      <script path='/s'/>\n"
            "      <target dev='tap0'/>\n      <model type='e1000'/>\n    </interface>\n  </devices>\n")
    nic = next(iter(d.interfaces))
    assert nic.remove_children_except({"model"}) == [("script", "/s"), ("target", "tap0")]
    nic.clear_attributes()
    nic.type = "user"
    assert "<interface type='user'>\n      <model type='e1000'/>\n    </interface>" in d.to_xml()


def test_graphics_listens_audio_and_chardevs() -> None:
    d = dom("  <devices>\n    <graphics type='vnc' port='5900'>\n      <listen type='network' network='n'/>\n"
            "    </graphics>\n    <audio id='1' type='pulseaudio'/>\n    <serial type='pty'/>\n"
            "    <channel type='unix'>\n      <source mode='bind' path='/run/s'/>\n"
            "      <target type='virtio' name='c'/>\n    </channel>\n  </devices>\n")
    g = next(iter(d.graphics))
    assert [ls.network for ls in g.listens] == ["n"]
    for ls in list(g.listens):
        ls.remove()
    g.listens.add(type="address", address="127.0.0.1")
    g.reindent()
    assert "<graphics type='vnc' port='5900'>\n      <listen type='address' address='127.0.0.1'/>\n    </graphics>" \
        in d.to_xml()
    assert [a.type for a in d.audios] == ["pulseaudio"]
    assert [(c.tag, c.type, c.source_path, c.target_name) for c in d.chardevs()] == [
        ("serial", "pty", None, None), ("channel", "unix", "/run/s", "c")]
    s = d.serials.add(type="file")
    s.source_path, s.source_append, s.target_port = "/sb/c.log", "off", "0"
    s.reindent()
    assert ("    <serial type='file'>\n      <source path='/sb/c.log' append='off'/>\n      <target port='0'/>\n"
            "    </serial>\n    <channel") in d.to_xml()


def test_vmtool_instance_replaced() -> None:
    d = dom("  <name>a</name>\n  <metadata>\n    <other/>\n  </metadata>\n")
    for job in ("1.0", "2.0"):
        d.set_vmtool_instance({"slot": {"cpus": "2"}, "origin": {"name": "a"}}, job)
    xml = d.to_xml()
    assert xml.count("<vmtool:instance") == 1 and "job='2.0'" in xml and "<other/>" in xml
    assert "<vmtool:slot cpus='2'/>\n      <vmtool:origin name='a'/>" in xml


def test_untouched_parts_survive() -> None:
    body = ("  <!-- kept -->\n  <name>a</name>\n  <sysinfo type='smbios'>\n    <system>\n"
            "      <entry name='x'>y</entry>\n    </system>\n  </sysinfo>\n")
    d = dom(body)
    d.name = "b"
    assert d.to_xml() == "<domain type='kvm'>\n" + body.replace(">a<", ">b<") + "</domain>\n"


def test_to_mib() -> None:
    assert to_mib(1048576, None) == 1024 and to_mib(2, "GiB") == 2048 and to_mib(10**9, "b") == 953
    assert to_mib(1, "G") == 1024 and to_mib(1000, "MB") == 953
    with pytest.raises(DomainError, match="unknown memory unit 'parsecs'"):
        to_mib(1, "parsecs")


def test_sandbox_paths(tmp_path: Path) -> None:
    (tmp_path / "sb").mkdir()
    (tmp_path / "build").mkdir()
    os.symlink("/etc/shadow", tmp_path / "sb" / "escape")
    box = Sandbox(tmp_path / "sb", tmp_path / "build")
    assert box.allows("disk.img") and box.allows(str(tmp_path / "build" / "vmlinuz"))
    assert not box.allows("escape") and not box.allows("../other") and not box.allows(None)
    assert box.allows("/usr/share/OVMF/OVMF_CODE.fd", ("/usr/share/OVMF",))
    assert box.local("disk.img") == (tmp_path / "sb" / "disk.img").resolve()
