"""Start a rendered domain through libvirt, keep qemu in the slot's cgroup, wait, account, clean up.

The domain is transient and started paused, qemu is moved into the VM's cgroup (every thread, checked
through /proc/PID/task/*/cgroup), then resumed, so nothing the guest does is charged outside the slot.
`RunningVM.close()` (also on leaving `with start(spec)`) destroys the domain if it still runs, waits for
qemu to be gone and removes the cgroup, whatever happened before.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vmtool.domain.model import Domain
from vmtool.domain.policy import Rendered, RenderOptions, render
from vmtool.domain.slot import Slot, discover_slot
from vmtool.errors import CgroupError, LaunchError, VmtoolError
from vmtool.launch import cgroups
from vmtool.launch.host import HostFacts
from vmtool.launch.libvirtconn import connect, libvirt_module, unwatch_lifecycle, watch_lifecycle

log = logging.getLogger("vmtool.launch")

POLL_SECONDS = 1.0
DEFAULT_URI = "qemu:///system"


class ExitReason(enum.Enum):
    """How the VM ended; `exit_code` is what `vmtool launch` exits with (docs/launch.md)."""

    POWEROFF = ("poweroff", 0)
    CRASHED = ("crashed", 4)
    MEMORY = ("memory", 5)
    TIMEOUT = ("timeout", 124)
    SIGNALLED = ("signalled", 143)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def exit_code(self) -> int:
        return self.value[1]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to run one VM: the domain to render, and how to run it (see vmtool.launch)."""

    render: RenderOptions
    domain_xml: Path | None = None
    timeout: float | None = None
    uri: str = DEFAULT_URI
    use_cgroup: bool = True
    cgroup_parent: str | None = None
    machine_ad: Path | None = None
    grace: float = 30.0


@dataclass
class VMStats:
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    oom_kills: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("cpu_seconds", "peak_memory_bytes", "disk_read_bytes",
                                              "disk_write_bytes", "net_rx_bytes", "net_tx_bytes", "oom_kills")}


@dataclass
class LaunchReport:
    name: str
    reason: ExitReason
    detail: str
    wall_seconds: float
    stats: VMStats
    console_log: Path
    cgroup: str | None
    accel: str
    cpus: int
    memory_mib: int
    memory_limit_mib: int
    slot: Slot
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.reason.exit_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exit_reason": self.reason.label,
            "exit_code": self.exit_code,
            "detail": self.detail,
            "wall_seconds": round(self.wall_seconds, 3),
            **self.stats.to_dict(),
            "console_log": str(self.console_log),
            "cgroup": self.cgroup,
            "accel": self.accel,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "memory_limit_mib": self.memory_limit_mib,
            "slot": self.slot.to_dict(),
            "warnings": self.warnings,
        }


def render_for(spec: LaunchSpec, host: HostFacts, slot: Slot | None = None) -> Rendered:
    """The domain XML `spec` would run, for this host and slot."""
    source: bytes | None = None
    if spec.domain_xml is not None:
        try:
            source = spec.domain_xml.read_bytes()
        except OSError as e:
            raise LaunchError(f"cannot read domain XML {spec.domain_xml}: {e.strerror}") from None
    if slot is None:
        slot = discover_slot(machine_ad=spec.machine_ad)
    return render(source, spec.render, host, slot)


def _qemu_pid(name: str, uri: str) -> int:
    candidates = [Path("/run/libvirt/qemu") / f"{name}.pid"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "libvirt/qemu/run" / f"{name}.pid")
    for p in candidates:
        try:
            pid = int(p.read_text().strip())
            if Path(f"/proc/{pid}").exists():
                return pid
        except (OSError, ValueError):
            pass
    needle = f"guest={name},".encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if needle in Path(f"/proc/{d}/cmdline").read_bytes():
                    return int(d)
            except OSError:
                continue
    raise LaunchError(f"cannot find the qemu process of domain {name} ({uri})")


class RunningVM:
    """A started domain; use as a context manager so close() always runs."""

    def __init__(self, spec: LaunchSpec, rendered: Rendered, conn: Any, cgroup: cgroups.VMCgroup | None) -> None:
        self.spec = spec
        self.rendered = rendered
        self.name = rendered.name
        self.xml = rendered.xml
        self.warnings = list(rendered.warnings)
        self.console_log = rendered.console_log
        self.cgroup = cgroup
        self.pid = 0
        self.started = time.monotonic()
        self._conn = conn
        self._dom: Any = None
        self._ended = threading.Event()
        self._stop_detail: int | None = None
        self._watching = False
        self._stats = VMStats()
        self._own_reason: ExitReason | None = None
        self._closed = False
        dom = Domain.from_xml(rendered.xml)
        self._disk_targets = [d.target_dev or "" for d in dom.disks if d.has("./target")]
        self._macs = [n.mac or "" for n in dom.interfaces if n.has("./mac")]
        self._net_counted = bool(self._macs)
        self.reason: ExitReason | None = None
        self.detail = ""

    # -- start ----------------------------------------------------------------------------------------

    def _on_event(self, event: int, detail: int) -> None:
        libvirt = libvirt_module()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._stop_detail = detail
            self._ended.set()

    def _start(self) -> None:
        libvirt = libvirt_module()
        watch_lifecycle(self._conn, self.name, self._on_event)
        self._watching = True
        try:
            # AUTODESTROY: should vmtool itself be killed (-9), libvirt destroys the VM when the
            # connection goes away, so a hard-killed job leaves no VM running.
            self._dom = self._conn.createXML(
                self.xml, libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError as e:
            raise LaunchError(f"libvirt could not start the domain: {e.get_error_message()}",
                              hint="run 'vmtool domain render' with the same options to see the XML") from None
        self.pid = _qemu_pid(self.name, self.spec.uri)
        log.debug("domain %s created paused, qemu pid %d", self.name, self.pid)
        if self.cgroup is not None:
            self.cgroup.add_pid(self.pid)
            log.debug("qemu moved into %s", self.cgroup.describe())
        try:
            self._dom.resume()
        except libvirt.libvirtError as e:
            raise LaunchError(f"libvirt could not resume the domain: {e.get_error_message()}") from None
        self.started = time.monotonic()
        log.debug("domain %s resumed", self.name)

    # -- control --------------------------------------------------------------------------------------

    def is_running(self) -> bool:
        return not self._ended.is_set()

    def poll_stats(self) -> VMStats:
        """Refresh the counters; libvirt's are kept from the last poll before the domain ended."""
        libvirt = libvirt_module()
        st = self._stats
        if self._dom is not None and not self._ended.is_set():
            try:
                rd = wr = 0
                for dev in self._disk_targets:
                    s = self._dom.blockStats(dev)
                    rd, wr = rd + s[1], wr + s[3]
                st.disk_read_bytes, st.disk_write_bytes = rd, wr
            except libvirt.libvirtError:
                pass
            if self._net_counted:
                try:
                    rx = tx = 0
                    for mac in self._macs:
                        s = self._dom.interfaceStats(mac)
                        rx, tx = rx + s[0], tx + s[4]
                    st.net_rx_bytes, st.net_tx_bytes = rx, tx
                except libvirt.libvirtError:
                    # user-mode networking has no host interface to count on; do not ask again
                    self._net_counted = False
            if self.cgroup is None:
                try:
                    info = self._dom.info()
                    st.cpu_seconds = info[4] / 1e9
                    rss = self._dom.memoryStats().get("rss")
                    if rss is not None:
                        st.peak_memory_bytes = max(st.peak_memory_bytes or 0, rss * 1024)
                except libvirt.libvirtError:
                    pass
        if self.cgroup is not None:
            cpu = self.cgroup.cpu_seconds()
            peak = self.cgroup.peak_memory()
            st.cpu_seconds = cpu if cpu is not None else st.cpu_seconds
            st.peak_memory_bytes = peak if peak is not None else st.peak_memory_bytes
            st.oom_kills = self.cgroup.oom_kills()
        return st

    def stats(self) -> VMStats:
        return self.poll_stats()

    def wait(self, timeout: float | None = None, *, stop: threading.Event | None = None,
             poll: float = POLL_SECONDS) -> ExitReason:
        """Wait until the guest ends; on `timeout` or `stop` shut it down (grace: spec.grace)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._ended.is_set():
            self.poll_stats()
            if stop is not None and stop.is_set():
                self._own_reason = ExitReason.SIGNALLED
                self.shutdown(self.spec.grace)
                break
            if end is not None and time.monotonic() >= end:
                self._own_reason = ExitReason.TIMEOUT
                self.shutdown(self.spec.grace)
                break
            step = poll if end is None else max(0.0, min(poll, end - time.monotonic()))
            if stop is not None:
                # wake up quickly on a signal, yet poll the counters only once per `poll`
                t_end = time.monotonic() + step
                while not self._ended.is_set() and not stop.is_set() and time.monotonic() < t_end:
                    self._ended.wait(min(0.1, max(0.0, t_end - time.monotonic())))
            else:
                self._ended.wait(step)
            if not self._ended.is_set() and not self._exists():
                self._ended.wait(3.0)  # the lifecycle event is on its way
                self._ended.set()
        return self._classify()

    def _exists(self) -> bool:
        libvirt = libvirt_module()
        try:
            self._conn.lookupByName(self.name)
            return True
        except libvirt.libvirtError:
            return False

    def _classify(self) -> ExitReason:
        if self.reason is not None:
            return self.reason
        log.debug("domain %s ended (libvirt detail %s)", self.name, self._stop_detail)
        libvirt = libvirt_module()
        if self.cgroup is not None:
            self._stats.oom_kills = self.cgroup.oom_kills()
        d = self._stop_detail
        if self._stats.oom_kills:
            reason, detail = ExitReason.MEMORY, (
                f"qemu was killed by the kernel for exceeding the VM's memory limit of "
                f"{self.rendered.memory_limit_mib} MiB ({self._stats.oom_kills} OOM kill(s) in its cgroup)")
        elif self._own_reason is not None:
            reason = self._own_reason
            how = "shut down" if d == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN else "destroyed"
            detail = ("timeout passed" if reason is ExitReason.TIMEOUT else "signalled") + f", guest {how}"
        elif d == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            reason, detail = ExitReason.POWEROFF, "guest powered off"
        elif d == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
            reason, detail = ExitReason.CRASHED, "the domain was destroyed outside vmtool"
        elif d in (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED):
            reason, detail = ExitReason.CRASHED, "qemu crashed or was killed"
        else:
            reason, detail = ExitReason.CRASHED, f"the domain ended unexpectedly (libvirt detail {d})"
        self.reason, self.detail = reason, detail
        return reason

    def shutdown(self, grace: float) -> None:
        """Ask the guest to power off (ACPI); destroy it if it has not after `grace` seconds."""
        libvirt = libvirt_module()
        if self._ended.is_set() or self._dom is None:
            return
        try:
            self._dom.shutdown()
        except libvirt.libvirtError:
            pass  # not running any more, or no ACPI: destroy below
        if not self._ended.wait(grace):
            self.destroy()

    def destroy(self) -> None:
        libvirt = libvirt_module()
        if self._dom is None:
            return
        try:
            self._dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise LaunchError(f"cannot destroy domain {self.name}: {e.get_error_message()}") from None
        self._ended.wait(5.0)
        self._ended.set()

    def _wait_qemu_gone(self, timeout: float = 10.0) -> None:
        if not self.pid:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    return
            except (OSError, IndexError):
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Destroy the domain if needed and remove the cgroup; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        try:
            if self._exists():
                self.destroy()
        except VmtoolError as e:
            errors.append(e.message)
        self._wait_qemu_gone()
        if self.cgroup is not None:
            self.poll_stats()
            try:
                self.cgroup.remove()
            except CgroupError as e:
                errors.append(e.message)
        if self._watching:
            unwatch_lifecycle(self._conn, self.name)
            self._watching = False
        log.debug("domain %s cleaned up", self.name)
        if errors:
            raise LaunchError("cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> RunningVM:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except LaunchError:
            if et is None:
                raise


def start(spec: LaunchSpec, *, host: HostFacts | None = None, slot: Slot | None = None) -> RunningVM:
    """Render, create the cgroup, start the domain paused, move qemu into the cgroup, resume."""
    from vmtool.launch.host import host_facts

    conn = connect(spec.uri)
    host = host or host_facts(spec.uri, conn=conn)
    rendered = render_for(spec, host, slot)
    log.debug("rendered %s (%s, %d vCPU, %d MiB)", rendered.name, rendered.accel, rendered.cpus, rendered.memory_mib)
    cg = None
    if spec.use_cgroup:
        cg = cgroups.create(rendered.name, memory_bytes=rendered.memory_limit_mib << 20, cpus=rendered.cpus,
                            parent=spec.cgroup_parent)
    vm = RunningVM(spec, rendered, conn, cg)
    try:
        vm._start()
    except BaseException:
        vm.close()
        raise
    return vm


@contextmanager
def _started(spec: LaunchSpec) -> Iterator[RunningVM]:
    vm = start(spec)
    with vm:
        yield vm


def launch(spec: LaunchSpec, *, stop: threading.Event | None = None) -> LaunchReport:
    """Run the VM to its end (poweroff, timeout, memory kill, crash or `stop`) and report."""
    t0 = time.monotonic()
    with _started(spec) as vm:
        reason = vm.wait(spec.timeout, stop=stop)
        cg = vm.cgroup.describe() if vm.cgroup is not None else None
        vm.close()
        stats = vm._stats
    r = vm.rendered
    return LaunchReport(
        name=vm.name, reason=reason, detail=vm.detail, wall_seconds=time.monotonic() - t0, stats=stats,
        console_log=vm.console_log, cgroup=cg, accel=r.accel, cpus=r.cpus, memory_mib=r.memory_mib,
        memory_limit_mib=r.memory_limit_mib, slot=r.slot, warnings=vm.warnings,
    )
