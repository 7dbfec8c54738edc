"""The VM's cgroup: a child of the job's (slot's) cgroup, on cgroup v1 or v2. The only writer of
/sys/fs/cgroup in vmtool.

libvirt starts qemu in its own `/machine/...` groups, outside the job; vmtool creates `<slot>/<vm name>`
(v1: in each of the cpu, cpuacct, memory, blkio, pids and freezer hierarchies; v2: in the unified tree),
sets the memory limit and CPU weight there, and moves qemu (the whole thread group) into it. Usage is
read from it while the VM runs and after it ended; afterwards the group is removed.

The slot's cgroup is the job's own: v1, the path of each hierarchy in /proc/self/cgroup; v2, the
unified path, or its parent when that is a `.scope` (HTCondor puts the job in `<slot>.slice/<slot>.scope`
and delegates the `.slice`, see htcondor.md section 3). Every function takes the cgroup root and /proc
as parameters so the logic runs on fake trees in tests.

Which of the four modes a launch uses (`choose_mode`, reported as `cgroup_mode`):
- moved: root creates the VM's group under the slot's and moves qemu there (any layout, v1 or v2);
- delegated: a non-root job that really owns a cgroup v2 subtree (HTCondor >= 24.8.1 puts the job in
  `<slot>.slice/<slot>.scope` and chowns the `.slice` and its subtree_control to the job user) does
  the same under that `.slice`; detected from the tree, never assumed from a version;
- inherited: anywhere else (v1, where HTCondor never delegates; v2 with the job in a leaf) qemu is a
  descendant of the job (the private session daemon forks it) and stays in the job's cgroup; vmtool
  writes nothing there and only reads the slot's limit and OOM counter (`SlotCgroup`);
- none: --no-cgroup.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmtool.errors import CgroupError

ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
V1_REQUIRED = ("memory", "cpu")
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")
V2_REQUIRED = ("memory",)


@dataclass(frozen=True)
class Layout:
    """Where the slot's cgroup is. version 1: controller -> directory; version 2: 'unified' -> directory."""

    version: int
    slot: dict[str, Path]
    root: Path = ROOT

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 {self.slot['unified']}"
        return "cgroup v1 " + ", ".join(f"{c}:{p}" for c, p in sorted(self.slot.items()))


def _read(p: Path) -> str:
    return p.read_text().strip()


def _write(p: Path, value: str) -> None:
    try:
        with open(p, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {p}: {e.strerror}",
                          hint="the job's cgroup is not writable by this user; run with --no-cgroup to skip it") \
            from None


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """(v1 controller -> path, v2 unified path or None) from the text of /proc/PID/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _id, ctrls, path = parts
        if ctrls == "":
            v2 = path
            continue
        for c in ctrls.split(","):
            if not c.startswith("name="):
                v1[c] = path
    return v1, v2


def _v1_dir(root: Path, ctrl: str, proc_text: str) -> Path | None:
    """The mount directory of the v1 hierarchy holding `ctrl` (cpu or cpu,cpuacct ...)."""
    for line in proc_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and ctrl in parts[1].split(","):
            for cand in (root / parts[1], root / ctrl):
                if cand.is_dir():
                    return cand
    return None


def detect(
    *, root: Path = ROOT, proc: Path = PROC, pid: int | str = "self", parent: str | None = None
) -> Layout:
    """The slot's cgroup for this process (or `parent`, a path relative to each hierarchy's root)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {proc}/{pid}/cgroup: {e.strerror}") from None
    v1, v2 = parse_proc_cgroup(text)
    if (root / "cgroup.controllers").exists():
        path = parent if parent is not None else (v2 or "/")
        p = root / path.lstrip("/")
        if parent is None and p.name.endswith(".scope"):
            p = p.parent  # HTCondor's job is in <slot>.slice/<slot>.scope; the .slice is delegated
        return Layout(2, {"unified": p}, root)
    slot: dict[str, Path] = {}
    for c in V1_CONTROLLERS:
        if c not in v1:
            continue
        d = _v1_dir(root, c, text)
        if d is None:
            continue
        rel = parent if parent is not None else v1[c]
        slot[c] = d / rel.lstrip("/")
    missing = [c for c in V1_REQUIRED if c not in slot]
    if missing:
        raise CgroupError(f"no cgroup v1 hierarchy for {', '.join(missing)} under {root} and no cgroup v2 tree",
                          hint="mount the cgroup controllers, or run with --no-cgroup")
    return Layout(1, slot, root)


@dataclass
class VMCgroup:
    """The VM's own group: one directory per v1 hierarchy, or one in the v2 tree."""

    layout: Layout
    name: str
    dirs: dict[str, Path] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.layout.version

    def path(self, ctrl: str = "memory") -> Path:
        return self.dirs["unified"] if self.version == 2 else self.dirs[ctrl]

    # -- limits ---------------------------------------------------------------------------------------

    def set_limits(self, memory_bytes: int, cpus: int) -> None:
        # Which knobs exist is read from the slot (the parent): a child has the same interface files.
        if self.version == 2:
            d = self.dirs["unified"]
            enabled = {c.lstrip("+") for c in _read(d.parent / "cgroup.subtree_control").split()}
            _write(d / "memory.max", str(memory_bytes))
            if (d.parent / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")  # as HTCondor's DISABLE_SWAP_FOR_JOB
            try:
                _write(d / "memory.oom.group", "1")  # an OOM kill takes the whole VM, not one thread
            except CgroupError:
                pass  # kernels before 4.19 lack it; qemu is one process anyway
            if "cpu" in enabled:
                _write(d / "cpu.weight", str(min(10000, max(1, 100 * cpus))))
            return
        mem = self.dirs["memory"]
        # move_charge_at_immigrate: charges of pages qemu touched before the move follow it here.
        if (mem.parent / "memory.move_charge_at_immigrate").exists():
            try:
                _write(mem / "memory.move_charge_at_immigrate", "3")
            except CgroupError:
                pass  # deprecated on newer kernels; the guest's RAM is touched after the move anyway
        _write(mem / "memory.limit_in_bytes", str(memory_bytes))
        if (mem.parent / "memory.memsw.limit_in_bytes").exists():
            _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
        if "cpu" in self.dirs:
            _write(self.dirs["cpu"] / "cpu.shares", str(min(262144, max(2, 1024 * cpus))))

    # -- processes ------------------------------------------------------------------------------------

    def add_pid(self, pid: int, *, proc: Path = PROC) -> None:
        """Move a whole process (every thread) into the group and check that each thread is there."""
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))
        self.pids.append(pid)
        bad = self.misplaced_threads(pid, proc=proc)
        if bad:
            raise CgroupError(f"threads of pid {pid} are not in {self.describe()}: {', '.join(bad[:5])}",
                              hint="another manager (libvirt, systemd) moved them back")

    def expected(self) -> dict[str, str]:
        """controller (or '' for v2) -> the path /proc/PID/cgroup should show."""
        root = self.layout.root
        if self.version == 2:
            return {"": "/" + str(self.dirs["unified"].relative_to(root))}
        out = {}
        for c, d in self.dirs.items():
            hier = d.relative_to(root).parts[0]
            out[c] = "/" + str(d.relative_to(root / hier))
        return out

    def misplaced_threads(self, pid: int, *, proc: Path = PROC) -> list[str]:
        want = self.expected()
        bad: list[str] = []
        try:
            tids = os.listdir(proc / str(pid) / "task")
        except OSError as e:
            raise CgroupError(f"cannot list the threads of pid {pid}: {e.strerror}") from None
        for tid in tids:
            try:
                v1, v2 = parse_proc_cgroup((proc / str(pid) / "task" / tid / "cgroup").read_text())
            except OSError:
                continue  # the thread ended
            for c, path in want.items():
                got = v2 if c == "" else v1.get(c)
                if got != path:
                    bad.append(f"thread {tid} {c or 'unified'}:{got}")
        return bad

    def procs(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            try:
                out.update(int(x) for x in _read(d / "cgroup.procs").split())
            except (OSError, ValueError):
                pass
        return sorted(out)

    # -- usage ----------------------------------------------------------------------------------------

    def _int(self, p: Path) -> int | None:
        try:
            return int(_read(p))
        except (OSError, ValueError):
            return None

    def _keyed(self, p: Path, key: str) -> int | None:
        try:
            for line in p.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except (OSError, ValueError):
            return None
        return None

    def peak_memory(self) -> int | None:
        if self.version == 2:
            return self._int(self.dirs["unified"] / "memory.peak")
        return self._int(self.dirs["memory"] / "memory.max_usage_in_bytes")

    def memory_now(self) -> int | None:
        if self.version == 2:
            return self._int(self.dirs["unified"] / "memory.current")
        return self._int(self.dirs["memory"] / "memory.usage_in_bytes")

    def cpu_seconds(self) -> float | None:
        if self.version == 2:
            us = self._keyed(self.dirs["unified"] / "cpu.stat", "usage_usec")
            return None if us is None else us / 1e6
        if "cpuacct" not in self.dirs:
            return None
        ns = self._int(self.dirs["cpuacct"] / "cpuacct.usage")
        return None if ns is None else ns / 1e9

    def oom_kills(self) -> int:
        if self.version == 2:
            return self._keyed(self.dirs["unified"] / "memory.events", "oom_kill") or 0
        return self._keyed(self.dirs["memory"] / "memory.oom_control", "oom_kill") or 0

    def describe(self) -> str:
        if self.version == 2:
            return str(self.dirs["unified"])
        return ", ".join(str(d) for d in self.dirs.values())

    # -- removal --------------------------------------------------------------------------------------

    def remove(self, *, wait: float = 5.0) -> None:
        """Move what is left to the slot's group, then remove every directory this group made."""
        deadline = time.monotonic() + wait
        for key, d in list(self.dirs.items()):
            parent = d.parent
            while d.exists():
                try:
                    left = _read(d / "cgroup.procs").split()
                except OSError:
                    left = []
                for pid in left:
                    try:
                        _write(parent / "cgroup.procs", pid)
                    except CgroupError:
                        pass  # exiting right now
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}",
                                          hint="a process is still in it; kill it and remove the directory") \
                            from None
                    time.sleep(0.05)
            del self.dirs[key]


def _v2_enable(slot: Path) -> None:
    """Make sure the slot hands the controllers vmtool needs to its children."""
    try:
        have = set(_read(slot / "cgroup.subtree_control").split())
        avail = set(_read(slot / "cgroup.controllers").split())
    except OSError as e:
        raise CgroupError(f"cannot read the controllers of {slot}: {e.strerror}",
                          hint="the job's cgroup v2 tree is not delegated; run with --no-cgroup") from None
    missing_req = [c for c in V2_REQUIRED if c not in avail]
    if missing_req:
        raise CgroupError(f"cgroup v2 {slot} has no {', '.join(missing_req)} controller "
                          f"(available: {' '.join(sorted(avail)) or 'none'})",
                          hint="the batch system must delegate the memory controller; or run with --no-cgroup")
    want = [c for c in V2_CONTROLLERS if c in avail and c not in have]
    if want:
        try:
            with open(slot / "cgroup.subtree_control", "w") as f:
                f.write(" ".join(f"+{c}" for c in want))
        except OSError as e:
            req = [c for c in want if c in V2_REQUIRED]
            if req:
                why = "it holds processes itself (cgroup v2's no-internal-processes rule)" \
                    if e.errno == errno.EBUSY else e.strerror
                raise CgroupError(f"cannot enable {' '.join(req)} for children of {slot}: {why}",
                                  hint="run vmtool from a delegated cgroup (HTCondor's .scope), "
                                       "or run with --no-cgroup") from None


def create(name: str, *, memory_bytes: int, cpus: int, layout: Layout | None = None,
           root: Path = ROOT, proc: Path = PROC, parent: str | None = None) -> VMCgroup:
    """Create `<slot>/<name>` with limits; on any failure nothing is left behind."""
    if not name or "/" in name or name in (".", ".."):
        raise CgroupError(f"invalid cgroup name {name!r}")
    layout = layout or detect(root=root, proc=proc, parent=parent)
    cg = VMCgroup(layout, name)
    try:
        if layout.version == 2:
            slot = layout.slot["unified"]
            _v2_enable(slot)
            targets = {"unified": slot / name}
        else:
            targets = {c: d / name for c, d in layout.slot.items()}
        for key, d in targets.items():
            if not d.parent.is_dir():
                raise CgroupError(f"the slot's cgroup {d.parent} does not exist",
                                  hint="give an existing --cgroup-parent, or run with --no-cgroup")
            try:
                d.mkdir()
            except FileExistsError:
                raise CgroupError(f"cgroup {d} already exists (another VM with the same name?)",
                                  hint="give the VM another --name") from None
            except OSError as e:
                raise CgroupError(f"cannot create cgroup {d}: {e.strerror}",
                                  hint="the job's cgroup is not delegated to this user; run with --no-cgroup") \
                    from None
            cg.dirs[key] = d
        cg.set_limits(memory_bytes, cpus)
    except BaseException:
        try:
            cg.remove(wait=1.0)
        except CgroupError:
            pass
        raise
    return cg


UNLIMITED = 1 << 60


def delegated_slot(*, root: Path = ROOT, proc: Path = PROC, pid: int | str = "self") -> Path | None:
    """The cgroup v2 subtree this (non-root) job owns and may create VM groups in, or None.

    Only the parent of a `.scope` qualifies (a job directly in a leaf cannot enable controllers for
    children: no-internal-processes rule), and only when this user may write its cgroup.procs and
    cgroup.subtree_control and it offers the memory controller."""
    if not (root / "cgroup.controllers").exists():
        return None
    try:
        _v1, v2 = parse_proc_cgroup((proc / str(pid) / "cgroup").read_text())
    except OSError:
        return None
    if not v2:
        return None
    me = root / v2.lstrip("/")
    if not me.name.endswith(".scope"):
        return None
    slot = me.parent
    if slot == root or not all(os.access(p, os.W_OK) for p in
                               (slot, slot / "cgroup.procs", slot / "cgroup.subtree_control")):
        return None
    try:
        avail = set(_read(slot / "cgroup.controllers").split())
    except OSError:
        return None
    return slot if set(V2_REQUIRED) <= avail else None


def choose_mode(*, use_cgroup: bool, parent: str | None, root: Path = ROOT, proc: Path = PROC) -> tuple[str, str | None]:
    """(cgroup_mode, parent for create()) for this process: see the module docstring."""
    if not use_cgroup:
        return "none", None
    if os.geteuid() == 0:
        return "moved", parent
    if parent is not None:
        layout = detect(root=root, proc=proc, parent=parent)
        for d in layout.slot.values():
            if not os.access(d, os.W_OK):
                import pwd

                user = pwd.getpwuid(os.geteuid()).pw_name
                raise CgroupError(f"the slot cgroup {d} (--cgroup-parent) is not writable by {user}",
                                  hint="the batch system must delegate it to the job user (HTCondor >= 24.8.1 "
                                       "on cgroup v2 does); or leave --cgroup-parent out and the VM stays in "
                                       "the job's own cgroup")
        return "delegated", parent
    slot = delegated_slot(root=root, proc=proc)
    if slot is not None:
        return "delegated", "/" + str(slot.relative_to(root))
    return "inherited", None


@dataclass(frozen=True)
class SlotCgroup:
    """The job's own cgroup, read only: its memory limit and how often the kernel OOM-killed in it."""

    layout: Layout

    @classmethod
    def of_self(cls, *, root: Path = ROOT, proc: Path = PROC) -> SlotCgroup | None:
        try:
            return cls(detect(root=root, proc=proc))
        except CgroupError:
            return None

    def memory_limit(self) -> int | None:
        """The tightest memory limit over the slot and its ancestors (bytes), None if unlimited."""
        if self.layout.version == 2:
            best = UNLIMITED
            d = self.layout.slot["unified"]
            while d != self.layout.root and self.layout.root in d.parents:
                try:
                    v = _read(d / "memory.max")
                    if v != "max":
                        best = min(best, int(v))
                except (OSError, ValueError):
                    pass
                d = d.parent
            return None if best >= UNLIMITED else best
        mem = self.layout.slot.get("memory")
        if mem is None:
            return None
        try:
            for line in (mem / "memory.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "hierarchical_memory_limit":
                    n = int(v)
                    return None if n >= UNLIMITED else n
            n = int(_read(mem / "memory.limit_in_bytes"))
            return None if n >= UNLIMITED else n
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        try:
            if self.layout.version == 2:
                text = (self.layout.slot["unified"] / "memory.events").read_text()
            else:
                text = (self.layout.slot["memory"] / "memory.oom_control").read_text()
        except (OSError, KeyError):
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                try:
                    return int(v)
                except ValueError:
                    return 0
        return 0

    def describe(self) -> str:
        return self.layout.describe()
