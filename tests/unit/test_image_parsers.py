"""Parsers of the image area on hand-made bytes: MBR/EBR, LVM metadata text, fstab, kernel order, symlinks."""

from __future__ import annotations

import io
import struct

import pytest

from vmtool.errors import ImageError
from vmtool.image import fstab, lvm
from vmtool.image.guesttree import S_IFDIR, S_IFLNK, S_IFREG, GuestTree, SymlinkOutside
from vmtool.image.inspect import Kernel, choose_kernel
from vmtool.image.partitions import read_table

pytestmark = pytest.mark.unit

MiB = 1 << 20


def _mbr(entries: list[tuple[int, int, int, int]], size: int = 64 * MiB) -> io.BytesIO:
    buf = bytearray(size)
    for i, (status, ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", buf, 446 + 16 * i, status, ptype, lba, count)
    buf[510:512] = b"\x55\xaa"
    return io.BytesIO(bytes(buf))


def test_mbr_primary_partitions() -> None:
    f = _mbr([(0x80, 0x83, 2048, 2048), (0, 0x8E, 4096, 8192)])
    t = read_table(f, 64 * MiB)
    assert t is not None and t.kind == "mbr"
    assert [(p.number, p.start, p.size, p.kind) for p in t.partitions] == [
        (1, 2048 * 512, 2048 * 512, "linux"),
        (2, 4096 * 512, 8192 * 512, "lvm"),
    ]
    assert t.partitions[0].bootable


def test_mbr_logical_partitions_follow_the_ebr_chain() -> None:
    f = _mbr([(0, 0x83, 2048, 2048), (0, 0x05, 8192, 40960)])
    buf = bytearray(f.getvalue())
    # EBR 1 at 8192: logical at +2048 (2048 sectors), next EBR at extended+8192
    struct.pack_into("<B3xB3xII", buf, 8192 * 512 + 446, 0, 0x83, 2048, 2048)
    struct.pack_into("<B3xB3xII", buf, 8192 * 512 + 462, 0, 0x05, 8192, 10240)
    buf[8192 * 512 + 510 : 8192 * 512 + 512] = b"\x55\xaa"
    ebr2 = (8192 + 8192) * 512
    struct.pack_into("<B3xB3xII", buf, ebr2 + 446, 0, 0x8E, 2048, 4096)
    buf[ebr2 + 510 : ebr2 + 512] = b"\x55\xaa"
    t = read_table(io.BytesIO(bytes(buf)), 64 * MiB)
    assert t is not None
    assert [(p.number, p.start // 512, p.kind) for p in t.partitions] == [
        (1, 2048, "linux"),
        (5, 10240, "linux"),
        (6, 18432, "lvm"),
    ]


def test_mbr_ebr_loop_is_refused() -> None:
    f = _mbr([(0, 0x05, 2048, 40960)])
    buf = bytearray(f.getvalue())
    struct.pack_into("<B3xB3xII", buf, 2048 * 512 + 446, 0, 0x83, 2048, 2048)
    struct.pack_into("<B3xB3xII", buf, 2048 * 512 + 462, 0, 0x05, 0, 10240)  # points at itself
    buf[2048 * 512 + 510 : 2048 * 512 + 512] = b"\x55\xaa"
    with pytest.raises(ImageError, match="loops"):
        read_table(io.BytesIO(bytes(buf)), 64 * MiB)


def test_mbr_overlap_and_past_end() -> None:
    with pytest.raises(ImageError, match="overlap"):
        read_table(_mbr([(0, 0x83, 2048, 8192), (0, 0x83, 4096, 8192)]), 64 * MiB)
    with pytest.raises(ImageError, match="past the end"):
        read_table(_mbr([(0, 0x83, 2048, 200000)]), 64 * MiB)


def test_random_sector_is_not_a_table() -> None:
    assert read_table(io.BytesIO(b"\x01" * (4 * MiB)), 4 * MiB) is None


METADATA = """
vg0 {
id = "abc"
seqno = 3
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192
physical_volumes {
pv0 {
id = "PVUUID"
pe_start = 2048
pe_count = 10
}
}
logical_volumes {
lv_swap {
id = "s"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
}
lv_root {
id = "r"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 3
type = "striped"
stripe_count = 1
stripes = ["pv0", 2]
}
segment2 {
start_extent = 3
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 7]
}
}
}
}
"""


def _label(offset: int = 1 * MiB, size: int = 64 * MiB) -> lvm.PVLabel:
    return lvm.PVLabel(offset, size, "PVUUID", size, [], [])


def test_lvm_metadata_maps_extents_to_disk_offsets() -> None:
    vg = lvm.parse_vg(METADATA, {"PVUUID": _label()})
    assert vg.name == "vg0" and vg.extent_size == 4 * MiB and vg.seqno == 3
    root = next(lv for lv in vg.lvs if lv.name == "lv_root")
    base = 1 * MiB + 2048 * 512
    assert root.extents == [(base + 2 * 4 * MiB, 3 * 4 * MiB), (base + 7 * 4 * MiB, 2 * 4 * MiB)]
    assert root.size == 5 * 4 * MiB and not root.unsupported


def test_lvm_extents_outside_the_pv_are_refused() -> None:
    bad = METADATA.replace('stripes = ["pv0", 7]', 'stripes = ["pv0", 9]')
    with pytest.raises(ImageError, match="outside PV"):
        lvm.parse_vg(bad, {"PVUUID": _label()})


def test_lvm_unsupported_segment_types_are_marked() -> None:
    text = METADATA.replace(
        'type = "striped"\nstripe_count = 1\nstripes = [\n"pv0", 0\n]',
        'type = "striped"\nstripe_count = 2\nstripes = ["pv0", 0, "pv1", 0]',
    )
    vg = lvm.parse_vg(text, {"PVUUID": _label()})
    swap = next(lv for lv in vg.lvs if lv.name == "lv_swap")
    assert swap.unsupported == "striped over 2 PVs" and swap.extents == []
    thin = lvm.parse_vg(METADATA.replace('type = "striped"', 'type = "thin"', 1), {"PVUUID": _label()})
    assert "thin" in next(lv for lv in thin.lvs if lv.name == "lv_swap").unsupported


@pytest.mark.parametrize(
    "text",
    ["vg0 { extent_size = 8192 ", "vg0 { a = [1, 2 }", "}}}", "vg0 { = 3 }", 'vg0 { x = "unterminated }'],
)
def test_lvm_metadata_that_does_not_parse(text: str) -> None:
    with pytest.raises(ImageError, match="LVM metadata"):
        lvm.parse_vg(text, {})


def test_lvm_crc_is_crc32_without_final_inversion() -> None:
    # lvm2's calc_crc: reflected CRC-32 (0xedb88320), seeded with INITIAL_CRC, no final xor.
    def slow(data: bytes, crc: int = lvm.INITIAL_CRC) -> int:
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
        return crc

    for data in (b"", b"\0", b"LVM2 x[5A%r0N*>", bytes(range(256)) * 3):
        assert lvm.lvm_crc(data) == slow(data)


FSTAB = """# comment stays
/dev/mapper/vg0-lv_root /                       ext4    defaults        1 1
UUID=0abae194-64c8-4d13-a4c0-6284d9dcd7b4 /boot ext4    defaults        1 2
/dev/mapper/vg0-lv_swap swap                    swap    defaults        0 0
tmpfs                   /dev/shm                tmpfs   defaults        0 0
proc /proc proc defaults 0 0
server:/export /data nfs defaults 0 0
"""


def test_fstab_rewrite_keeps_every_line() -> None:
    out = fstab.rewrite(FSTAB, label="cloudimg-rootfs", fstype="ext4")
    lines = out.splitlines()
    assert "# comment stays" in lines
    assert "LABEL=cloudimg-rootfs\t/\text4\tdefaults\t0 1" in lines
    assert any(ln.startswith("# vmtool: not in this image: UUID=0abae194") for ln in lines)
    assert any(ln.startswith("# vmtool: not in this image: /dev/mapper/vg0-lv_swap") for ln in lines)
    assert any(ln.startswith("# vmtool: root was: /dev/mapper/vg0-lv_root") for ln in lines)
    assert "proc /proc proc defaults 0 0" in lines
    assert any(ln.startswith("tmpfs ") for ln in lines) and "server:/export /data nfs defaults 0 0" in lines
    active = [e for e in fstab.parse(out)]
    assert [e.file for e in active] == ["/", "/dev/shm", "/proc", "/data"]


def test_fstab_missing_or_without_root() -> None:
    assert fstab.root_entry(fstab.rewrite(None, label="r", fstype="xfs")).spec == "LABEL=r"  # type: ignore[union-attr]
    out = fstab.rewrite("proc /proc proc defaults 0 0\n", label="r", fstype="ext4")
    assert out.splitlines()[0] == "LABEL=r\t/\text4\tdefaults\t0 1"


def test_fstab_root_type_change_resets_options() -> None:
    out = fstab.rewrite("UUID=x / xfs noatime,inode64 0 0\n", label="r", fstype="ext4")
    assert "LABEL=r\t/\text4\tdefaults\t0 1" in out.splitlines()


def _k(v: str, initrd: bool = True) -> Kernel:
    return Kernel(
        v,
        f"/boot/vmlinuz-{v}",
        f"/boot/vmlinuz-{v}",
        f"/boot/initrd.img-{v}" if initrd else None,
        f"/boot/initrd.img-{v}" if initrd else None,
    )


def test_newest_kernel_by_version_not_lexically() -> None:
    ks = [
        _k("6.1.0-9-amd64"),
        _k("6.1.0-56-amd64"),
        _k("5.10.0-28-amd64"),
        _k("6.1.0-60-amd64", initrd=False),
    ]
    assert choose_kernel(ks, None).version == "6.1.0-56-amd64"  # type: ignore[union-attr]
    assert choose_kernel(ks, "6.1.0-9-amd64").version == "6.1.0-9-amd64"  # type: ignore[union-attr]
    with pytest.raises(ImageError, match="not in the image"):
        choose_kernel(ks, "7.0")
    with pytest.raises(ImageError, match="no initrd"):
        choose_kernel(ks, "6.1.0-60-amd64")
    with pytest.raises(ImageError, match="no kernel"):
        choose_kernel([], None)


class DictFs:
    """A tiny in-memory filesystem: path -> ("dir"|"file"|"link", target)."""

    def __init__(self, name: str, entries: dict[str, tuple[str, str]]) -> None:
        self.name = name
        self.entries = {"/": ("dir", ""), **entries}

    def lstat(self, path: str) -> tuple[int, int, int] | None:
        e = self.entries.get(path)
        if e is None:
            return None
        mode = {"dir": S_IFDIR, "file": S_IFREG, "link": S_IFLNK}[e[0]]
        return 1, mode | 0o755, 0

    def readlink(self, path: str) -> str:
        return self.entries[path][1]

    def listdir(self, path: str) -> list[tuple[str, int]]:
        pre = path.rstrip("/") + "/"
        return [
            (p[len(pre) :], 0)
            for p in self.entries
            if p.startswith(pre) and "/" not in p[len(pre) :] and p != "/"
        ]


def test_symlinks_resolve_inside_the_guest_namespace() -> None:
    root = DictFs(
        "root",
        {
            "/boot": ("dir", ""),
            "/etc": ("dir", ""),
            "/etc/passwd": ("file", ""),
            "/vmlinuz": ("link", "boot/vmlinuz-6"),
            "/abs": ("link", "/etc/../etc/passwd"),
        },
    )
    boot = DictFs(
        "boot",
        {
            "/vmlinuz-6": ("file", ""),
            "/vmlinuz": ("link", "vmlinuz-6"),
            "/up": ("link", "../etc/passwd"),
            "/escape": ("link", "../../../../etc/shadow"),
            "/loop": ("link", "loop"),
        },
    )
    t = GuestTree({"/": root, "/boot": boot})
    assert t.resolve("/vmlinuz") == "/boot/vmlinuz-6"
    assert t.resolve("/boot/vmlinuz") == "/boot/vmlinuz-6"
    assert t.resolve("/boot/up") == "/etc/passwd"  # /boot/.. is the guest's /, as in the guest
    assert t.resolve("/abs") == "/etc/passwd"
    with pytest.raises(SymlinkOutside, match="outside the guest"):
        t.resolve("/boot/escape")
    with pytest.raises(ImageError, match="too many levels of symlinks"):
        t.resolve("/boot/loop")
