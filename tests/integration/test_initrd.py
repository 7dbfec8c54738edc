"""The initrd check reads real initramfs layouts (cpio newc, an early-microcode cpio first, gzip, xz,
zstd, lz4 made by the real tools) and refuses what it cannot read, each with its fix."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from vmtool.image.initrd import InitrdError, check, read_members
from vmtool.run import run

pytestmark = pytest.mark.integration

KV = "6.1.0-57-amd64"
CONFIG_MODULES = (
    "CONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_BLK=m\nCONFIG_SATA_AHCI=m\nCONFIG_ATA_PIIX=m\n"
    "CONFIG_BLK_DEV_SD=m\nCONFIG_ATA=m\nCONFIG_EXT4_FS=m\nCONFIG_XFS_FS=m\n"
)


def cpio(names: list[str]) -> bytes:
    """A newc archive of empty files, as cpio -H newc writes it."""
    out = b""
    for n, name in enumerate([*names, "TRAILER!!!"]):
        nm = name.encode() + b"\0"
        fields = [n + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(nm), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += hdr + nm
        out += b"\0" * (-len(out) % 4)
    return out + b"\0" * (-len(out) % 512)


def mods(*names: str, prefix: str = "usr/lib/modules") -> list[str]:
    where = {
        "virtio_pci": "drivers/virtio",
        "virtio_blk": "drivers/block",
        "ahci": "drivers/ata",
        "ata_piix": "drivers/ata",
        "libata": "drivers/ata",
        "sd_mod": "drivers/scsi",
        "ext4": "fs/ext4",
        "xfs": "fs/xfs",
    }
    return [f"{prefix}/{KV}/kernel/{where[n]}/{n}.ko.xz" for n in names]


ALL = ("virtio_pci", "virtio_blk", "ahci", "ata_piix", "libata", "sd_mod", "ext4")
MICROCODE = cpio(["kernel", "kernel/x86", "kernel/x86/microcode", "kernel/x86/microcode/GenuineIntel.bin"])


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "lz4"])
def test_every_compression_behind_an_early_microcode_cpio(kind: str) -> None:
    main = cpio(["init", "scripts/init-top/udev", *mods(*ALL)])
    if kind == "gzip":
        packed = gzip.compress(main)
    elif kind == "xz":
        packed = lzma.compress(main, check=lzma.CHECK_CRC32)
    elif kind == "zstd":
        packed = run(["zstd", "-q", "-c"], input=main).stdout
    else:
        packed = run(["lz4", "-l", "-q", "-c"], input=main).stdout
    r = check(MICROCODE + packed, CONFIG_MODULES, "ext4")
    assert r.archives == ("cpio", f"{kind}+cpio")
    assert r.generator == "initramfs-tools"
    assert r.buses == ("virtio", "sata", "ide")
    assert set(r.drivers.values()) == {"initrd"} and not r.warnings


def test_builtin_drivers_count_and_a_hostonly_initrd_falls_back_to_sata() -> None:
    # dracut hostonly from a machine with AHCI disks: no virtio modules, ahci in the initrd.
    img = gzip.compress(
        cpio(["usr/lib/dracut/build-parameter.txt", *mods("ahci", "libata", "sd_mod", "xfs")])
    )
    r = check(img, CONFIG_MODULES, "xfs")
    assert r.generator == "dracut" and r.buses == ("sata",)
    assert r.drivers["virtio_blk"] == "missing" and r.drivers["xfs"] == "initrd"
    assert "virtio_pci, virtio_blk missing" in r.warnings[0] and "SATA" in r.warnings[0]
    # The same initrd with a kernel that has virtio built in can use virtio.
    builtin = CONFIG_MODULES.replace("VIRTIO_PCI=m", "VIRTIO_PCI=y").replace("VIRTIO_BLK=m", "VIRTIO_BLK=y")
    assert check(img, builtin, "xfs").buses[0] == "virtio"
    # No driver for the root filesystem: no bus can boot it.
    assert check(img, CONFIG_MODULES, "ext4").buses == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "not a cpio archive nor a known compression"),
        (cpio(["init", *mods(*ALL)])[:300], "truncated"),
        (gzip.compress(cpio(["init"]))[:-12], "gzip stream is truncated"),
        (b"07070X" + b"0" * 200, "not a cpio archive nor a known compression"),
    ],
    ids=["unknown-compression", "truncated-cpio", "truncated-gzip", "bad-magic"],
)
def test_unreadable_initrds_are_refused_with_a_fix(data: bytes, message: str) -> None:
    with pytest.raises(InitrdError) as e:
        check(data, CONFIG_MODULES, "ext4")
    assert message in e.value.message and e.value.hint


def test_missing_kernel_config_is_refused_with_a_fix() -> None:
    with pytest.raises(InitrdError) as e:
        check(gzip.compress(cpio(["init"])), None, "ext4")
    assert "config" in e.value.message and "/boot" in (e.value.hint or "")


def test_the_hosts_own_initrd(tmp_path: Path) -> None:
    initrd = Path(f"/boot/initrd.img-{KV}")
    if not initrd.exists():
        initrd = sorted(Path("/boot").glob("initrd.img-*"))[-1]
    names, kinds = read_members(initrd.read_bytes())
    assert kinds and any(n.endswith("virtio_blk.ko") or "virtio_blk" in n for n in names)


def test_a_damaged_archive_inside_zstd_stops_the_tool() -> None:
    # The member data after a damaged header is never read: the zstd process must not be left behind.
    import threading

    main = cpio(["init", *mods(*ALL)]) + b"07070X" + b"0" * (1 << 20)
    packed = run(["zstd", "-q", "-c"], input=main + bytes(8 << 20)).stdout
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(InitrdError) as e:
        check(packed, CONFIG_MODULES, "ext4")
    assert "inside its zstd stream" in e.value.message
    assert "vmtool-zstd-feed" not in {t.name for t in threading.enumerate()} - before
