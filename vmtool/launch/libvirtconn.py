"""One libvirt connection per URI per process, with libvirt's event loop running in a daemon thread.

Lifecycle events (guest powered off, qemu died) come through the event loop, which must be registered
before the first connection is opened; connections are reused so several VMs (the queue worker's) and
repeated launches share one.

`qemu:///session` (the default for non-root users) is served by a private libvirtd that this process
starts as its own child (`SessionDaemon`): it and the qemu it forks inherit the job's cgroup, so the VM
is charged to the slot with no cgroup writes, and two jobs of one user on one node never share a
daemon (a shared one would sit in, and charge everything to, the first job's slot). Its runtime and
config directories live in a fresh 0700 directory under /tmp (short enough for unix socket paths; the
job's $HOME may be unset or not its own); only libvirt's qemu capabilities cache is kept, in the user's
vmtool cache. The daemon runs with --timeout so that even a vmtool killed with SIGKILL leaves it for
only a minute; normally `release()` stops it and removes its directory once the last user is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmtool.errors import LaunchError, ToolMissing, VmtoolError
from vmtool.run import DEVNULL, Popen, find_tool, spawn

SYSTEM_URI = "qemu:///system"
SESSION_URI = "qemu:///session"
SESSION_STARTUP_SECONDS = 30.0
SESSION_IDLE_TIMEOUT = 60  # libvirtd --timeout: exits this long after its last client and VM are gone

_lock = threading.RLock()
_conns: dict[str, Any] = {}
_users: dict[str, int] = {}
_daemons: dict[str, SessionDaemon] = {}
_loop_started = False
# Lifecycle listeners by connection, then by domain name. libvirt refuses a second domain-less
# registration of the same callback on one connection ("event callback already tracked"), so each
# connection registers once and dispatches to the VM the event is about.
_listeners: dict[int, dict[str, Callable[[int, int], None]]] = {}


def default_uri() -> str:
    """qemu:///system for root, qemu:///session (a private per-job daemon) for everyone else."""
    return SYSTEM_URI if os.geteuid() == 0 else SESSION_URI


def is_private_session(uri: str) -> bool:
    """The URIs vmtool serves with its own SessionDaemon (no host, no explicit socket)."""
    return uri.rstrip("/") in ("qemu:///session", "qemu+unix:///session")


def libvirt_module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LaunchError("the libvirt Python bindings are not installed",
                          hint="install the Debian package python3-libvirt") from None
    return libvirt


def _ensure_event_loop(libvirt: Any) -> None:
    global _loop_started
    if _loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    _loop_started = True


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error on stderr by default; vmtool reports them itself."""


class SessionDaemon:
    """A libvirtd (or virtqemud) for qemu:///session, a child of this process in a private directory."""

    def __init__(self) -> None:
        try:
            self.program = find_tool("libvirtd")
            sock_name = "libvirt-sock"
        except ToolMissing:
            try:
                self.program = find_tool("virtqemud")
                sock_name = "virtqemud-sock"
            except ToolMissing:
                raise LaunchError(
                    "no libvirt daemon for qemu:///session is installed (neither libvirtd nor virtqemud)",
                    hint="install the Debian packages libvirt-daemon and libvirt-daemon-driver-qemu "
                         "on the execute node (vmtool starts the per-job session daemon itself)") from None
        self.dir = Path(tempfile.mkdtemp(prefix="vmtool-session-", dir="/tmp"))
        self.socket = self.dir / "run" / "libvirt" / sock_name
        self.proc: Popen[bytes] | None = None

    @property
    def runtime_dir(self) -> Path:
        """What the daemon takes as $XDG_RUNTIME_DIR/libvirt (qemu pid files live in qemu/run/)."""
        return self.dir / "run" / "libvirt"

    @property
    def uri(self) -> str:
        return f"{SESSION_URI}?socket={self.socket}"

    def _caps_cache(self) -> None:
        """Keep libvirt's qemu capabilities (seconds to compute) in the user's cache across jobs."""
        from vmtool.fsutil import private_dir, user_cache_dir

        link = self.dir / "cache" / "libvirt" / "qemu" / "cache"
        link.parent.mkdir(parents=True, mode=0o700)
        try:
            root = private_dir(user_cache_dir())
            target = private_dir(root / "libvirt-qemu-cache")
        except (OSError, VmtoolError):
            return  # no usable cache: libvirt computes the capabilities again, in the private dir
        link.symlink_to(target)

    def start(self) -> None:
        d = self.dir
        for sub in ("run", "config/libvirt", "cache"):
            (d / sub).mkdir(parents=True, mode=0o700, exist_ok=True)
        # stdio_handler=file: qemu's stderr goes to a file in the cache dir, not through a virtlogd that
        # the daemon would auto-start and leave behind.
        (d / "config" / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\nmax_core = 0\n')
        self._caps_cache()
        env = {"XDG_RUNTIME_DIR": str(d / "run"), "XDG_CONFIG_HOME": str(d / "config"),
               "XDG_CACHE_HOME": str(d / "cache"), "HOME": str(d)}
        with open(d / "daemon.log", "ab") as logf:
            self.proc = spawn([self.program, f"--timeout={SESSION_IDLE_TIMEOUT}"], env=env, stdin=DEVNULL,
                              stdout=logf, stderr=logf, new_session=True)
        end = time.monotonic() + SESSION_STARTUP_SECONDS
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                tail = self.log_tail() or f"no socket after {SESSION_STARTUP_SECONDS:.0f} s"
                self.stop()
                raise LaunchError(f"the session libvirt daemon {self.program} did not start: {tail}",
                                  hint="run it by hand as this user to see why: "
                                       f"XDG_RUNTIME_DIR=$(mktemp -d) {self.program} --verbose")
            time.sleep(0.02)

    def log_tail(self) -> str:
        try:
            lines = (self.dir / "daemon.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        errors = [ln for ln in lines if " error : " in ln]
        return (errors or lines or [""])[-1]

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after 10 s) and remove its directory."""
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except Exception:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _open(uri: str, target: str) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.open(target)
    except libvirt.libvirtError as e:
        msg = e.get_error_message() or str(e)
        hint = "start libvirtd (and virtlogd), or give another --uri"
        if os.geteuid() != 0 and not is_private_session(uri):
            import grp
            import pwd

            user = pwd.getpwuid(os.geteuid()).pw_name
            try:
                member = grp.getgrnam("libvirt").gr_gid in os.getgroups()
            except KeyError:
                member = False
            session = f"or leave --uri out: a non-root user gets {SESSION_URI}, a private daemon"
            if "ermission denied" in msg or "system bus" in msg or "authentication" in msg.lower():
                hint = (f"{uri} needs the libvirt group (usermod -aG libvirt {user}, then log in again); {session}"
                        if not member else
                        f"{user} is in the libvirt group, but libvirtd asks polkit, which needs the system bus: "
                        f"set auth_unix_rw = \"none\" in /etc/libvirt/libvirtd.conf; {session}")
        raise LaunchError(f"cannot connect to libvirt at {uri}: {msg}", hint=hint) from None


def connect(uri: str) -> Any:
    """The connection for `uri`, opened once per process; every call must be paired with release(uri)."""
    libvirt = libvirt_module()
    with _lock:
        conn = _conns.get(uri)
        if conn is not None:
            try:
                if conn.isAlive():
                    _users[uri] = _users.get(uri, 0) + 1
                    return conn
            except libvirt.libvirtError:
                pass
            _drop(uri)
        _ensure_event_loop(libvirt)
        libvirt.registerErrorHandler(_quiet, None)
        target = uri
        if is_private_session(uri):
            daemon = SessionDaemon()
            daemon.start()
            _daemons[uri] = daemon
            target = daemon.uri
        try:
            conn = _open(uri, target)
        except BaseException:
            _drop(uri)
            raise
        _conns[uri] = conn
        _users[uri] = _users.get(uri, 0) + 1
        return conn


def session_daemon(uri: str) -> SessionDaemon | None:
    """The private daemon serving `uri`, if vmtool runs one for it."""
    return _daemons.get(uri)


def _drop(uri: str) -> None:
    conn = _conns.pop(uri, None)
    _users.pop(uri, None)
    if conn is not None:
        _listeners.pop(id(conn), None)
        with contextlib.suppress(Exception):
            conn.close()
    daemon = _daemons.pop(uri, None)
    if daemon is not None:
        daemon.stop()


def release(uri: str) -> None:
    """One user of `uri` is done; the last one closes it and stops the private session daemon."""
    with _lock:
        n = _users.get(uri, 0) - 1
        if n > 0:
            _users[uri] = n
            return
        if uri in _daemons:
            _drop(uri)  # the system daemon's connection stays open for the next launch in this process
        else:
            _users[uri] = 0


def watch_lifecycle(conn: Any, name: str, fn: Callable[[int, int], None]) -> None:
    """Call fn(event, detail) for lifecycle events of domain `name` on `conn`."""
    libvirt = libvirt_module()
    with _lock:
        table = _listeners.get(id(conn))
        if table is None:
            table = _listeners[id(conn)] = {}

            def dispatch(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
                target = table.get(dom.name())
                if target is not None:
                    target(event, detail)

            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, dispatch, None)
        table[name] = fn


def unwatch_lifecycle(conn: Any, name: str) -> None:
    with _lock:
        _listeners.get(id(conn), {}).pop(name, None)
