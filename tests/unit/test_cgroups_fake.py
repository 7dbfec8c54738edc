"""vmtool.launch.cgroups on fake cgroup trees (real directories and files under tmp_path).

The kernel's cgroupfs makes interface files appear in a new directory and vanish with it; a fake tree
cannot, so the tests create the files a kernel would show where vmtool reads them, and delete the
regular files before vmtool's rmdir (what the kernel does by itself).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmtool.errors import CgroupError
from vmtool.launch import cgroups

pytestmark = pytest.mark.unit

V1_PROC = """12:freezer:/htcondor/slot1
11:pids:/htcondor/slot1
8:blkio:/htcondor/slot1
4:memory:/htcondor/slot1
3:cpuset:/
2:cpuacct:/htcondor/slot1
1:cpu:/htcondor/slot1
0::/
"""


def _fake_proc(tmp: Path, self_text: str, pid: int = 0, threads: dict[int, str] | None = None) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(self_text)
    for tid, text in (threads or {}).items():
        d = proc / str(pid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "cgroup").write_text(text)
    return proc


def _v1_tree(tmp: Path) -> Path:
    root = tmp / "cgroup"
    for c in ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer", "cpuset"):
        slot = root / c / "htcondor" / "slot1"
        slot.mkdir(parents=True)
        (slot / "cgroup.procs").write_text("")
    (root / "memory/htcondor/slot1/memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory/htcondor/slot1/memory.move_charge_at_immigrate").write_text("0\n")
    return root


def _kernel_rmdir(cg: cgroups.VMCgroup) -> None:
    for d in cg.dirs.values():
        for f in d.iterdir():
            f.unlink()


def test_parse_proc_cgroup() -> None:
    v1, v2 = cgroups.parse_proc_cgroup(V1_PROC + "9:name=systemd:/x\n5:cpu,cpuacct:/both\n")
    assert v1["memory"] == "/htcondor/slot1" and v1["cpuset"] == "/" and v2 == "/"
    assert v1["cpu"] == "/both" and "name=systemd" not in v1


def test_v1_create_limits_move_usage_remove(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path)
    want = "\n".join(f"{n}:{c}:/htcondor/slot1/vm1" for n, c in
                     ((12, "freezer"), (11, "pids"), (8, "blkio"), (4, "memory"), (2, "cpuacct"), (1, "cpu")))
    proc = _fake_proc(tmp_path, V1_PROC, 4242, {4242: want + "\n3:cpuset:/machine\n", 4243: want})
    layout = cgroups.detect(root=root, proc=proc)
    assert layout.version == 1 and layout.slot["memory"] == root / "memory/htcondor/slot1"
    assert "cpuset" not in layout.slot
    cg = cgroups.create("vm1", memory_bytes=512 << 20, cpus=2, layout=layout)
    mem = root / "memory/htcondor/slot1/vm1"
    assert (mem / "memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(512 << 20)
    assert (mem / "memory.move_charge_at_immigrate").read_text() == "3"
    assert (root / "cpu/htcondor/slot1/vm1/cpu.shares").read_text() == "2048"
    cg.add_pid(4242, proc=proc)
    for c in ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer"):
        assert (root / c / "htcondor/slot1/vm1/cgroup.procs").read_text() == "4242"
    assert cg.procs() == [4242]
    (mem / "memory.max_usage_in_bytes").write_text("123456789\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (root / "cpuacct/htcondor/slot1/vm1/cpuacct.usage").write_text("2500000000\n")
    assert cg.peak_memory() == 123456789 and cg.oom_kills() == 1 and cg.cpu_seconds() == 2.5
    _kernel_rmdir(cg)
    cg.remove()
    assert not any((root / c / "htcondor/slot1/vm1").exists() for c in cgroups.V1_CONTROLLERS)


def test_v1_misplaced_thread_is_an_error(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path)
    good = "4:memory:/htcondor/slot1/vm2\n1:cpu:/htcondor/slot1/vm2\n2:cpuacct:/htcondor/slot1/vm2\n" \
           "8:blkio:/htcondor/slot1/vm2\n11:pids:/htcondor/slot1/vm2\n12:freezer:/htcondor/slot1/vm2\n"
    bad = good.replace("1:cpu:/htcondor/slot1/vm2", "1:cpu:/machine/qemu-1-vm2.libvirt-qemu/vcpu0")
    proc = _fake_proc(tmp_path, V1_PROC, 77, {77: good, 78: bad})
    cg = cgroups.create("vm2", memory_bytes=1 << 30, cpus=1, root=root, proc=proc)
    with pytest.raises(CgroupError, match=r"thread 78 cpu:/machine/qemu-1-vm2"):
        cg.add_pid(77, proc=proc)
    _kernel_rmdir(cg)
    cg.remove()


def test_v1_parent_override_and_missing_slot(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path)
    proc = _fake_proc(tmp_path, V1_PROC)
    layout = cgroups.detect(root=root, proc=proc, parent="/elsewhere")
    assert layout.slot["cpu"] == root / "cpu/elsewhere"
    with pytest.raises(CgroupError, match="does not exist"):
        cgroups.create("vm3", memory_bytes=1 << 30, cpus=1, layout=layout)
    assert not (root / "cpu/elsewhere").exists()


def test_v1_existing_name_refused_nothing_left(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path)
    proc = _fake_proc(tmp_path, V1_PROC)
    (root / "memory/htcondor/slot1/dup").mkdir()
    with pytest.raises(CgroupError, match="already exists"):
        cgroups.create("dup", memory_bytes=1 << 30, cpus=1, root=root, proc=proc)
    # the directories made before the clash are gone again
    assert not (root / "cpu/htcondor/slot1/dup").exists()
    assert not (root / "cpuacct/htcondor/slot1/dup").exists()


def test_v1_without_memory_hierarchy(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    proc = _fake_proc(tmp_path, "1:cpu:/\n0::/\n")
    with pytest.raises(CgroupError, match="no cgroup v1 hierarchy for memory"):
        cgroups.detect(root=root, proc=proc)


def _v2_tree(tmp: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    root = tmp / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    scope = root / "system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn.slice"
    (scope / "_var_lib_condor_execute_slot1_1@wn.scope").mkdir(parents=True)
    (scope / "cgroup.controllers").write_text(controllers + "\n")
    (scope / "cgroup.subtree_control").write_text("memory pids\n")
    (scope / "memory.swap.max").write_text("0\n")
    return root


V2_SELF = "0::/system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn.slice/" \
          "_var_lib_condor_execute_slot1_1@wn.scope\n"


def test_v2_htcondor_slice(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    slice_ = root / "system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn.slice"
    rel = "/" + str((slice_ / "vm1").relative_to(root))
    proc = _fake_proc(tmp_path, V2_SELF, 99, {99: f"0::{rel}\n", 100: f"0::{rel}\n"})
    layout = cgroups.detect(root=root, proc=proc)
    assert layout.version == 2 and layout.slot["unified"] == slice_  # the .slice, not the .scope
    cg = cgroups.create("vm1", memory_bytes=3 << 30, cpus=3, layout=layout)
    d = slice_ / "vm1"
    # controllers handed down to the children (fake file: what was written)
    assert (slice_ / "cgroup.subtree_control").read_text() == "+cpu +io"
    assert (d / "memory.max").read_text() == str(3 << 30)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "memory.oom.group").read_text() == "1"
    assert (d / "cpu.weight").read_text() == "300"
    cg.add_pid(99, proc=proc)
    assert (d / "cgroup.procs").read_text() == "99"
    assert cg.expected() == {"": rel}
    (d / "memory.peak").write_text("987654321\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n")
    assert cg.peak_memory() == 987654321 and cg.cpu_seconds() == 1.5 and cg.oom_kills() == 1
    _kernel_rmdir(cg)
    cg.remove()
    assert not d.exists()


def test_v2_without_memory_controller(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path, controllers="hugetlb")
    proc = _fake_proc(tmp_path, V2_SELF)
    with pytest.raises(CgroupError, match=r"has no memory controller \(available: hugetlb\)"):
        cgroups.create("vm1", memory_bytes=1 << 30, cpus=1, root=root, proc=proc)


def test_invalid_names(tmp_path: Path) -> None:
    for bad in ("", "..", "a/b"):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            cgroups.create(bad, memory_bytes=1, cpus=1, root=tmp_path, proc=tmp_path)
