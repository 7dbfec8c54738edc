"""A thin, typed wrapper around greenstalk: addresses, tube names, timeouts and errors vmtool can show.

One `Beanstalk` per thread (greenstalk clients are not thread-safe). Bodies are bytes (encoding=None).
The socket gets a read timeout (greenstalk has none, so a dead server would hang a reserve forever),
keepalive and TCP_NODELAY. Lost connections become QueueError; `reconnect()` re-uses and re-watches.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from vmtool.errors import QueueError

DEFAULT_PORT = 11300
TUBE_RE = re.compile(r"[A-Za-z0-9+/;.$_()][A-Za-z0-9\-+/;.$_()]{0,180}")


def parse_server(text: str) -> tuple[str, int]:
    """'HOST:PORT', 'HOST' or '[v6]:PORT' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([A-Za-z0-9.\-_]+)(?::(\d+))?", text.strip())
    if not m:
        raise QueueError(f"bad beanstalkd address {text!r}", hint="use HOST:PORT, e.g. 127.0.0.1:11300")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise QueueError(f"bad port in beanstalkd address {text!r}")
    return host, port


def check_tube(name: str) -> str:
    if not TUBE_RE.fullmatch(name):
        raise QueueError(
            f"bad tube name {name!r}",
            hint="tube names use letters, digits and - + / ; . $ _ ( ), at most 180 characters",
        )
    return name


def results_tube(tube: str) -> str:
    return f"{tube}.results"


def reasons_tube(tube: str) -> str:
    return f"{tube}.buried-reasons"


@dataclass
class Job:
    id: int
    body: bytes


class Beanstalk:
    """One connection to beanstalkd (a greenstalk Client on a socket with timeouts)."""

    def __init__(
        self, address: tuple[str, int], *, use: str | None = None, watch: str | None = None,
        io_timeout: float = 30.0, connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._use = use
        self._watch = watch
        self._client: Any = None
        self.connect()

    @property
    def where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def connect(self) -> None:
        import greenstalk

        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except OSError as e:
            raise QueueError(
                f"cannot connect to beanstalkd at {self.where}: {e.strerror or e}",
                hint="is beanstalkd running there? (--via ssh://user@host reaches one on a remote loopback)",
            ) from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.io_timeout)
        try:
            self._client = greenstalk.Client(
                sock, encoding=None, use=self._use or "default", watch=self._watch or "default"
            )
        except (OSError, greenstalk.Error) as e:
            sock.close()
            raise QueueError(f"beanstalkd at {self.where} did not answer: {e}") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None

    def reconnect(self, *, deadline: float = 60.0) -> None:
        """Reconnect (re-use, re-watch), retrying until `deadline` seconds have passed."""
        self.close()
        end = time.monotonic() + deadline
        while True:
            try:
                self.connect()
                return
            except QueueError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)

    def __enter__(self) -> Beanstalk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: str, *args: Any, **kw: Any) -> Any:
        import greenstalk

        if self._client is None:
            raise QueueError(f"not connected to beanstalkd at {self.where}")
        try:
            return getattr(self._client, fn)(*args, **kw)
        except greenstalk.JobTooBigError:
            raise QueueError(
                f"beanstalkd at {self.where} refused {what}: job too big",
                hint="beanstalkd's -z limit (default 65535 bytes) is smaller than the body",
            ) from None
        except (greenstalk.TimedOutError, greenstalk.NotFoundError, greenstalk.DeadlineSoonError):
            raise
        except greenstalk.Error as e:
            raise QueueError(f"beanstalkd at {self.where} refused {what}: {type(e).__name__}") from None
        except (OSError, ValueError) as e:
            # ValueError: greenstalk reading from a socket file broken by a timeout.
            self.close()
            raise QueueError(f"lost connection to beanstalkd at {self.where} during {what}: {e}") from None

    def use(self, tube: str) -> None:
        if self._use != tube:
            self._call("use", "use", check_tube(tube))
            self._use = tube

    def put(self, body: bytes, *, tube: str | None = None, priority: int = 1024, delay: int = 0,
            ttr: int = 120) -> int:
        if tube is not None:
            self.use(tube)
        return int(self._call("put", "put", body, priority=priority, delay=delay, ttr=ttr))

    def reserve(self, timeout: int | None = 0) -> Job | None:
        """The next ready job on the watched tube, or None after `timeout` seconds."""
        import greenstalk

        try:
            j = self._call("reserve", "reserve", timeout=timeout)
        except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
            return None
        return Job(int(j.id), bytes(j.body))

    def _job(self, job_id: int) -> Any:
        import greenstalk

        return greenstalk.Job(job_id, b"")

    def touch(self, job_id: int) -> bool:
        """Restart the job's TTR; False if it is no longer ours."""
        import greenstalk

        try:
            self._call("touch", "touch", self._job(job_id))
            return True
        except greenstalk.NotFoundError:
            return False

    def delete(self, job_id: int) -> bool:
        import greenstalk

        try:
            self._call("delete", "delete", job_id)
            return True
        except greenstalk.NotFoundError:
            return False

    def release(self, job_id: int, *, priority: int = 1024, delay: int = 0) -> bool:
        import greenstalk

        try:
            self._call("release", "release", self._job(job_id), priority=priority, delay=delay)
            return True
        except greenstalk.NotFoundError:
            return False

    def bury(self, job_id: int, *, priority: int = 1024) -> bool:
        import greenstalk

        try:
            self._call("bury", "bury", self._job(job_id), priority=priority)
            return True
        except greenstalk.NotFoundError:
            return False

    def stats_job(self, job_id: int) -> dict[str, Any] | None:
        import greenstalk

        try:
            return dict(self._call("stats-job", "stats_job", job_id))
        except greenstalk.NotFoundError:
            return None

    def stats_tube(self, tube: str) -> dict[str, Any] | None:
        import greenstalk

        try:
            return dict(self._call("stats-tube", "stats_tube", check_tube(tube)))
        except greenstalk.NotFoundError:
            return None

    def kick(self, bound: int, *, tube: str) -> int:
        self.use(tube)
        return int(self._call("kick", "kick", bound))

    def peek_buried(self, tube: str) -> Job | None:
        import greenstalk

        self.use(tube)
        try:
            j = self._call("peek-buried", "peek_buried")
        except greenstalk.NotFoundError:
            return None
        return Job(int(j.id), bytes(j.body))
