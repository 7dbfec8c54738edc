"""One libvirt connection per URI per process, with libvirt's event loop running in a daemon thread.

Lifecycle events (guest powered off, qemu died) come through the event loop, which must be registered
before the first connection is opened; connections are reused so several VMs (the queue worker's) and
repeated launches share one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vmtool.errors import LaunchError

_lock = threading.Lock()
_conns: dict[str, Any] = {}
_loop_started = False
# Lifecycle listeners by connection, then by domain name. libvirt refuses a second domain-less
# registration of the same callback on one connection ("event callback already tracked"), so each
# connection registers once and dispatches to the VM the event is about.
_listeners: dict[int, dict[str, Callable[[int, int], None]]] = {}


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


def connect(uri: str) -> Any:
    libvirt = libvirt_module()
    with _lock:
        conn = _conns.get(uri)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
        _ensure_event_loop(libvirt)
        libvirt.registerErrorHandler(_quiet, None)
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise LaunchError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}",
                              hint="start libvirtd (and virtlogd), or give another --uri") from None
        _conns[uri] = conn
        return conn


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
