"""Real Debian 12 images made by mmdebstrap in the installer's layout: `vmtool build --agent relay`, then
`vmtool queue work` boots them (real libvirtd, TCG) and runs items with the distribution's own tools
(dash, coreutils, mawk, dpkg). One boot per image: the first item waits for the init to finish its
start-up and reports failed units, so the same boot shows multi-user/runlevel reached and the agent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer, destroy_domains
from tests.fixtures.distros import distro_build
from vmtool.queue.beanstalk import Beanstalk, results_tube
from vmtool.queue.client import collect_results, put_items
from vmtool.queue.items import Item
from vmtool.queue.vms import VMFactory, resolve_image
from vmtool.queue.worker import Worker, WorkerOptions

pytestmark = [pytest.mark.vm, pytest.mark.queue, pytest.mark.libvirt]

TOOLS = Item(
    "tools",
    [
        "sh",
        "-c",
        "readlink -f /bin/sh; awk -W version 2>&1 | head -n 1 | cut -d' ' -f1; "
        "dpkg-query -W -f '${Package}\\n' coreutils; cat /etc/debian_version | cut -d. -f1",
    ],
)


def _run_items(
    beanstalkd: BeanstalkServer, manifest: Path, uri: str, tmp_path: Path, items: list[Item]
) -> dict:
    tube = f"distro{os.getpid()}"
    prefix = f"vmtool-dt{os.getpid()}-"
    with Beanstalk(beanstalkd.address) as bs:
        put_items(bs, tube, items, ttr=900)
    factory = VMFactory(
        resolve_image(manifest), tmp_path / "work", memory_mib=768, uri=uri, name_prefix=prefix
    )
    opts = WorkerOptions(beanstalkd.address, tube, vms=1, idle_timeout=10, max_attempts=1, boot_timeout=1200)
    try:
        report = Worker(opts, factory).run()
    finally:
        destroy_domains(uri, prefix)
    assert not report.errors, report.errors
    with Beanstalk(beanstalkd.address, watch=results_tube(tube)) as bs:
        got = collect_results(bs, want=len(items), timeout=5)
    return got.results


def test_debian_systemd_lvm_boots_to_multi_user_and_runs_items(
    beanstalkd: BeanstalkServer,
    debian_disk: tuple[Path, dict[str, object]],
    debian_agent_build: Path,
    libvirt_uri: str,
    tmp_path: Path,
) -> None:
    disk, facts = debian_disk
    # The installer's layout: MBR, /boot ext2, LVM debian-vg with swap_1 and root, fstab by /dev/mapper.
    assert facts["table"] == "mbr" and facts["vg"] == "debian-vg"
    assert "/dev/mapper/debian--vg-root\t/\text4" in str(facts["fstab"])
    m = json.loads(debian_agent_build.read_text())
    assert m["guest"]["init"]["kind"] == "systemd"
    assert m["agent"]["init"] == "systemd" and "multi-user.target" in m["agent"]["hook"]
    assert m["guest"]["initrd"]["generator"] == "initramfs-tools"
    assert m["guest"]["initrd"]["buses"][0] == "virtio"
    res = _run_items(
        beanstalkd,
        debian_agent_build,
        libvirt_uri,
        tmp_path,
        [
            Item(
                "state", ["sh", "-c", "systemctl is-system-running --wait; systemctl --failed --no-legend"]
            ),
            Item("init", ["sh", "-c", "readlink /proc/1/exe; systemctl is-active vmtool-agent.service"]),
            TOOLS,
        ],
    )
    assert res["state"]["stdout"] == "running\n", res["state"]
    assert res["init"]["stdout"] == "/usr/lib/systemd/systemd\nactive\n", res["init"]
    assert res["tools"]["stdout"] == "/usr/bin/dash\nmawk\ncoreutils\n12\n", res["tools"]


def test_debian_sysvinit_reaches_its_runlevel_and_runs_items(
    beanstalkd: BeanstalkServer,
    debian_sysv_disk: tuple[Path, dict[str, object]],
    libvirt_uri: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    manifest = distro_build(debian_sysv_disk[0], tmp_path_factory)
    m = json.loads(manifest.read_text())
    assert m["guest"]["init"]["kind"] == "sysvinit" and "inittab" in m["agent"]["hook"]
    res = _run_items(
        beanstalkd,
        manifest,
        libvirt_uri,
        tmp_path,
        [Item("runlevel", ["sh", "-c", "runlevel; readlink /proc/1/exe; tail -n 1 /etc/inittab"]), TOOLS],
    )
    assert res["runlevel"]["stdout"] == "N 2\n/usr/sbin/init\nva:2345:once:/usr/lib/vmtool/agent-boot\n", (
        res["runlevel"]
    )
    assert res["tools"]["stdout"] == "/usr/bin/dash\nmawk\ncoreutils\n12\n", res["tools"]


def test_debian_dracut_xfs_root_on_lvm_builds_with_guestfs_and_runs_items(
    beanstalkd: BeanstalkServer,
    libvirt_uri: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.fixtures.distros import distro_disk

    disk, facts = distro_disk("debian-12-dracut-xfs", tmp_path_factory)
    assert facts["fstype"] == "xfs" and facts["vg"] == "rl"
    manifest = distro_build(disk, tmp_path_factory, "--label", "img-rootfs")  # xfs labels: 12 bytes
    m = json.loads(manifest.read_text())
    assert m["build"]["backend"] == "guestfs" and m["rootfs"]["fstype"] == "xfs"
    assert m["guest"]["init"]["kind"] == "systemd" and m["guest"]["initrd"]["generator"] == "dracut"
    res = _run_items(
        beanstalkd,
        manifest,
        libvirt_uri,
        tmp_path,
        [Item("state", ["sh", "-c", "systemctl is-system-running --wait; findmnt -no FSTYPE /"]), TOOLS],
    )
    assert res["state"]["stdout"] == "running\nxfs\n", res["state"]
    assert res["tools"]["stdout"] == "/usr/bin/dash\nmawk\ncoreutils\n12\n", res["tools"]
