"""Host side of the relay protocol spoken with the guest agent over a virtio-serial port.

The port is a unix socket on the host (libvirt binds it; we connect). The guest is hostile: every line
and the whole answer are size-bounded, names are checked, and anything unexpected ends the conversation
with RelayError (the worker then treats the VM as failed). The protocol is described in
templates/agent/agent.sh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vmtool.errors import QueueError
from vmtool.queue.items import NAME_RE

MAX_LINE = 4096
MAX_OUTPUTS = 64
MAX_LISTED = MAX_OUTPUTS + 1
RAW_CHUNK = 1 << 20
# A guest that takes no input bytes for this long is stuck.
STALL_S = 120.0
# The agent protocol this host speaks (templates/agent/agent.sh, AGENT_VERSION).
PROTOCOL_VERSION = "2"
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
    # Whole outputs received into the spool directory: name -> (path, size, sha256).
    spooled: dict[str, tuple[Path, int, str]] = field(default_factory=dict)
    truncated_outputs: list[str] = field(default_factory=list)
    output_error: str | None = None
    scratch_used: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    transfer_s: float = 0.0
    in_s: float = 0.0  # seconds streaming inputs into the guest
    out_s: float = 0.0  # seconds streaming whole or inline outputs out of it


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

    def _recv(self, n: int) -> bytes | None:
        """Up to n bytes from the guest; None when the socket's timeout passed (the caller ticks and
        reads again)."""
        try:
            chunk = self.sock.recv(n)
        except TimeoutError:
            return None
        except OSError as e:
            raise RelayError(f"{self.name}: relay connection lost: {e}") from None
        if not chunk:
            raise RelayError(f"{self.name}: the guest went away (relay closed)")
        return chunk

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
            chunk = self._recv(65536)
            if chunk is None:
                continue
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

    def _read_exact(
        self, n: int, out: BinaryIO | None, deadline: float, tick: Callable[[], None] | None
    ) -> str:
        """Read exactly n raw bytes from the guest into `out` (None: discard); returns their sha256."""
        h = hashlib.sha256()
        left = n
        if self._buf:
            take = self._buf[:left]
            self._buf = self._buf[len(take) :]
            h.update(take)
            if out is not None:
                out.write(take)
            left -= len(take)
        last_tick = time.monotonic()
        while left > 0:
            if time.monotonic() > deadline:
                raise RelayError(f"{self.name}: guest stopped sending data", hint="see the VM's console log")
            if tick is not None and time.monotonic() - last_tick >= 1.0:
                last_tick = time.monotonic()
                tick()
            chunk = self._recv(min(left, RAW_CHUNK))
            if chunk is None:
                continue
            h.update(chunk)
            if out is not None:
                out.write(chunk)
            left -= len(chunk)
        return h.hexdigest()

    def _send_file(self, path: Path, size: int, tick: Callable[[], None] | None) -> None:
        """Send `size` bytes of `path` as they are (zero-copy where the kernel can)."""
        sent = 0
        moved = time.monotonic()
        with open(path, "rb") as f:
            while sent < size:
                if tick is not None:
                    tick()
                if time.monotonic() - moved > STALL_S:
                    raise RelayError(f"{self.name}: guest stopped reading input {path.name}")
                before = sent
                try:
                    n = self.sock.sendfile(f, sent, min(RAW_CHUNK * 16, size - sent))
                except TimeoutError:
                    # The guest is slow to read; sendfile() left the file at what did go out.
                    sent = f.tell()
                    if sent != before:
                        moved = time.monotonic()
                    continue
                except OSError as e:
                    raise RelayError(f"{self.name}: relay connection lost while sending: {e}") from None
                if n == 0:
                    raise RelayError(f"{self.name}: {path.name} shrank while it was sent")
                sent = f.tell()
                if sent != before:
                    moved = time.monotonic()
        self._last_send = time.monotonic()

    def run(
        self,
        seq: int,
        script: str,
        *,
        timeout_s: int,
        max_output: int,
        scratch_bytes: int = 512 << 20,
        files: Sequence[tuple[str, Path, int]] = (),
        spool: Path | None = None,
        max_output_bytes: int = 0,
        tick: Callable[[], None] | None = None,
        grace: float = 60.0,
    ) -> GuestResult:
        """Hand one item to the agent and wait for its result (tick() is called about once a second).

        files: (name, host path, size) streamed into the item's directory before it runs. spool: a
        directory for whole outputs (at most max_output_bytes in all); without it outputs come back
        inline, each cut to max_output bytes.
        """
        if self.agent_version != PROTOCOL_VERSION:
            raise RelayError(
                f"{self.name}: the guest agent speaks version {self.agent_version}, not {PROTOCOL_VERSION}",
                hint="rebuild the image with this vmtool's 'vmtool build --agent relay'",
            )
        b64 = base64.b64encode(script.encode()).decode()
        lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
        self.send(
            f"ITEM {seq} {timeout_s} {max_output} {scratch_bytes} {len(files)}\n"
            + "".join(x + "\n" for x in lines)
            + ".\n"
        )
        t_in = time.monotonic()
        res = GuestResult(exit=-1, guest_seconds=0.0)
        # Inputs take their time: the deadline of each one grows with its size (>= 1 MB/s).
        for name, path, size in files:
            self.send(f"FILE {name} {size}\n")
            self._send_file(path, size, tick)
            deadline = time.monotonic() + grace + size / 1e6
            parts = self._readline(deadline, tick).split(" ", 2)
            if parts[:2] != ["GOT", name]:
                why = parts[2] if len(parts) == 3 and parts[0] == "FAIL" else " ".join(parts)[:80]
                raise RelayError(f"{self.name}: guest could not store input {name}: {why}")
            res.bytes_in += size
        res.in_s = time.monotonic() - t_in
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
        if (
            len(parts) != 5
            or parts[1] != str(seq)
            or not re.fullmatch(r"-?\d{1,4}", parts[2])
            or not parts[4].isdigit()
        ):
            raise RelayError(f"{self.name}: malformed RESULT line from guest")
        try:
            res.guest_seconds = float(parts[3])
        except ValueError:
            res.guest_seconds = 0.0
        res.exit = int(parts[2])
        res.scratch_used = int(parts[4][:20])

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
        head = self._readline(deadline, tick).split()
        if len(head) != 2 or head[0] != "OUTPUTS" or not head[1].isdigit():
            raise RelayError(f"{self.name}: expected OUTPUTS from guest")
        count = int(head[1][:6])
        listed: list[tuple[str, int, str]] = []
        for _ in range(min(count, MAX_LISTED)):
            p = self._readline(deadline, tick).split(" ")
            if len(p) != 3 or len(p[0]) != 1 or not p[1].isdigit():
                raise RelayError(f"{self.name}: malformed output entry from guest")
            listed.append((p[0], int(p[1][:20]), p[2]))
        res.output_error = _check_outputs(count, listed, spool is not None, max_output_bytes)
        t_out = time.monotonic()
        if res.output_error is None:
            for _typ, size, name in listed:
                want = size if spool is not None else min(size, max_output)
                self.send(f"SEND {name} {want}\n")
                got = self._readline(deadline, tick).split()
                if got != ["DATA", name, str(want)]:
                    raise RelayError(f"{self.name}: expected DATA {name} from guest")
                # Whole outputs take their time too (>= 1 MB/s).
                data_deadline = max(deadline, time.monotonic() + grace + want / 1e6)
                if spool is not None:
                    local = spool / name
                    with open(local, "wb") as f:
                        sha = self._read_exact(want, f, data_deadline, tick)
                    res.spooled[name] = (local, want, sha)
                else:
                    buf = io.BytesIO()
                    self._read_exact(want, buf, data_deadline, tick)
                    res.outputs[name] = buf.getvalue()
                    if want < size:
                        res.truncated_outputs.append(name)
                res.bytes_out += want
        self.send("DONE\n")
        res.out_s = time.monotonic() - t_out
        res.transfer_s = res.in_s + res.out_s
        if self._readline(deadline, tick) != f"END {seq}":
            raise RelayError(f"{self.name}: expected END {seq} from guest")
        return res


def _check_outputs(
    count: int, listed: list[tuple[str, int, str]], whole: bool, max_bytes: int
) -> str | None:
    """Why the listed outputs cannot be taken (the item gets an error result), or None."""
    if count > MAX_OUTPUTS:
        return f"the command left {count} entries in $VMTOOL_OUTDIR, more than {MAX_OUTPUTS}"
    total = 0
    for typ, size, name in listed:
        if typ == "n" or not NAME_RE.fullmatch(name):
            shown = "an output's name" if typ == "n" else f"output name {name[:100]!r}"
            return f"{shown} is not a plain file name ([A-Za-z0-9._-], no path, no leading dot)"
        if typ == "l":
            return f"output {name} is a symbolic link: only regular files are outputs"
        if typ == "d":
            return f"output {name} is a directory: only regular files are outputs"
        if typ != "f":
            return f"output {name} is not a regular file"
        total += size
    if whole and total > max_bytes:
        return (
            f"outputs are {total} bytes, more than the item's limit of {max_bytes} (limits.max_output_bytes)"
        )
    return None
