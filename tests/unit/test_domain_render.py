"""Golden tests for `vmtool domain render`: tests/data/domain/<case>-in.xml -> <case>-out.xml.

Set VMTOOL_REGENERATE=1 to rewrite the -out.xml files (then review the diff). Paths under the test's
tmp_path are written as @SANDBOX@ so the files do not depend on where the test runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lxml import etree

from vmtool.cli.main import main
from vmtool.domain.policy import BootFiles, RenderOptions, render
from vmtool.domain.sizing import max_guest_memory, qemu_overhead_mib
from vmtool.domain.slot import Slot
from vmtool.errors import DomainError
from vmtool.launch.host import HostFacts

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent.parent / "data" / "domain"
MACHINES = ("pc", "pc-i440fx-7.2", "q35", "pc-q35-7.2", "pc-q35-7.1")
TCG = HostFacts("/usr/bin/qemu-system-x86_64", "x86_64", MACHINES, ("qemu", "kvm"), False, "test")
KVM = HostFacts("/usr/bin/qemu-system-x86_64", "x86_64", MACHINES, ("qemu", "kvm"), True, "test")
SLOT = Slot(cpus=2, memory_mib=2048, source="machine-ad", name="slot1_1@wn", job_id="42.0")
# A whole qcow2 v3 header (1 GiB, 64 KiB clusters, header length 104, no extensions) in one sector.
QCOW2_HEADER = (b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(12) + (16).to_bytes(4, "big") + (1 << 30).to_bytes(8, "big")
                + bytes(68) + (104).to_bytes(4, "big") + bytes(408))


def qcow2(path: Path) -> Path:
    path.write_bytes(QCOW2_HEADER)
    return path


def fake_boot(d: Path) -> BootFiles:
    """A build's boot files, as `BootFiles.of(manifest)` gives them (render opens none of them)."""
    (d / "vmlinuz").write_bytes(b"k")
    (d / "initrd.img").write_bytes(b"i")
    d = d.resolve()
    return BootFiles(kernel=d / "vmlinuz", initrd=d / "initrd.img", cmdline="root=LABEL=cloudimg-rootfs ro quiet",
                     build_dir=d)


def case_options(case: str, sb: Path) -> tuple[bytes | None, RenderOptions, HostFacts, Slot]:
    ovl = qcow2(sb / "root.qcow2")
    common = dict(sandbox=sb, disks=(ovl,), seed=7, run_as=(1000, 1000))
    if case == "template-manifest":
        opts = RenderOptions(**common, boot=fake_boot(sb), extra_cmdline=("vmtool.job=42.0",),  # type: ignore[arg-type]
                             channels=(("org.vmtool.relay.0", sb / "relay0.sock"),))
        return None, opts, TCG, SLOT
    src = (DATA / f"{case}-in.xml").read_bytes()
    if case == "osg-worker":
        return src, RenderOptions(**common), KVM, Slot(4, 8192, "machine-ad", job_id="7.3")  # type: ignore[arg-type]
    return src, RenderOptions(**common), TCG, SLOT  # type: ignore[arg-type]


CASES = ["desktop-virt-manager", "osg-worker", "hostile", "template-manifest"]


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, tmp_path: Path) -> None:
    src, opts, host, slot = case_options(case, tmp_path)
    r = render(src, opts, host, slot)
    got = r.xml.replace(str(tmp_path.resolve()), "@SANDBOX@")
    out = DATA / f"{case}-out.xml"
    if os.environ.get("VMTOOL_REGENERATE") == "1" or not out.exists():
        out.write_text(got)
        pytest.skip(f"wrote {out.name}; review it and run again")
    assert got == out.read_text()
    # what render produces is a domain libvirt accepts structurally: parse it back
    etree.fromstring(r.xml.encode())


def test_hostile_elements_removed_and_listed(tmp_path: Path) -> None:
    src, opts, host, slot = case_options("hostile", tmp_path)
    r = render(src, opts, host, slot)
    for bad in ("/dev/sda", "/etc/shadow", "/etc/passwd", "10.0.0.1", "<filesystem", "<hostdev", "/tmp/evil",
                "docker.sock", "authorized_keys", "commandline", "capabilities", "0.0.0.0", "<shmem",
                "/dev/input", "pygrub", "slic.bin", "hard_limit", "/machine/escape", "type=\"none\"",
                "type='none'", "cpuset", "vcpupin"):
        assert bad not in r.xml, bad
    text = "\n".join(r.warnings)
    assert any("'/dev/sda' -> overlay" in c for c in r.changes)
    for listed in ("/etc/shadow", "etc/passwd", "'network'", "<filesystem>", "<hostdev>",
                   "/tmp/evil/qemu-system-x86_64", "docker.sock", "'tcp'", "authorized_keys", "qemu:commandline",
                   "qemu:capabilities", "<shmem>", "evdev", "<rng>", "pygrub", "slic.bin", "<seclabel",
                   "/tmp/evil/ifup.sh", "65536 MiB"):
        assert listed in text, listed
    assert "vmtool-unknown" not in text


def test_unknown_harmless_survives_byte_for_byte(tmp_path: Path) -> None:
    src, opts, host, slot = case_options("hostile", tmp_path)
    r = render(src, opts, host, slot)
    src_text = src.decode() if src else ""
    for block in ("<!-- a comment that must survive -->", "<title>Totally harmless VM</title>",
                  "  <sysinfo type='smbios'>\n    <system>\n      <entry name='manufacturer'>Example Corp</entry>\n"
                  "    </system>\n  </sysinfo>", "<smbios mode='sysinfo'/>"):
        assert block in src_text
        assert block in r.xml, block
    assert "<watchdog model='i6300esb' action='reset'/>" in r.xml
    (tmp_path / "d").mkdir()
    d_src, d_opts, _, _ = case_options("desktop-virt-manager", tmp_path / "d")
    d = render(d_src, d_opts, TCG, SLOT)
    # attribute quotes become libvirt's single quotes; everything else is kept as it was
    assert ("<libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\n"
            "      <libosinfo:os id='http://fedoraproject.org/fedora/39'/>\n"
            "    </libosinfo:libosinfo>") in d.xml
    for block in ("    <vmport state='off'/>\n", "    <timer name='rtc' tickpolicy='catchup'/>\n",
                  "  <pm>\n    <suspend-to-mem enabled='no'/>\n    <suspend-to-disk enabled='no'/>\n  </pm>\n",
                  "    <input type='tablet' bus='usb'>\n      <address type='usb' bus='0' port='1'/>\n    </input>\n"):
        assert block in (DATA / "desktop-virt-manager-in.xml").read_text() and block in d.xml, block


def test_desktop_rewrites(tmp_path: Path) -> None:
    src, opts, host, slot = case_options("desktop-virt-manager", tmp_path)
    r = render(src, opts, host, slot)
    root = etree.fromstring(r.xml.encode())
    assert root.get("type") == "qemu"
    assert root.findtext("cpu/model") == "qemu64"
    assert root.findtext("vcpu") == "2"
    assert r.memory_mib == max_guest_memory(2048, "tcg") and r.memory_mib + qemu_overhead_mib(r.memory_mib, "tcg") \
        <= 2048
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    disks = root.findall("devices/disk")
    assert len(disks) == 1 and disks[0].find("source").get("file") == str((tmp_path / "root.qcow2").resolve())  # type: ignore[union-attr]
    assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert root.find("devices/graphics") is None and root.find("devices/redirdev") is None
    assert not [c for c in root.findall("devices/channel") if c.get("type") == "spicevmc"]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user" and nic.find("source") is None
    assert nic.find("mac").get("address") != "52:54:00:12:ab:cd"  # type: ignore[union-attr]
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == str(r.console_log)  # type: ignore[union-attr]
    assert root.find("os/nvram").text == str(tmp_path.resolve() / f"{r.name}_VARS.fd")  # type: ignore[union-attr]
    assert root.find("os/loader").text == "/usr/share/edk2/ovmf/OVMF_CODE.fd"  # type: ignore[union-attr]
    assert root.find("features/tcg/tb-cache") is not None
    assert any("Fedora-Workstation" in w for w in r.warnings)
    assert r.name.startswith("vmtool-42.0-")


def test_kvm_host_passthrough_and_names_unique(tmp_path: Path) -> None:
    src, opts, _host, slot = case_options("osg-worker", tmp_path)
    opts = RenderOptions(sandbox=opts.sandbox, disks=opts.disks)
    a = render(src, opts, KVM, slot)
    b = render(src, opts, KVM, slot)
    root = etree.fromstring(a.xml.encode())
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert a.name != b.name and a.uuid != b.uuid
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert any("/usr/libexec/qemu-kvm" in w for w in a.warnings)


def test_graphics_kept_on_localhost_and_named_network(tmp_path: Path) -> None:
    src = (DATA / "osg-worker-in.xml").read_bytes()
    opts = RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "a.qcow2"),), graphics=True, network="batchnet")
    r = render(src, opts, TCG, SLOT)
    root = etree.fromstring(r.xml.encode())
    g = root.find("devices/graphics")
    assert g is not None and g.get("listen") == "127.0.0.1" and g.find("listen").get("address") == "127.0.0.1"  # type: ignore[union-attr]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "network" and nic.find("source").get("network") == "batchnet"  # type: ignore[union-attr]
    assert nic.find("script") is None
    none = render(src, RenderOptions(sandbox=tmp_path, disks=opts.disks, network="none"), TCG, SLOT)
    assert "<interface" not in none.xml


def test_disks_in_sandbox_kept_and_extra_overlays_added(tmp_path: Path) -> None:
    (tmp_path / "data.raw").write_bytes(b"\0" * 512)
    src = b"""<domain type='kvm'><name>x</name><memory unit='MiB'>256</memory><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='root.qcow2'/>
<target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='data.raw'/><target dev='hdc' bus='ide'/><readonly/></disk>
</devices></domain>"""
    a, b = qcow2(tmp_path / "a.qcow2"), qcow2(tmp_path / "b.qcow2")
    r = render(src, RenderOptions(sandbox=tmp_path, disks=(a, b)), TCG, SLOT)
    root = etree.fromstring(r.xml.encode())
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "hdc", "vdb"]  # type: ignore[union-attr]
    assert disks[0].find("source").get("file") == str(a.resolve())  # type: ignore[union-attr]
    # relative in the job's XML, written back as the sandbox path it was checked as
    assert disks[1].find("source").get("file") == str((tmp_path / "data.raw").resolve())  # type: ignore[union-attr]
    assert disks[2].find("source").get("file") == str(b.resolve())  # type: ignore[union-attr]
    assert r.memory_mib == 256 and not r.warnings


def test_sandbox_qcow2_with_backing_file_refused(tmp_path: Path) -> None:
    bad = tmp_path / "input.qcow2"
    header = bytearray(QCOW2_HEADER)
    header[4:8] = (3).to_bytes(4, "big")
    header[8:16] = (512).to_bytes(8, "big")  # backing file name at offset 512: any host file
    bad.write_bytes(bytes(header) + b"/etc/shadow")
    raw = tmp_path / "data.img"
    raw.write_bytes(b"\0" * 4096)
    src = b"""<domain type='qemu'><name>x</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='input.qcow2'/><target dev='vdb'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='data.img'/><target dev='vdc'/></disk>
</devices></domain>"""
    r = render(src, RenderOptions(sandbox=tmp_path), TCG, SLOT)
    assert "input.qcow2" not in r.xml and any("backing file" in w for w in r.warnings)
    root = etree.fromstring(r.xml.encode())
    # the raw file keeps its place with its real format, not the one the XML claimed
    assert [d.find("driver").get("type") for d in root.findall("devices/disk")] == ["raw"]  # type: ignore[union-attr]


def test_symlink_out_of_sandbox_is_caught(tmp_path: Path) -> None:
    (tmp_path / "innocent.img").symlink_to("/etc/hostname")
    src = b"""<domain type='qemu'><name>x</name><devices><disk type='file' device='cdrom'>
<source file='innocent.img'/><target dev='hdc'/></disk></devices></domain>"""
    r = render(src, RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "a.qcow2"),)), TCG, SLOT)
    assert "innocent.img" not in r.xml and any("innocent.img" in w for w in r.warnings)


@pytest.mark.parametrize("xml,error", [
    (b"<domain type='xen'><name>x</name></domain>", "domain type 'xen' is not supported"),
    (b"<network><name>x</name></network>", "not a libvirt domain XML"),
    (b"<domain type='kvm'><name>x</name>", "not well-formed XML"),
    (b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domain type='kvm'>&e;</domain>",
     "DOCTYPE"),
    (b"<domain type='kvm'><os><type arch='aarch64'>hvm</type></os></domain>", "is for aarch64"),
    (b"<domain type='kvm'><memory unit='parsecs'>3</memory></domain>", "unknown memory unit"),
    (b"<domain type='kvm'><vcpu>many</vcpu></domain>", "is not an integer"),
])
def test_refused(xml: bytes, error: str, tmp_path: Path) -> None:
    with pytest.raises(DomainError) as ei:
        render(xml, RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "a.qcow2"),)), TCG, SLOT)
    assert error in ei.value.message


def test_overlay_must_be_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\0" * 1024)
    with pytest.raises(DomainError, match="not a qcow2 image"):
        render(None, RenderOptions(sandbox=tmp_path, disks=(raw,)), TCG, SLOT)
    with pytest.raises(DomainError, match="nothing to boot"):
        render(None, RenderOptions(sandbox=tmp_path), TCG, SLOT)


def test_sizes_policy() -> None:
    assert qemu_overhead_mib(1000, "kvm") == 64 and qemu_overhead_mib(4000, "kvm") == 200
    assert qemu_overhead_mib(1000, "tcg") == 64 + 160
    for slot_mib in (256, 2048, 8192):
        for accel in ("kvm", "tcg"):
            m = max_guest_memory(slot_mib, accel)
            assert m + qemu_overhead_mib(m, accel) <= slot_mib < m + 1 + qemu_overhead_mib(m + 1, accel)


def test_slot_too_small(tmp_path: Path) -> None:
    with pytest.raises(DomainError, match="leave no room"):
        render(None, RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "a.qcow2"),)), TCG,
               Slot(1, 100, "machine-ad"))


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_render_diff_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ovl = qcow2(tmp_path / "root.qcow2")
    ad = tmp_path / ".machine.ad"
    ad.write_text('Name = "slot1@wn"\nCpus = 1\nMemory = 1024\n')
    base = ["domain", "render", str(DATA / "osg-worker-in.xml"), "--disk", str(ovl), "--machine-ad", str(ad),
            "--capabilities", str(DATA / "capabilities.xml"), "--accel", "tcg", "--sandbox", str(tmp_path)]
    assert main([*base, "--print-diff"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("---") and "-    <emulator>/usr/libexec/qemu-kvm</emulator>" in out
    assert "+    <emulator>/usr/bin/qemu-system-x86_64</emulator>" in out
    assert "vmtool: warning: emulator '/usr/libexec/qemu-kvm' replaced" in err
    dest = tmp_path / "out.xml"
    assert main([*base, "--json", "-o", str(dest)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cpus"] == 1 and data["slot"]["source"] == "machine-ad" and data["accel"] == "tcg"
    root = etree.parse(str(dest)).getroot()
    assert root.findtext("vcpu") == "1" and int(root.findtext("memory") or 0) == data["memory_mib"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.xml")]


def test_cli_render_bad_input_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'><name>")
    dest = tmp_path / "out.xml"
    rc = main(["domain", "render", str(bad), "--disk", str(qcow2(tmp_path / "a.qcow2")), "--capabilities",
               str(DATA / "capabilities.xml"), "--accel", "tcg", "-o", str(dest)])
    err = capsys.readouterr().err
    assert rc == 1 and "vmtool: error: domain XML is not well-formed XML" in err and "Traceback" not in err
    assert not dest.exists()


LIBVIRT_RNG = Path("/usr/share/libvirt/schemas/domain.rng")


@pytest.mark.parametrize("case", CASES)
def test_rendered_xml_is_valid_for_libvirt(case: str, tmp_path: Path) -> None:
    """Every rendered domain validates against libvirt's own RELAX NG schema (the hostile input does not)."""
    if not LIBVIRT_RNG.exists():
        pytest.skip(f"{LIBVIRT_RNG} is not installed (Debian package libvirt0)")
    rng = etree.RelaxNG(etree.parse(str(LIBVIRT_RNG)))
    src, opts, host, slot = case_options(case, tmp_path)
    r = render(src, opts, host, slot)
    assert rng.validate(etree.fromstring(r.xml.encode())), rng.error_log
    if case == "hostile":
        assert not rng.validate(etree.fromstring(src or b""))


def test_relative_host_paths_are_written_back_as_sandbox_paths(tmp_path: Path) -> None:
    # libvirtd and qemu resolve a relative path from their own working directory ("/"), so a relative
    # path checked against the sandbox must not reach them relative: etc/passwd would open /etc/passwd.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(b"\0" * 512)
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "t.aml").write_bytes(b"acpi")
    qcow2(tmp_path / "data.qcow2")
    src = b"""<domain type='qemu'><name>x</name><os><type>hvm</type><kernel>k</kernel><dtb>etc/passwd</dtb>
<acpi><table type='slic'>t.aml</table></acpi></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='data.qcow2'/><target dev='vdb'/></disk>
<serial type='file'><source path='serial.log'/><target port='1'/></serial>
<channel type='file'><source path='chan.out'/><target type='virtio' name='x.y'/></channel>
</devices></domain>"""
    r = render(src, RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "a.qcow2"),)), TCG, SLOT)
    root = etree.fromstring(r.xml.encode())
    sb = str(tmp_path.resolve())
    named = [root.findtext("os/kernel"), root.findtext("os/dtb"), root.findtext("os/acpi/table"),
             *(d.get("file") for d in root.findall("devices/disk/source")),
             *(c.get("path") for c in root.findall("devices/channel/source")),
             *(c.get("path") for c in root.findall("devices/serial/source"))]
    # kernel, dtb, acpi table, the overlay that took the disk's place, the channel, 2 serials
    assert None not in named and len(named) == 7
    assert all(p is not None and p.startswith(sb + "/") for p in named), named
    assert root.findtext("os/dtb") == f"{sb}/etc/passwd"
