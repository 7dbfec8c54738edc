"""Start a rendered domain through libvirt, keep qemu in the slot's cgroup, wait, account, clean up.

The domain is transient and started paused. Where vmtool may (root: "moved"; a delegated cgroup v2
subtree: "delegated") qemu is moved into the VM's own cgroup (every thread, checked through
/proc/PID/task/*/cgroup) before it is resumed, so nothing the guest does is charged outside the slot.
Otherwise ("inherited": a non-root job on cgroup v1, or in a v2 leaf) qemu stays in the job's cgroup,
where the private session daemon forked it; the guest is then sized so that qemu, vmtool and the daemon
fit the slot's limit with headroom, vmtool itself enforces the VM's memory limit (destroying qemu once
its RSS passes it: exit 5, the slot's limit is never reached), and qemu's oom_score_adj is raised so
that should the slot run out anyway, the kernel kills qemu and not vmtool (still exit 5).
`RunningVM.close()` (also on leaving `with start(spec)`) destroys the domain if it still runs, waits for
qemu to be gone, removes the cgroup and stops the session daemon it started, whatever happened before.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmtool.domain.model import Domain
from vmtool.domain.policy import Rendered, RenderOptions, render
from vmtool.domain.slot import Slot, discover_slot
from vmtool.errors import CgroupError, LaunchError, VmtoolError
from vmtool.launch import cgroups
from vmtool.launch.host import HostFacts
from vmtool.launch.libvirtconn import (
    connect,
    default_uri,
    libvirt_module,
    release,
    session_daemon,
    unwatch_lifecycle,
    watch_lifecycle,
)
from vmtool.launch.netns import NetCounters, NetOptions, VMNetwork

if TYPE_CHECKING:
    from vmtool.condor.chirp import Chirper

log = logging.getLogger("vmtool.launch")

POLL_SECONDS = 1.0
# In "inherited" mode vmtool enforces the VM's memory limit itself, by qemu's RSS: poll it often.
RSS_POLL_SECONDS = 0.2
# Room kept in the slot beyond vmtool's and the session daemon's measured RSS (they grow a little).
HEADROOM_MARGIN_MIB = 64


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
    uri: str | None = None  # None: qemu:///system for root, qemu:///session (private daemon) otherwise
    use_cgroup: bool = True
    cgroup_parent: str | None = None
    machine_ad: Path | None = None
    grace: float = 30.0
    net: NetOptions = NetOptions()  # with render.network == "nat": policy, LAN prefixes, accounting
    chirp: bool = False  # put the network figures into the job's ad while it runs (condor_chirp)


@dataclass
class VMStats:
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    # --network nat only: the same bytes split by the LAN prefixes, and packets the policy dropped
    net_rx_lan_bytes: int | None = None
    net_rx_wan_bytes: int | None = None
    net_tx_lan_bytes: int | None = None
    net_tx_wan_bytes: int | None = None
    net_dropped_packets: int | None = None
    oom_kills: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "cpu_seconds", "peak_memory_bytes", "disk_read_bytes", "disk_write_bytes", "net_rx_bytes",
            "net_tx_bytes", "net_rx_lan_bytes", "net_rx_wan_bytes", "net_tx_lan_bytes", "net_tx_wan_bytes",
            "net_dropped_packets", "oom_kills")}

    def set_net(self, c: NetCounters) -> None:
        self.net_rx_bytes, self.net_tx_bytes = c.rx, c.tx
        self.net_rx_lan_bytes, self.net_rx_wan_bytes = c.rx_lan, c.rx_wan
        self.net_tx_lan_bytes, self.net_tx_wan_bytes = c.tx_lan, c.tx_wan
        self.net_dropped_packets = c.dropped


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
    cgroup_mode: str = "none"
    uri: str = ""
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
            "cgroup_mode": self.cgroup_mode,
            "uri": self.uri,
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
    daemon = session_daemon(uri)
    if daemon is not None:
        candidates.insert(0, daemon.runtime_dir / "qemu" / "run" / f"{name}.pid")
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

    def __init__(self, spec: LaunchSpec, rendered: Rendered, conn: Any, cgroup: cgroups.VMCgroup | None,
                 net: VMNetwork | None = None, *, uri: str = "", cgroup_mode: str = "none",
                 slot_cgroup: cgroups.SlotCgroup | None = None) -> None:
        self.spec = spec
        self.uri = uri or spec.uri or default_uri()
        self.cgroup_mode = cgroup_mode
        self.slot_cgroup = slot_cgroup
        self._slot_ooms = slot_cgroup.oom_kills() if slot_cgroup is not None else 0
        self._rss_over: int | None = None
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
        self.net = net
        self._net_counted = bool(self._macs) and net is None
        self._chirp: Chirper | None = None
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
        self.pid = _qemu_pid(self.name, self.uri)
        log.debug("domain %s created paused, qemu pid %d", self.name, self.pid)
        if self.cgroup is not None:
            self.cgroup.add_pid(self.pid)
            log.debug("qemu moved into %s", self.cgroup.describe())
        elif self.cgroup_mode == "inherited":
            # Should the slot run out of memory after all, the kernel is to kill qemu, not vmtool (which
            # reports it) nor the daemon. Raising one's own process's score needs no privilege.
            try:
                Path(f"/proc/{self.pid}/oom_score_adj").write_text("1000")
            except OSError as e:
                self.warnings.append(f"cannot raise qemu's oom_score_adj: {e.strerror}")
        self._attach_network()
        try:
            self._dom.resume()
        except libvirt.libvirtError as e:
            raise LaunchError(f"libvirt could not resume the domain: {e.get_error_message()}") from None
        self.started = time.monotonic()
        log.debug("domain %s resumed", self.name)

    def _attach_network(self) -> None:
        """qemu has opened the tap; move it behind the VM's namespace before the guest runs."""
        if self.net is None:
            return
        self.net.attach()
        self.warnings.extend(self.net.notes)
        if self.spec.chirp:
            from vmtool.condor.chirp import Chirper

            self._chirp = Chirper()

    def _poll_network(self, final: bool = False) -> None:
        if self.net is None:
            return
        self._stats.set_net(self.net.counters())
        if self._chirp is not None:
            note = self._chirp.update(self._stats, final=final)
            if note:
                self.warnings.append(note)

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
            self._poll_network()
            if self.cgroup is None:
                try:
                    info = self._dom.info()
                    st.cpu_seconds = info[4] / 1e9
                except libvirt.libvirtError:
                    pass
                rss = self._qemu_rss()
                if rss is not None:
                    st.peak_memory_bytes = max(st.peak_memory_bytes or 0, rss)
                    if self.cgroup_mode == "inherited" and rss > self.rendered.memory_limit_mib << 20 \
                            and self._rss_over is None:
                        self._rss_over = rss
        if self.cgroup is not None:
            cpu = self.cgroup.cpu_seconds()
            peak = self.cgroup.peak_memory()
            st.cpu_seconds = cpu if cpu is not None else st.cpu_seconds
            st.peak_memory_bytes = peak if peak is not None else st.peak_memory_bytes
            st.oom_kills = self.cgroup.oom_kills()
        return st

    def stats(self) -> VMStats:
        return self.poll_stats()

    def _qemu_rss(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def wait(self, timeout: float | None = None, *, stop: threading.Event | None = None,
             poll: float = POLL_SECONDS) -> ExitReason:
        """Wait until the guest ends; on `timeout` or `stop` shut it down (grace: spec.grace)."""
        end = None if timeout is None else time.monotonic() + timeout
        if self.cgroup_mode == "inherited":
            poll = min(poll, RSS_POLL_SECONDS)
        while not self._ended.is_set():
            self.poll_stats()
            if self._rss_over is not None:
                self.destroy()
                break
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
        elif self.slot_cgroup is not None:
            self._stats.oom_kills = max(0, self.slot_cgroup.oom_kills() - self._slot_ooms)
        d = self._stop_detail
        if self._rss_over is not None:
            reason, detail = ExitReason.MEMORY, (
                f"qemu used {self._rss_over >> 20} MiB, more than the VM's memory limit of "
                f"{self.rendered.memory_limit_mib} MiB; vmtool destroyed it (cgroup mode inherited)")
        elif self._stats.oom_kills and self.cgroup is None:
            reason, detail = ExitReason.MEMORY, (
                f"qemu was killed by the kernel: the job's cgroup ran out of memory "
                f"({self._stats.oom_kills} OOM kill(s) there)")
        elif self._stats.oom_kills:
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
        self._close_network(errors)
        if self.cgroup is not None:
            self.poll_stats()
            try:
                self.cgroup.remove()
            except CgroupError as e:
                errors.append(e.message)
        if self._watching:
            unwatch_lifecycle(self._conn, self.name)
            self._watching = False
        release(self.uri)  # the last user stops the private session daemon
        log.debug("domain %s cleaned up", self.name)
        if errors:
            raise LaunchError("cleanup failed: " + "; ".join(errors))

    def _close_network(self, errors: list[str]) -> None:
        if self.net is None:
            return
        try:
            self._poll_network(final=True)
            self.net.close()
        except VmtoolError as e:
            errors.append(e.message)

    def __enter__(self) -> RunningVM:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except LaunchError:
            if et is None:
                raise


def _check_sandbox(sandbox: Path) -> None:
    """A non-root job's VM writes (console log, sockets) only into a sandbox of its own."""
    me = os.geteuid()
    if me == 0:
        return  # root launches for any job user (qemu:///system runs qemu under its own DAC label)
    try:
        st = sandbox.stat()
    except FileNotFoundError:
        raise LaunchError(f"the sandbox {sandbox} does not exist", hint="give an existing --sandbox") from None
    except OSError as e:
        raise LaunchError(f"cannot use the sandbox {sandbox}: {e.strerror}", hint="give another --sandbox") from None
    if st.st_uid != me:
        import pwd

        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"uid {st.st_uid}"
        raise LaunchError(f"the sandbox {sandbox} belongs to {owner}, not to {pwd.getpwuid(me).pw_name}: the VM's "
                          f"console log and sockets would live where another user controls them",
                          hint="run from the job's own directory ($_CONDOR_SCRATCH_DIR) or give --sandbox DIR "
                               "of your own")


def _rss_mib(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _inherited_slot(slot: Slot, slot_cg: cgroups.SlotCgroup | None, uri: str) -> Slot:
    """The slot minus what vmtool and the session daemon need, capped by the job cgroup's own limit."""
    mem = slot.memory_mib
    limit = slot_cg.memory_limit() if slot_cg is not None else None
    if limit is not None and limit >> 20 < mem:
        mem = limit >> 20
    daemon = session_daemon(uri)
    headroom = _rss_mib("self") + (_rss_mib(daemon.proc.pid) if daemon and daemon.proc else 0) + HEADROOM_MARGIN_MIB
    log.debug("inherited cgroup: slot %d MiB, cgroup limit %s, headroom %d MiB", slot.memory_mib,
              None if limit is None else limit >> 20, headroom)
    if mem - headroom < 64:
        raise LaunchError(f"the job's {mem} MiB leave no room for a VM after vmtool and the libvirt daemon "
                          f"({headroom} MiB)", hint="ask for a bigger slot (request_memory)")
    return dataclasses.replace(slot, memory_mib=mem - headroom)


def start(spec: LaunchSpec, *, host: HostFacts | None = None, slot: Slot | None = None) -> RunningVM:
    """Render, create the cgroup, start the domain paused, move qemu into the cgroup, resume."""
    from vmtool.launch.host import host_facts

    _check_sandbox(spec.render.sandbox)
    uri = spec.uri or default_uri()
    conn = connect(uri)
    net: VMNetwork | None = None
    try:
        host = host or host_facts(uri, conn=conn)
        mode, parent = cgroups.choose_mode(use_cgroup=spec.use_cgroup, parent=spec.cgroup_parent)
        slot_cg = None
        if mode == "inherited":
            slot_cg = cgroups.SlotCgroup.of_self()
            slot = _inherited_slot(slot or discover_slot(machine_ad=spec.machine_ad), slot_cg, uri)
        net = _network_for(spec)
        if net is not None:
            spec = replace(spec, render=replace(spec.render, tap=net.tap))
        rendered = render_for(spec, host, slot)
        log.debug("rendered %s (%s, %d vCPU, %d MiB), cgroup mode %s", rendered.name, rendered.accel,
                  rendered.cpus, rendered.memory_mib, mode)
        cg = None
        if mode in ("moved", "delegated"):
            cg = cgroups.create(rendered.name, memory_bytes=rendered.memory_limit_mib << 20, cpus=rendered.cpus,
                                parent=parent)
    except BaseException:
        if net is not None:
            net.close()
        release(uri)
        raise
    vm = RunningVM(spec, rendered, conn, cg, net, uri=uri, cgroup_mode=mode, slot_cgroup=slot_cg)
    if not host.kvm and "/dev/kvm is not readable" in host.kvm_reason:
        vm.warnings.append(f"running under TCG (slow): {host.kvm_reason}")
    try:
        vm._start()
    except BaseException:
        vm.close()
        raise
    return vm


def _network_for(spec: LaunchSpec) -> VMNetwork | None:
    """The VM's own namespace, links and tables for --network nat (vmtool.launch.netns)."""
    if spec.render.network != "nat":
        return None
    from vmtool.launch import netns

    uid, gid = spec.render.run_as or (os.getuid(), os.getgid())
    return netns.setup(spec.net, uid=uid, gid=gid)


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
        memory_limit_mib=r.memory_limit_mib, slot=r.slot, cgroup_mode=vm.cgroup_mode, uri=vm.uri,
        warnings=vm.warnings,
    )
