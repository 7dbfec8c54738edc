"""Host side of the relay protocol spoken with the guest agent over a virtio-serial port.

The port is a unix socket on the host (libvirt binds it; we connect). The guest is hostile: every line
and the whole answer are size-bounded, names are checked, and anything unexpected ends the conversation
with RelayError (the worker then treats the VM as failed). The protocol is described in
vmtool/templates/agent.sh.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmtool.errors import QueueError
from vmtool.queue.items import NAME_RE

MAX_LINE = 4096
MAX_OUTPUTS = 16
PING_EVERY = 5.0


class RelayError(QueueError):
    """The guest broke the protocol, went silent or went away."""


@dataclass
class GuestResult:
    exit: int
    guest_seconds: float
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: dict[str, bytes] = field(default_factory=dict)


class Relay:
    """One conversation with one guest agent."""

    def __init__(self, sock: socket.socket, *, name: str = "vm") -> None:
        self.sock = sock
        self.name = name
        self._buf = b""
        self.agent_version: str | None = None
        self.mode: str | None = None
        self._last_send = 0.0

    @classmethod
    def connect(
        cls, path: Path, *, timeout: float = 30.0, name: str = "vm", alive: Callable[[], bool] | None = None
    ) -> Relay:
        """Connect to the unix socket at `path` (waiting for it to appear)."""
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                s.settimeout(1.0)
                return cls(s, name=name)
            except OSError as e:
                s.close()
                if time.monotonic() > end or (alive is not None and not alive()):
                    raise RelayError(
                        f"cannot connect to the relay socket of {name} at {path}: {e}"
                    ) from None
                time.sleep(0.2)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, text: str) -> None:
        try:
            self.sock.sendall(text.encode())
        except OSError as e:
            raise RelayError(f"{self.name}: relay connection lost while sending: {e}") from None
        self._last_send = time.monotonic()

    def _readline(self, deadline: float, tick: Callable[[], None] | None) -> str:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                try:
                    return line.decode("ascii").rstrip("\r")
                except UnicodeDecodeError:
                    raise RelayError(f"{self.name}: guest sent a non-ASCII line") from None
            if len(self._buf) > MAX_LINE:
                raise RelayError(f"{self.name}: guest sent a line longer than {MAX_LINE} bytes")
            if time.monotonic() > deadline:
                raise RelayError(
                    f"{self.name}: guest did not answer in time", hint="see the VM's console log"
                )
            if tick is not None:
                tick()
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise RelayError(f"{self.name}: relay connection lost: {e}") from None
            if not chunk:
                raise RelayError(f"{self.name}: the guest went away (relay closed)")
            self._buf += chunk

    def wait_hello(self, *, timeout: float = 300.0, alive: Callable[[], bool] | None = None) -> str:
        """Wait for the agent's HELLO (the VM is booting); returns the agent's mode."""
        deadline = time.monotonic() + timeout

        def tick() -> None:
            if alive is not None and not alive():
                raise RelayError(
                    f"{self.name}: the VM stopped before its agent said hello",
                    hint="see the VM's console log; was the image built with --agent?",
                )

        while True:
            parts = self._readline(deadline, tick).split()
            if len(parts) == 4 and parts[0] == "HELLO" and parts[1] == "vmtool-agent":
                self.agent_version, self.mode = parts[2], parts[3]
                self.send("PING\n")
                self._buf = b""
                return self.mode

    def next_line(self, wait: float) -> str | None:
        """The next line from the guest, or None if none came within `wait` seconds."""
        try:
            return self._readline(time.monotonic() + wait, None)
        except RelayError as e:
            if "did not answer in time" in e.message:
                return None
            raise

    def ping(self) -> None:
        if time.monotonic() - self._last_send >= PING_EVERY:
            self.send("PING\n")

    def stop(self) -> None:
        try:
            self.send("STOP\n")
        except RelayError:
            pass

    def run(
        self,
        seq: int,
        script: str,
        *,
        timeout_s: int,
        max_output: int,
        tick: Callable[[], None] | None = None,
        grace: float = 60.0,
    ) -> GuestResult:
        """Hand one job script to the agent and wait for its result (tick() is called about once a second)."""
        b64 = base64.b64encode(script.encode()).decode()
        lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
        self.send(f"ITEM {seq} {timeout_s} {max_output}\n" + "".join(x + "\n" for x in lines) + ".\n")
        deadline = time.monotonic() + timeout_s + grace
        # Every section is the base64 of at most max_output bytes.
        section_limit = (max_output * 4) // 3 + 4 * (max_output // 57 + 2) + 16

        while True:
            # HELLOs sent before the agent saw the host are skipped; so are stray PING echoes.
            parts = self._readline(deadline, tick).split()
            if parts and parts[0] == "RESULT":
                break
            if parts and parts[0] in ("HELLO",):
                continue
            raise RelayError(f"{self.name}: unexpected line from guest: {' '.join(parts)[:80]!r}")
        if len(parts) != 4 or parts[1] != str(seq) or not re.fullmatch(r"-?\d{1,4}", parts[2]):
            raise RelayError(f"{self.name}: malformed RESULT line from guest")
        try:
            guest_seconds = float(parts[3])
        except ValueError:
            guest_seconds = 0.0
        res = GuestResult(exit=int(parts[2]), guest_seconds=guest_seconds)

        def section() -> bytes:
            total = 0
            chunks: list[str] = []
            while True:
                line = self._readline(deadline, tick)
                if line == ".":
                    break
                total += len(line)
                if total > section_limit:
                    raise RelayError(f"{self.name}: guest sent more than max_output bytes in a section")
                chunks.append(line)
            try:
                return base64.b64decode("".join(chunks), validate=True)
            except (binascii.Error, ValueError):
                raise RelayError(f"{self.name}: guest sent invalid base64") from None

        if self._readline(deadline, tick) != "STDOUT":
            raise RelayError(f"{self.name}: expected STDOUT from guest")
        res.stdout = section()
        if self._readline(deadline, tick) != "STDERR":
            raise RelayError(f"{self.name}: expected STDERR from guest")
        res.stderr = section()
        while True:
            line = self._readline(deadline, tick)
            if line == f"END {seq}":
                return res
            parts = line.split(" ", 1)
            if parts[0] != "OUTPUT" or len(parts) != 2 or not NAME_RE.fullmatch(parts[1]):
                raise RelayError(f"{self.name}: unexpected line from guest: {line[:80]!r}")
            if len(res.outputs) >= MAX_OUTPUTS:
                raise RelayError(f"{self.name}: guest sent more than {MAX_OUTPUTS} output files")
            res.outputs[parts[1]] = section()
