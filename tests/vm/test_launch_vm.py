"""`vmtool launch` with real parts: our own libvirtd, a busybox guest booting the host's kernel under
TCG (KVM where it works), and a fake HTCondor slot cgroup. Few boots, assertions combined:

- A: the CLI in a child process placed in the slot, booting the build issue's `default_build`: the
  guest writes a console line and powers off;
  qemu (every thread) lives under the slot while it runs; exit 0, a full --report; nothing left.
- B: the API with a virtio-serial channel and a guest that hogs memory: the channel carries a line,
  then qemu is killed by the slot's limit and it is reported as a memory kill; host and daemon fine.
- C: the CLI signalled with SIGTERM during boot: exit 143, nothing left.
- D: the CLI killed with SIGKILL: libvirt destroys the VM (AUTODESTROY).
- E: two short boots: --timeout (exit 124) and qemu dying of a signal (crashed, exit 4).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.libvirtd import FakeSlot, make_guest, overlay
from vmtool import manifest as mf
from vmtool.domain.policy import BootFiles, RenderOptions
from vmtool.launch import ExitReason, LaunchSpec, start
from vmtool.run import DEVNULL, PIPE, Popen, run, spawn

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

HELLO = {"10-hello": "#!/bin/sh\necho 'vmtool-test: hello from the guest'\n"}
CHANNEL = "org.vmtool.relay.0"
HOG = {
    "10-channel": "#!/bin/sh\n"
                  "for p in /sys/class/virtio-ports/*; do\n"
                  f"  [ \"$(cat $p/name)\" = {CHANNEL} ] && dev=/dev/$(basename $p)\n"
                  "done\n"
                  "echo \"vmtool-test: channel $dev\"\n"
                  "echo vmtool-channel-ok > $dev\n",
    "20-hog": "#!/bin/sh\n"
              "mkdir -p /mnt/hog && mount -t tmpfs -o size=950m tmpfs /mnt/hog\n"
              "echo 'vmtool-test: hogging'\n"
              "dd if=/dev/zero of=/mnt/hog/fill bs=1M count=900 2>/dev/null\n"
              "echo 'vmtool-test: survived the hog'\n",
}


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("guests")
    return {"hello": make_guest(d, "hello", HELLO), "hog": make_guest(d, "hog", HOG)}


def _domains(uri: str) -> list[str]:
    out = run(["virsh", "-c", uri, "list", "--all", "--name"]).stdout.decode()
    return [n for n in out.split() if n]


def _wait_vm_in_slot(slot: FakeSlot, proc: Popen[bytes], timeout: float = 60.0) -> tuple[Path, int]:
    """The VM's cgroup under the slot and the qemu pid in it, once it is there."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in slot.children():
            try:
                pids = (child / "cgroup.procs").read_text().split()
            except OSError:
                continue
            if pids:
                return child, int(pids[0])
        assert proc.poll() is None, "vmtool launch ended before the VM was in the slot"
        time.sleep(0.2)
    raise AssertionError("no VM cgroup with a process appeared under the slot")


def _launch_in_slot(slot: FakeSlot, args: list[str]) -> Popen[bytes]:
    cmd = f"{slot.enter_script()}; exec \"$@\""
    return spawn(["sh", "-c", cmd, "sh", sys.executable, "-m", "vmtool", "launch", *args],
                 stdout=PIPE, stderr=PIPE, stdin=DEVNULL)


def test_a_poweroff_in_slot_with_report(libvirt_uri: str, default_build: Path, fake_slot: FakeSlot,
                                        tmp_path: Path) -> None:
    # the build issue's `vmtool build` of the default disk (busybox root, Debian kernel)
    manifest = default_build / "manifest.json"
    img = default_build / json.loads(manifest.read_text())["rootfs"]["path"]
    ovl = overlay(img, tmp_path / "rootfs.qcow2")
    report = tmp_path / "report.json"
    proc = _launch_in_slot(fake_slot, ["--manifest", str(manifest), "--disk", str(ovl), "--sandbox", str(tmp_path),
                                       "--uri", libvirt_uri, "--memory", "512", "--timeout", "240",
                                       "--report", str(report), "--json"])
    vm_dir, pid = _wait_vm_in_slot(fake_slot, proc)
    name = vm_dir.name
    # qemu and every one of its threads: under <slot>/<vm name> in each hierarchy, not libvirt's /machine
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) > 1
    for tid in tasks:
        text = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
        for h in ("memory", "cpu", "cpuacct", "blkio", "pids", "freezer"):
            assert f":{h}:{fake_slot.rel}/{name}\n" in text, (tid, h, text)
    assert b"qemu-system-x86_64" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert name in _domains(libvirt_uri)
    limit = int((fake_slot.dirs["memory"] / name / "memory.limit_in_bytes").read_text())
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    data = json.loads(out)
    assert data == json.loads(report.read_text())
    assert data["exit_reason"] == "poweroff" and data["exit_code"] == 0 and data["name"] == name
    assert limit == data["memory_limit_mib"] << 20 and data["memory_mib"] == 512
    assert 1.0 < data["cpu_seconds"] < data["wall_seconds"] * 2.5
    assert 64 << 20 < data["peak_memory_bytes"] <= limit
    assert data["disk_read_bytes"] > 100_000 and data["disk_write_bytes"] is not None
    assert data["cgroup"].startswith(f"/sys/fs/cgroup/cpu{fake_slot.rel}/{name}")
    console = Path(data["console_log"]).read_text(errors="replace")
    assert Path(data["console_log"]).parent == tmp_path.resolve()
    assert "vmtool-guest: booted" in console and "reboot: Power down" in console
    # nothing left: no domain, no cgroup, qemu gone
    assert name not in _domains(libvirt_uri)
    assert fake_slot.children() == []
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_b_channel_then_memory_kill(libvirt_uri: str, guests: dict[str, tuple[Path, Path]], fake_slot: FakeSlot,
                                    tmp_path: Path) -> None:
    manifest, img = guests["hog"]
    ovl = overlay(img, tmp_path / "hog.qcow2")
    sock = tmp_path / "relay0.sock"
    # A 1 GiB guest in a 640 MiB cgroup (booting takes ~500 MiB under TCG): the hog's pages cross the limit.
    opts = RenderOptions(sandbox=tmp_path, boot=BootFiles.of(mf.load(manifest)), disks=(ovl,), memory_mib=1024,
                         memory_limit_mib=640, channels=((CHANNEL, sock),))
    spec = LaunchSpec(opts, uri=libvirt_uri, cgroup_parent=fake_slot.rel, timeout=240)
    with start(spec) as vm:
        assert vm.cgroup is not None and vm.pid > 0
        assert f":memory:{fake_slot.rel}/{vm.name}\n" in Path(f"/proc/{vm.pid}/cgroup").read_text()
        got = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            s.settimeout(120)
            while b"\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        assert got == b"vmtool-channel-ok\n"
        reason = vm.wait(240)
        assert reason is ExitReason.MEMORY, vm.detail
        assert "memory limit of 640 MiB" in vm.detail
        st = vm.stats()
        assert st.oom_kills >= 1 and st.peak_memory_bytes is not None and st.peak_memory_bytes <= 640 << 20
        name = vm.name
    console = vm.console_log.read_text(errors="replace")
    assert "vmtool-test: hogging" in console and "survived the hog" not in console
    # the host is fine: libvirtd answers, the slot is there and empty, the domain and cgroup are gone
    assert name not in _domains(libvirt_uri)
    assert fake_slot.dirs["memory"].is_dir() and fake_slot.children() == []
    assert ExitReason.MEMORY.exit_code == 5


def test_c_sigterm_during_boot(libvirt_uri: str, guests: dict[str, tuple[Path, Path]], fake_slot: FakeSlot,
                               tmp_path: Path) -> None:
    manifest, img = guests["hello"]
    ovl = overlay(img, tmp_path / "c.qcow2")
    report = tmp_path / "report.json"
    proc = _launch_in_slot(fake_slot, ["--manifest", str(manifest), "--disk", str(ovl), "--sandbox", str(tmp_path),
                                       "--uri", libvirt_uri, "--grace", "3", "--report", str(report)])
    vm_dir, pid = _wait_vm_in_slot(fake_slot, proc)
    time.sleep(1.0)  # the kernel is booting
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "signalled" and data["exit_code"] == 143
    assert "signalled" in out.decode()
    assert vm_dir.name not in _domains(libvirt_uri)
    assert fake_slot.children() == []
    assert Path(data["console_log"]).exists()


def test_d_sigkill_libvirt_destroys_the_vm(libvirt_uri: str, guests: dict[str, tuple[Path, Path]],
                                          fake_slot: FakeSlot, tmp_path: Path) -> None:
    """A hard kill of vmtool (HTCondor's last resort) leaves no VM running: the domain is started with
    AUTODESTROY, so libvirt destroys it when vmtool's connection goes away."""
    manifest, img = guests["hello"]
    ovl = overlay(img, tmp_path / "d.qcow2")
    proc = _launch_in_slot(fake_slot, ["--manifest", str(manifest), "--disk", str(ovl), "--sandbox", str(tmp_path),
                                       "--uri", libvirt_uri])
    vm_dir, pid = _wait_vm_in_slot(fake_slot, proc)
    proc.kill()
    proc.communicate(timeout=30)
    end = time.monotonic() + 20
    while vm_dir.name in _domains(libvirt_uri) and time.monotonic() < end:
        time.sleep(0.2)
    assert vm_dir.name not in _domains(libvirt_uri)
    end = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_e_timeout_and_qemu_crash(libvirt_uri: str, guests: dict[str, tuple[Path, Path]], fake_slot: FakeSlot,
                                  tmp_path: Path) -> None:
    """Two short boots: the timeout passes (exit 124), and qemu dies of a signal (exit 4, 'crashed')."""
    manifest, img = guests["hello"]
    report = tmp_path / "timeout.json"
    rc = run([sys.executable, "-m", "vmtool", "launch", "--manifest", str(manifest), "--disk",
              str(overlay(img, tmp_path / "e1.qcow2")), "--sandbox", str(tmp_path), "--uri", libvirt_uri,
              "--timeout", "3", "--grace", "1", "--cgroup-parent", fake_slot.rel, "--report", str(report)],
             check=False).returncode
    data = json.loads(report.read_text())
    assert rc == 124 and data["exit_reason"] == "timeout" and data["exit_code"] == 124
    assert 3.0 <= data["wall_seconds"] < 30 and fake_slot.children() == []
    assert data["name"] not in _domains(libvirt_uri)

    opts = RenderOptions(sandbox=tmp_path, boot=BootFiles.of(mf.load(manifest)),
                         disks=(overlay(img, tmp_path / "e2.qcow2"),))
    spec = LaunchSpec(opts, uri=libvirt_uri, cgroup_parent=fake_slot.rel, timeout=120)
    with start(spec) as vm:
        time.sleep(1.0)
        os.kill(vm.pid, signal.SIGSEGV)
        assert vm.wait(60) is ExitReason.CRASHED and ExitReason.CRASHED.exit_code == 4
        assert "crashed" in vm.detail or "killed" in vm.detail
        name = vm.name
    assert name not in _domains(libvirt_uri) and fake_slot.children() == []
