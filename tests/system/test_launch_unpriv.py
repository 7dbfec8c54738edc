"""`vmtool launch` as an ordinary job user in a root-owned cgroup v1 slot (the way HTCondor runs a job),
with no flags: qemu:///session through vmtool's private libvirtd, qemu inherits the slot's cgroup.

- A: boot to poweroff with two --append words and a quoted value: exit 0, cgroup_mode inherited, the
  guest's /proc/cmdline shows `a=1 b` and `msg="x y"`, qemu and the daemon ran in the slot; nothing left.
- B: a guest that touches more than the VM's memory limit: exit 5 (vmtool destroyed it), no kernel OOM
  kill in the slot (which HTCondor would turn into a hold).
- C: SIGTERM during the run: exit 143, no process of the user and no session directory left.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.libvirtd import make_guest
from tests.fixtures.slotuser import JobSlot, shared_dir, world_readable
from vmtool.run import run

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

CMDLINE = {"10-cmdline": "#!/bin/sh\necho \"vmtool-test: cmdline $(cat /proc/cmdline)\"\n"}
SLEEPY = {"10-sleep": "#!/bin/sh\necho 'vmtool-test: sleeping'\nsleep 600\n"}
HOG = {"10-hog": "#!/bin/sh\n"
                 "mkdir -p /mnt/hog && mount -t tmpfs -o size=950m tmpfs /mnt/hog\n"
                 "echo 'vmtool-test: hogging'\n"
                 "dd if=/dev/zero of=/mnt/hog/fill bs=1M count=900 2>/dev/null\n"
                 "echo 'vmtool-test: survived the hog'\n"}


@pytest.fixture(scope="module")
def guests() -> dict[str, tuple[Path, Path]]:
    d = shared_dir("vmtool-unpriv-guests-")
    out = {n: make_guest(d, n, rc) for n, rc in (("cmdline", CMDLINE), ("sleepy", SLEEPY), ("hog", HOG))}
    world_readable(d, *d.iterdir())
    yield out
    run(["rm", "-rf", str(d)])


def _overlay(slot: JobSlot, base: Path) -> Path:
    ovl = slot.sandbox / "root.qcow2"
    p = slot.spawn(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(ovl)])
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    return ovl


def _session_dirs(uid: int) -> list[Path]:
    return [p for p in Path("/tmp").glob("vmtool-session-*") if p.lstat().st_uid == uid]


def _qemu_of(slot: JobSlot, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid, cmd in slot.procs_of_user():
            if "qemu-system" in cmd:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no qemu of {slot.user.pw_name} appeared")


def _nothing_left(slot: JobSlot) -> None:
    end = time.monotonic() + 10
    while slot.procs_of_user() and time.monotonic() < end:
        time.sleep(0.2)  # PID 1 reaps the daemonized qemu a little later
    assert slot.procs_of_user() == []
    assert _session_dirs(slot.user.pw_uid) == []
    assert slot.children() == []


def test_a_launch_as_job_user_inherits_the_slot(guests: dict[str, tuple[Path, Path]], job_slot: JobSlot) -> None:
    manifest, img = guests["cmdline"]
    ovl = _overlay(job_slot, img)
    proc = job_slot.vmtool("launch", "--manifest", str(manifest), "--disk", str(ovl), "--timeout", "300",
                           "--append", "a=1 b", "--append", 'msg="x y"', "--report", "vm-report.json", "--json")
    qemu = _qemu_of(job_slot)
    for pid, cmd in job_slot.procs_of_user():
        if "qemu-system" in cmd or "libvirtd" in cmd:
            assert f":memory:{job_slot.rel}\n" in Path(f"/proc/{pid}/cgroup").read_text(), cmd
    assert os.stat(f"/proc/{qemu}").st_uid == job_slot.user.pw_uid
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()
    data = json.loads(out)
    assert data == json.loads((job_slot.sandbox / "vm-report.json").read_text())
    assert data["exit_reason"] == "poweroff" and data["cgroup_mode"] == "inherited", data
    assert data["uri"] == "qemu:///session" and data["cgroup"] is None
    # the guest was sized inside the slot's 1536 MiB with room for vmtool and the daemon
    assert data["memory_limit_mib"] + 64 <= 1536 and data["slot"]["memory_mib"] < 1536
    assert 0 < data["peak_memory_bytes"] <= data["memory_limit_mib"] << 20
    console = Path(data["console_log"]).read_text(errors="replace")
    line = next(ln for ln in console.splitlines() if "vmtool-test: cmdline" in ln)
    assert " a=1 b " in line + " " and 'msg="x y"' in line and "'" not in line, line
    _nothing_left(job_slot)


def test_b_memory_exceeded_is_exit_5_not_a_slot_oom(guests: dict[str, tuple[Path, Path]],
                                                    job_slot: JobSlot) -> None:
    manifest, img = guests["hog"]
    ovl = _overlay(job_slot, img)
    ooms = job_slot.oom_kills()
    proc = job_slot.vmtool("launch", "--manifest", str(manifest), "--disk", str(ovl), "--timeout", "300",
                           "--memory", "1024", "--memory-limit", "700", "--report", "vm-report.json")
    _out, err = proc.communicate(timeout=400)
    data = json.loads((job_slot.sandbox / "vm-report.json").read_text())
    assert proc.returncode == 5, (err.decode(), data)
    assert data["exit_reason"] == "memory" and "memory limit of 700 MiB" in data["detail"], data
    assert data["cgroup_mode"] == "inherited"
    assert "vmtool-test: hogging" in Path(data["console_log"]).read_text(errors="replace"), data
    assert job_slot.oom_kills() == ooms  # the slot never ran out: nothing for HTCondor to hold the job for
    _nothing_left(job_slot)


def test_c_sigterm_leaves_nothing(guests: dict[str, tuple[Path, Path]], job_slot: JobSlot) -> None:
    manifest, img = guests["sleepy"]
    ovl = _overlay(job_slot, img)
    proc = job_slot.vmtool("launch", "--manifest", str(manifest), "--disk", str(ovl), "--timeout", "300",
                           "--grace", "5", "--report", "vm-report.json")
    _qemu_of(job_slot)
    assert _session_dirs(job_slot.user.pw_uid)
    proc.send_signal(signal.SIGTERM)  # sh exec'd setpriv, env and python: this pid is vmtool
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    data = json.loads((job_slot.sandbox / "vm-report.json").read_text())
    assert data["exit_reason"] == "signalled" and data["cgroup_mode"] == "inherited"
    _nothing_left(job_slot)
