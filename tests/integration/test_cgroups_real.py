"""vmtool.launch.cgroups on this host's real cgroup trees (v1 here; v2 where the host has one)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.libvirtd import FakeSlot
from vmtool.launch import cgroups
from vmtool.run import PIPE, spawn

pytestmark = pytest.mark.integration

THREADS = "import threading, time\n" \
          "for _ in range(4): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n" \
          "print('ready', flush=True)\ntime.sleep(60)\n"


def test_v1_move_all_threads_account_and_remove(fake_slot: FakeSlot) -> None:
    cg = cgroups.create("vm-threads", memory_bytes=256 << 20, cpus=2, parent=fake_slot.rel)
    proc = spawn([sys.executable, "-c", THREADS], stdout=PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 5
        cg.add_pid(proc.pid)  # raises if any thread stayed behind
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            text = Path(f"/proc/{proc.pid}/task/{tid}/cgroup").read_text()
            assert f":memory:{fake_slot.rel}/vm-threads\n" in text and f":cpu:{fake_slot.rel}/vm-threads\n" in text
        mem = fake_slot.dirs["memory"] / "vm-threads"
        assert int((mem / "memory.limit_in_bytes").read_text()) == 256 << 20
        assert (fake_slot.dirs["cpu"] / "vm-threads" / "cpu.shares").read_text().strip() == "2048"
        assert cg.procs() == [proc.pid]
        assert cg.memory_now() is not None and cg.cpu_seconds() is not None and cg.oom_kills() == 0
        # removal with the process still inside moves it to the slot first
        cg.remove()
        assert not mem.exists()
        assert str(proc.pid) in (fake_slot.dirs["memory"] / "cgroup.procs").read_text().split()
    finally:
        proc.kill()
        proc.wait()


def test_v1_memory_limit_kills_and_is_counted(fake_slot: FakeSlot) -> None:
    cg = cgroups.create("vm-hog", memory_bytes=64 << 20, cpus=1, parent=fake_slot.rel)
    hog = spawn([sys.executable, "-c", "import sys, time\nsys.stdin.read(1)\nx = b'x' * (400 << 20)\n"
                 "time.sleep(5)\n"], stdin=PIPE)
    try:
        cg.add_pid(hog.pid)
        assert hog.stdin is not None
        hog.stdin.write(b"g")
        hog.stdin.close()
        assert hog.wait(30) == -signal.SIGKILL
        time.sleep(0.2)
        assert cg.oom_kills() >= 1
        peak = cg.peak_memory()
        assert peak is not None and 32 << 20 < peak <= 64 << 20
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()
        cg.remove()
    # this process is fine: it was never in that group
    assert Path("/proc/self/status").exists()


def _real_v2_root() -> Path | None:
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


def test_v2_real_tree() -> None:
    root = _real_v2_root()
    if root is None:
        found = Path("/sys/fs/cgroup/unified/cgroup.controllers")
        have = found.read_text().split() if found.exists() else []
        pytest.skip("this host has no cgroup v2 tree with the memory controller "
                    f"(/sys/fs/cgroup/unified offers only: {' '.join(have) or 'nothing'}); "
                    "the v2 logic is covered on fake trees in tests/unit/test_cgroups_fake.py")
    # A delegated parent of our own, so the no-internal-processes rule holds.
    parent = root / f"vmtool-test-v2-{os.getpid()}"
    parent.mkdir()
    try:
        (parent / "cgroup.subtree_control").write_text("+memory")
        rel = "/" + parent.name
        cg = cgroups.create("vm", memory_bytes=128 << 20, cpus=1, root=root, parent=rel,
                            layout=cgroups.CgroupLayout(2, {"unified": parent}, root))
        proc = spawn([sys.executable, "-c", THREADS], stdout=PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            cg.add_pid(proc.pid)
            assert (parent / "vm" / "memory.max").read_text().strip() == str(128 << 20)
        finally:
            proc.kill()
            proc.wait()
            cg.remove()
    finally:
        parent.rmdir()
