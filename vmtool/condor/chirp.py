"""Put a running VM's network figures into the job's ad with `condor_chirp set_job_attr`.

Works when the job has `+WantIOProxy = true` (the starter then writes .chirp.config into the job's
scratch directory). The attribute names are the ones of the OSG network-accounting patch and its
Gratia probe (NetworkIncomingInternal = bytes in from the LAN, ...External = from the WAN).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Protocol

from vmtool.errors import CommandError
from vmtool.run import run

CHIRP_SECONDS = 30.0
LIBEXEC = (Path("/usr/libexec/condor/condor_chirp"), Path("/usr/lib/condor/libexec/condor_chirp"))

ATTRS = (
    ("NetworkIncomingInternal", "net_rx_lan_bytes"),
    ("NetworkIncomingExternal", "net_rx_wan_bytes"),
    ("NetworkOutgoingInternal", "net_tx_lan_bytes"),
    ("NetworkOutgoingExternal", "net_tx_wan_bytes"),
    ("NetworkDroppedPackets", "net_dropped_packets"),
)


class _Stats(Protocol):
    net_rx_lan_bytes: int | None
    net_rx_wan_bytes: int | None
    net_tx_lan_bytes: int | None
    net_tx_wan_bytes: int | None
    net_dropped_packets: int | None


def find_chirp() -> str | None:
    """condor_chirp on PATH, in HTCondor's libexec, or None."""
    found = shutil.which("condor_chirp")
    if found:
        return found
    for p in LIBEXEC:
        if os.access(p, os.X_OK):
            return str(p)
    return None


def attributes(stats: _Stats) -> dict[str, int]:
    return {attr: int(v) for attr, key in ATTRS if (v := getattr(stats, key)) is not None}


def set_job_attrs(attrs: dict[str, int], chirp: str) -> None:
    """One `condor_chirp set_job_attr NAME VALUE` per attribute (CommandError if chirp refuses)."""
    for name, value in attrs.items():
        run([chirp, "set_job_attr", name, str(value)], timeout=30,
            hint="the job needs '+WantIOProxy = true' in its submit file")


class Chirper:
    """Sends the figures at most every CHIRP_SECONDS while the VM runs, and once at its end."""

    def __init__(self, chirp: str | None = None, every: float = CHIRP_SECONDS) -> None:
        self.chirp = chirp or find_chirp()
        self.every = every
        self._next = 0.0
        self._failed = False
        self._sent: dict[str, int] = {}

    def update(self, stats: _Stats, *, final: bool = False) -> str | None:
        """Send if due; a warning (once) when chirp is missing or fails, else None."""
        if self._failed:
            return None
        if self.chirp is None:
            self._failed = True
            return "--chirp: condor_chirp not found; the network figures are only in the report"
        now = time.monotonic()
        if not final and now < self._next:
            return None
        self._next = now + self.every
        attrs = attributes(stats)
        if attrs == self._sent:
            return None
        try:
            set_job_attrs(attrs, self.chirp)
        except CommandError as e:
            self._failed = True
            return f"--chirp: {e.message}"
        self._sent = attrs
        return None
