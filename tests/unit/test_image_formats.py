"""vmtool.image.formats on bytes written here: every format's signature, qcow2 headers, hostile images."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from vmtool.domain.policy import RenderOptions, render
from vmtool.domain.slot import Slot
from vmtool.errors import DomainError, ImageError
from vmtool.image import formats
from vmtool.image.formats import ImageInfo, Policy, inspect_bytes, protocol_of
from vmtool.launch.host import HostFacts

pytestmark = pytest.mark.unit

HEADER_ONLY = Policy(qemu=False)
EXT_BACKING_FORMAT, EXT_DATA_FILE = 0xE2792ACA, 0x44415441


def qcow2(
    *,
    version: int = 3,
    backing: bytes | None = None,
    backing_format: bytes | None = None,
    data_file: bytes | None = None,
    incompatible: int = 0,
    crypt: int = 0,
    header_length: int = 104,
    cluster_bits: int = 16,
    size: int = 1 << 30,
) -> bytes:
    """A qcow2 header as qemu-img writes it: header, extensions, then the backing file name."""
    b_off = 4096 if backing is not None else 0
    hdr = struct.pack(">4sIQIIQI", b"QFI\xfb", version, b_off, len(backing or b""), cluster_bits, size, crypt)
    if version == 2:
        hdr = hdr.ljust(72, b"\0")
    else:
        hdr = hdr.ljust(72, b"\0") + struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
    exts = b""
    for kind, data in ((EXT_BACKING_FORMAT, backing_format), (EXT_DATA_FILE, data_file)):
        if data is not None:
            exts += struct.pack(">II", kind, len(data)) + data.ljust((len(data) + 7) & ~7, b"\0")
    out = (hdr + exts + bytes(8)).ljust(b_off or 512, b"\0")
    return out + (backing or b"")


def at(offset: int, magic: bytes, size: int = 64 << 10) -> bytes:
    buf = bytearray(size)
    buf[offset : offset + len(magic)] = magic
    return bytes(buf)


DESCRIPTOR = b"""# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "/etc/shadow" 0
RW 2048 ZERO
"""

KDMV = struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 4096, 128, 1, 1).ljust(512, b"\0") + (
    b'version=1\nRW 4096 SPARSE "other.vmdk"\n'
).ljust(512, b"\0")


@pytest.mark.parametrize(
    ("name", "data", "fmt", "content"),
    [
        ("zeros", bytes(4096), "raw", None),
        ("mbr", at(510, b"\x55\xaa"), "raw", "mbr"),
        ("gpt", at(512, b"EFI PART"), "raw", "gpt"),
        ("ext4", at(0x438, b"\x53\xef"), "raw", "ext"),
        ("xfs", at(0, b"XFSB"), "raw", "xfs"),
        ("iso", at(0x8001, b"CD001", 0x9000), "raw", "iso9660"),
        ("lvm", at(0x218, b"LVM2 001"), "raw", "lvm"),
        ("qcow2", qcow2(), "qcow2", None),
        ("qed", at(0, b"QED\x00"), "qed", None),
        ("vmdk sparse", KDMV, "vmdk", None),
        ("vmdk vmware3", at(0, b"COWD"), "vmdk", None),
        ("vmdk descriptor", DESCRIPTOR, "vmdk", None),
        ("vmdk descriptor, bare", b"\n# x\n  \nversion=2\r\nRW 8 FLAT \"a\" 0\n", "vmdk", None),
        ("vhdx", at(0, b"vhdxfile"), "vhdx", None),
        ("vhd", at(0, b"conectix"), "vpc", None),
        ("vdi text", at(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n"), "vdi", None),
        ("vdi magic", at(0x40, b"\x7f\x10\xda\xbe"), "vdi", None),
        ("luks", at(0, b"LUKS\xba\xbe\x00\x02"), "luks", None),
        ("parallels", at(0, b"WithoutFreeSpace"), "parallels", None),
        ("bochs", at(0, b"Bochs Virtual HD Image"), "bochs", None),
        ("gzip", at(0, b"\x1f\x8b\x08"), "gzip", None),
        ("xz", at(0, b"\xfd7zXZ\x00"), "xz", None),
        ("zstd", at(0, b"\x28\xb5\x2f\xfd"), "zstd", None),
        ("bzip2", at(0, b"BZh9"), "bzip2", None),
        ("tar", at(257, b"ustar"), "tar", None),
        ("zip", at(0, b"PK\x03\x04"), "zip", None),
        ("text", b"version=1 is only words here\n" * 40, "raw", None),
    ],
)
def test_every_format_is_recognised(name: str, data: bytes, fmt: str, content: str | None) -> None:
    info = inspect_bytes(data)
    assert (info.format, info.content) == (fmt, content), name


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (qcow2(), {"version": 3, "virtual_size": 1 << 30, "backing": None, "data_file": None}),
        (qcow2(version=2, size=12345 * 512), {"version": 2, "virtual_size": 12345 * 512}),
        (qcow2(backing=b"/cache/bases/x.raw", backing_format=b"raw"),
         {"backing": "/cache/bases/x.raw", "backing_format": "raw"}),
        (qcow2(backing=b"base.qcow2"), {"backing": "base.qcow2", "backing_format": None}),
        (qcow2(incompatible=0x4, data_file=b"/etc/shadow"), {"data_file": "/etc/shadow"}),
        (qcow2(incompatible=0x4), {"data_file": ""}),
        (qcow2(data_file=b"/etc/shadow"), {"data_file": "/etc/shadow"}),  # named without the bit: still refused
        (qcow2(crypt=2), {"encrypted": True}),
        (qcow2(incompatible=0x2), {"corrupt": True, "damage": None}),
        (qcow2(incompatible=0x1 | 0x8 | 0x10), {"unknown_features": 0, "damage": None}),
        (qcow2(incompatible=1 << 40 | 0x20), {"unknown_features": 1 << 40 | 0x20}),
        (qcow2()[:60], {"damage": "its qcow2 header is truncated (60 of 72 bytes)"}),
        (qcow2()[:90], {"damage": "its qcow2 header is truncated (90 of 104 bytes)"}),
        (qcow2()[:104], {"damage": "its qcow2 header is truncated (104 of 112 bytes)"}),
        (qcow2(version=4), {"damage": "qcow2 version 4 does not exist (qemu knows 2 and 3)"}),
        (qcow2(header_length=72), {"damage": "its header length 72 is shorter than 104 bytes"}),
        (qcow2(cluster_bits=30), {"damage": "its cluster size 2^30 is out of range"}),
        (qcow2(crypt=7), {"damage": "unknown encryption method 7"}),
        (qcow2(backing=b"/x", cluster_bits=9), {"damage": "its backing file name lies outside the first cluster"}),
        (qcow2(backing=b"/etc/shadow")[:-3], {"damage": "its qcow2 header is truncated (4104 of 4107 bytes)"}),
        (KDMV, {"virtual_size": 4096 * 512, "extents": ("other.vmdk",)}),
        (DESCRIPTOR, {"virtual_size": 4096 * 512, "extents": ("/etc/shadow",)}),
        (at(0, b"LUKS\xba\xbe\x00\x02"), {"version": 2, "encrypted": True}),
        (at(0, b"conectix") [:48] + struct.pack(">QII", 1 << 20, 0, 4) + bytes(512), {"virtual_size": 1 << 20,
                                                                                       "backing": ""}),
        (at(0, b"QED\x00")[:16] + struct.pack("<QQQQQII", 1, 0, 0, 0, 1 << 20, 64, 4) + b"/etc",
         {"virtual_size": 1 << 20, "backing": "/etc"}),
    ],
)
def test_header_facts(data: bytes, want: dict[str, object]) -> None:
    info = inspect_bytes(data)
    assert {k: getattr(info, k) for k in want} == want


@pytest.mark.parametrize(
    ("name", "proto"),
    [
        ("/var/cache/vmtool/bases/a.qcow2", None),
        ("base.qcow2", None),
        ("./a:b", None),
        ("dir/a:b", None),
        ('json:{"driver":"file","filename":"/etc/shadow"}', "json"),
        ("nbd:localhost:10809", "nbd"),
        ("nbd+unix:///x?socket=/s", "nbd+unix"),
        ("http://example.org/x.qcow2", "http"),
        ("file:/etc/shadow", "file"),
        (":x", ""),
    ],
)
def test_protocol_pseudo_filenames(name: str, proto: str | None) -> None:
    assert protocol_of(name) == proto


# Each hostile image, and the words its one error must hold (whatever policy the caller has).
HOSTILE: list[tuple[str, bytes, str]] = [
    ("vmdk-shadow", DESCRIPTOR, r"vmdk images are not supported \(its descriptor names the extent files '/etc/shadow'"),
    ("vmdk-sparse", KDMV, "vmdk images are not supported .*'other.vmdk'"),
    ("data-file", qcow2(incompatible=0x4, data_file=b"/etc/shadow"), r"external data file \('/etc/shadow'\)"),
    ("data-file-unnamed", qcow2(incompatible=0x4), "external data file, which vmtool never follows"),
    ("json-backing", qcow2(backing=b'json:{"driver":"file","filename":"/etc/shadow"}', backing_format=b"raw"),
     "a json: pseudo-filename"),
    ("nbd-backing", qcow2(backing=b"nbd:127.0.0.1:10809", backing_format=b"raw"), "a nbd: pseudo-filename"),
    ("luks", at(0, b"LUKS\xba\xbe\x00\x01"), "LUKS-encrypted images are not supported"),
    ("encrypted-qcow2", qcow2(crypt=2), "encrypted qcow2 image"),
    ("unknown-features", qcow2(incompatible=1 << 20), r"incompatible features qemu does not know \(bits 0x100000\)"),
    ("corrupt", qcow2(incompatible=0x2), "marked corrupt"),
    ("truncated", qcow2()[:50], "damaged qcow2 image: its qcow2 header is truncated"),
    ("version", qcow2(version=1), "damaged qcow2 image: qcow2 version 1"),
    ("qed", at(0, b"QED\x00"), "qed images are not supported"),
    ("vhd", at(0, b"conectix"), "vhd images are not supported"),
    ("vhdx", at(0, b"vhdxfile"), "vhdx images are not supported"),
    ("vdi", at(0x40, b"\x7f\x10\xda\xbe"), "vdi images are not supported"),
    ("gzip", at(0, b"\x1f\x8b"), "gzip-compressed images are not supported"),
]


@pytest.mark.parametrize(("case", "data", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("declared", [None, "raw", "qcow2"])
def test_hostile_images_are_refused_whatever_the_declared_format(
    case: str, data: bytes, needle: str, declared: str | None, tmp_path: Path
) -> None:
    p = tmp_path / case
    p.write_bytes(data)
    with pytest.raises(ImageError) as ei:
        formats.check(p, declared, HEADER_ONLY)
    if declared == "raw" and inspect_bytes(data).format == "qcow2":
        assert "is a qcow2 image but --format raw was given" in ei.value.message
    elif declared == "qcow2" and inspect_bytes(data).format == "raw":
        assert "is not a qcow2 image" in ei.value.message
    else:
        assert ei.value.message.startswith(str(p))
        assert re.search(needle, ei.value.message), ei.value.message
    assert ei.value.hint


def test_backing_file_policy(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "base.raw").write_bytes(bytes(1 << 20))
    (cache / "evil.qcow2").write_bytes(qcow2(backing=b"/etc/shadow", backing_format=b"raw"))
    (tmp_path / "outside.raw").write_bytes(bytes(4096))
    within = Policy(backing_roots=(cache,), qemu=False)

    def img(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    ok = img("ok.qcow2", qcow2(backing=str(cache / "base.raw").encode(), backing_format=b"raw"))
    assert formats.check(ok, None, within).backing == str(cache / "base.raw")
    rel = img("rel.qcow2", qcow2(backing=b"cache/base.raw", backing_format=b"raw"))
    assert formats.check(rel, "qcow2", Policy(backing_roots=(tmp_path,), qemu=False)).backing == "cache/base.raw"
    # a per-VM overlay on a staged overlay on a base: each link judged as the top one
    top = img("top.qcow2", qcow2(backing=str(ok).encode(), backing_format=b"qcow2"))
    assert formats.check(top, None, Policy(backing_roots=(tmp_path,), qemu=False)).backing == str(ok)
    refused = [
        (ok, HEADER_ONLY, "has a backing file .*, which vmtool never follows"),
        (img("out.qcow2", qcow2(backing=b"outside.raw", backing_format=b"raw")), within, "is backed by 'outside.raw', outside"),
        (img("dots.qcow2", qcow2(backing=b"cache/../outside.raw", backing_format=b"raw")), within, "outside"),
        (img("nofmt.qcow2", qcow2(backing=str(cache / "base.raw").encode())), within,
         "does not name its format .*qemu would probe it"),
        (img("vmdkfmt.qcow2", qcow2(backing=str(cache / "base.raw").encode(), backing_format=b"vmdk")), within,
         "is 'vmdk'"),
        (img("chain.qcow2", qcow2(backing=str(cache / "evil.qcow2").encode(), backing_format=b"qcow2")), within,
         "its backing file .*evil.qcow2' is backed by '/etc/shadow', outside"),
        (img("loop.qcow2", qcow2(backing=b"loop.qcow2", backing_format=b"qcow2")), Policy(backing_roots=(tmp_path,), qemu=False),
         "its backing chain is deeper than 4 images"),
        (img("fmtlie.qcow2", qcow2(backing=str(cache / "evil.qcow2").encode(), backing_format=b"raw")), within,
         "is a qcow2 image but --format raw"),
        (img("gone.qcow2", qcow2(backing=str(cache / "gone.raw").encode(), backing_format=b"raw")), within,
         "no such file"),
        (img("empty.qcow2", qcow2(backing=b"", backing_format=b"raw")), within, "empty name"),
    ]
    for path, policy, needle in refused:
        with pytest.raises(ImageError) as ei:
            formats.check(path, None, policy)
        assert re.search(needle, ei.value.message), (path.name, ei.value.message)
        assert ei.value.hint


@pytest.mark.parametrize(
    ("data", "policy", "declared", "needle"),
    [
        (b"", HEADER_ONLY, None, "is empty, not a disk image"),
        (b"words\n" * 100, Policy(guess_raw=False, qemu=False), None, "not a disk image .no qcow2 header"),
        (b"words\n" * 100, HEADER_ONLY, "raw", "600 bytes, not a whole number of 512-byte sectors"),
        (bytes(1024), HEADER_ONLY, "vmdk", "unsupported image format 'vmdk'"),
    ],
)
def test_not_disk_images(data: bytes, policy: Policy, declared: str | None, needle: str, tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(data)
    with pytest.raises(ImageError, match=needle):
        formats.check(p, declared, policy)


def test_what_is_accepted(tmp_path: Path) -> None:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(at(0x8001, b"CD001", 0x10000))
    assert formats.check(iso, None, HEADER_ONLY) == ImageInfo("raw", virtual_size=0x10000, content="iso9660")
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    assert formats.check(odd, None, Policy(whole_sectors=False, qemu=False)).format == "raw"
    q = tmp_path / "v2.qcow2"
    q.write_bytes(qcow2(version=2))
    assert formats.check(q, "qcow2", HEADER_ONLY).version == 2
    with pytest.raises(ImageError, match="not a regular file"):
        formats.check(tmp_path, None, HEADER_ONLY)
    with pytest.raises(ImageError, match="no such file"):
        formats.check(tmp_path / "nope", None, HEADER_ONLY)


# -- the domain's two callers: a disk in the job's sandbox (removed with a warning), a --disk overlay --

TCG = HostFacts("/usr/bin/qemu-system-x86_64", "x86_64", ("pc", "q35"), ("qemu", "kvm"), False, "test")
SLOT = Slot(cpus=1, memory_mib=1024, source="machine-ad")
OVERLAY = qcow2(version=3)


@pytest.mark.parametrize(("case", "data", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_domain_refuses_hostile_sandbox_disks_and_overlays(
    case: str, data: bytes, needle: str, tmp_path: Path
) -> None:
    (tmp_path / "in.img").write_bytes(data)
    (tmp_path / "root.qcow2").write_bytes(OVERLAY)
    xml = b"""<domain type='qemu'><name>x</name><devices>
<disk type='file' device='disk'><source file='replaced.img'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='in.img'/><target dev='vdb'/></disk>
</devices></domain>"""
    r = render(xml, RenderOptions(sandbox=tmp_path, disks=(tmp_path / "root.qcow2",)), TCG, SLOT)
    assert "in.img" not in r.xml
    assert any(re.search(needle, w) and "removed" in w for w in r.warnings), r.warnings
    with pytest.raises(DomainError) as ei:
        render(None, RenderOptions(sandbox=tmp_path, disks=(tmp_path / "in.img",)), TCG, SLOT)
    assert ei.value.hint
    if inspect_bytes(data).format == "qcow2":
        assert re.search(needle, ei.value.message), ei.value.message
    else:
        assert re.search(needle, ei.value.message) or "is not a qcow2 image" in ei.value.message


def test_domain_overlay_may_name_a_plain_base_with_its_format(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    ovl = tmp_path / "root.qcow2"
    ovl.write_bytes(qcow2(backing=str(base).encode(), backing_format=b"raw"))
    r = render(None, RenderOptions(sandbox=tmp_path, disks=(ovl,)), TCG, SLOT)
    assert str(ovl) in r.xml
    ovl.write_bytes(qcow2(backing=str(base).encode()))
    with pytest.raises(DomainError, match="does not name its format"):
        render(None, RenderOptions(sandbox=tmp_path, disks=(ovl,)), TCG, SLOT)
