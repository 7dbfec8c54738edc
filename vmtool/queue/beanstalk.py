"""A thin, typed wrapper around greenstalk: addresses, tube names, timeouts and errors vmtool can show.

One `Beanstalk` per thread (greenstalk clients are not thread-safe). Bodies are bytes (encoding=None).
The socket gets a read timeout (greenstalk has none, so a dead server would hang a reserve forever),
keepalive and TCP_NODELAY. Lost connections become QueueError; `reconnect()` re-uses and re-watches.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from vmtool.errors import QueueError

log = logging.getLogger("vmtool.queue.beanstalk")

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


@functools.lru_cache(maxsize=256)
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


_COUNTS = ("reserves", "releases", "timeouts", "ttr")
_COUNT_RE = re.compile(rb"^(reserves|releases|timeouts|ttr): (\d+)$", re.M)


@dataclass
class Job:
    id: int
    body: bytes


class Beanstalk:
    """One connection to beanstalkd (a greenstalk Client on a socket with timeouts)."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        use: str | None = None,
        watch: str | None = None,
        io_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._use = use
        self._watch = watch
        self._client: Any = None
        self._deferred: list[int] = []
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
        # Kernel-side timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket: Python's settimeout()
        # would poll() before every recv and send, which halves the command rate on loopback.
        sock.settimeout(None)
        tv = struct.pack("ll", int(self.io_timeout), int((self.io_timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        try:
            self._client = greenstalk.Client(
                sock, encoding=None, use=self._use or "default", watch=self._watch or "default"
            )
        except (OSError, greenstalk.Error) as e:
            sock.close()
            raise QueueError(f"beanstalkd at {self.where} did not answer: {e}") from None

    def close(self) -> None:
        """Close the connection (deferred deletes not flushed are kept for after a reconnect)."""
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
        try:
            if self._deferred and self._client is not None:
                self.flush()
        except QueueError:
            pass
        finally:
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

    def put(
        self, body: bytes, *, tube: str | None = None, priority: int = 1024, delay: int = 0, ttr: int = 120
    ) -> int:
        if tube is not None:
            self.use(tube)
        return int(self._call("put", "put", body, priority=priority, delay=delay, ttr=ttr))

    def reserve(self, timeout: int | None = 0) -> Job | None:
        """The next ready job on the watched tube, or None after `timeout` seconds.

        Deletes deferred with defer_delete() are sent in the same write, ahead of the reserve.
        """
        import greenstalk

        if self._deferred:
            return self._delete_and_reserve(timeout)
        try:
            j = self._call("reserve", "reserve", timeout=timeout)
        except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
            return None
        return Job(int(j.id), bytes(j.body))

    def defer_delete(self, job_id: int) -> None:
        """Delete `job_id` together with the next reserve (one round trip less per item), or at flush().

        Only for jobs whose result is already stored: if the worker dies before the delete is sent,
        the job runs again and its duplicate result is dropped by readers (at least once).
        """
        self._deferred.append(job_id)

    def flush(self) -> None:
        """Send the deferred deletes now."""
        while self._deferred:
            jid = self._deferred[0]
            if not self.delete(jid):
                log.warning("job %d was no longer ours when deleting it", jid)
            self._deferred.pop(0)

    def _delete_and_reserve(self, timeout: int | None) -> Job | None:
        import greenstalk

        client = self._client
        if client is None:
            raise QueueError(f"not connected to beanstalkd at {self.where}")
        send = getattr(client, "_sock", None)
        reader = getattr(client, "_reader", None)
        if send is None or reader is None or not hasattr(greenstalk, "_parse_response"):
            self.flush()
            return self.reserve(timeout)
        cmd = b"reserve" if timeout is None else b"reserve-with-timeout %d" % timeout
        wire = b"".join(b"delete %d\r\n" % j for j in self._deferred) + cmd + b"\r\n"

        def exchange() -> Job | None:
            client._sock.sendall(wire)
            for jid in list(self._deferred):
                try:
                    greenstalk._parse_response(client._reader.readline(), b"DELETED")
                except greenstalk.NotFoundError:
                    log.warning("job %d was no longer ours when deleting it", jid)
                self._deferred.pop(0)
            try:
                jid, size = (
                    int(n) for n in greenstalk._parse_response(client._reader.readline(), b"RESERVED")
                )
            except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
                return None
            return Job(jid, bytes(client._read_chunk(size)))

        try:
            return exchange()
        except greenstalk.Error as e:
            raise QueueError(
                f"beanstalkd at {self.where} refused delete/reserve: {type(e).__name__}"
            ) from None
        except (OSError, ValueError) as e:
            self.close()
            raise QueueError(f"lost connection to beanstalkd at {self.where} during reserve: {e}") from None

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

    def job_counts(self, job_id: int) -> dict[str, int] | None:
        """reserves, releases, timeouts and ttr of a job (the worker asks for every item it reserves).

        Reads the stats-job reply with one regex instead of greenstalk's general parser: on loopback
        the general parser cost more than the round trip itself.
        """
        import greenstalk

        send = getattr(self._client, "_send_cmd", None)
        read = getattr(self._client, "_read_chunk", None)
        if send is None or read is None:  # a greenstalk without these internals: the public call
            st = self.stats_job(job_id)
            return None if st is None else {k: int(st.get(k, 0)) for k in _COUNTS}
        try:
            (size,) = self._call("stats-job", "_send_cmd", b"stats-job %d" % job_id, b"OK")
            chunk = self._call("stats-job", "_read_chunk", int(size))
        except greenstalk.NotFoundError:
            return None
        found = dict(_COUNT_RE.findall(chunk))
        return {k: int(found.get(k.encode(), b"0")) for k in _COUNTS}

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
