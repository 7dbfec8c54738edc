"""Logging set-up and user-visible progress.

Progress goes to stderr and only when stderr is a terminal, so scripts and HTCondor logs stay quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger("vmtool")


def setup_logging(verbosity: int = 0, debug: bool = False) -> None:
    level = logging.DEBUG if debug or verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    root = logging.getLogger("vmtool")
    root.setLevel(level)
    if not any(getattr(h, "_vmtool", False) for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("vmtool: %(levelname)s: %(message)s"))
        sh._vmtool = True  # type: ignore[attr-defined]
        root.addHandler(sh)
    for h in root.handlers:
        h.setLevel(level)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A one-line progress indicator; silent unless the stream is a TTY (or force=True)."""

    def __init__(
        self, label: str, total: int | None = None, *, unit: str = "B", stream: TextIO | None = None,
        force: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.stream = stream or sys.stderr
        if force is None:
            force = os.environ.get("VMTOOL_PROGRESS") == "1"
        self.enabled = force or (hasattr(self.stream, "isatty") and self.stream.isatty())
        self._last = 0.0
        self._start = time.monotonic()

    def _show(self, n: float) -> str:
        return _fmt_bytes(n) if self.unit == "B" else f"{n:.0f} {self.unit}"

    def update(self, advance: int = 0, *, done: int | None = None, note: str = "") -> None:
        self.done = done if done is not None else self.done + advance
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or self.done < self.total):
            return
        self._last = now
        if self.total:
            pct = 100.0 * self.done / self.total
            text = f"{self.label}: {self._show(self.done)} / {self._show(self.total)} ({pct:.0f}%)"
        else:
            text = f"{self.label}: {self._show(self.done)}"
        if note:
            text += f" {note}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()

    def close(self, note: str = "done") -> None:
        if self.enabled:
            elapsed = time.monotonic() - self._start
            self.stream.write(f"\r\x1b[K{self.label}: {note} ({elapsed:.1f} s)\n")
            self.stream.flush()


@contextmanager
def step(label: str, *, stream: TextIO | None = None) -> Iterator[Progress]:
    """A named step shown on a terminal: `with step("extracting root filesystem") as p: ...`."""
    p = Progress(label, stream=stream)
    if p.enabled:
        p.stream.write(f"{label} ...")
        p.stream.flush()
    try:
        yield p
    except BaseException:
        p.close("failed")
        raise
    p.close()
