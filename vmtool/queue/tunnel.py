"""`--via ssh://user@host[:port]`: reach a beanstalkd that listens only on the submit host's loopback.

A paramiko client (host keys checked against known_hosts; unknown or changed keys are refused)
forwards a local loopback port to the remote address over `direct-tcpip` channels, like `ssh -L`.
The queue code then connects to the local port as if beanstalkd were local.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
from pathlib import Path
from typing import Any

from vmtool.errors import QueueError

log = logging.getLogger("vmtool.queue.tunnel")


def parse_via(text: str) -> tuple[str, str, int]:
    m = re.fullmatch(
        r"ssh://([A-Za-z0-9._-]{1,64})@([A-Za-z0-9.\-]{1,253}|\[[0-9a-fA-F:]+\])(?::(\d{1,5}))?/?", text
    )
    if not m:
        raise QueueError(f"bad --via {text!r}", hint="use ssh://user@host or ssh://user@host:port")
    port = int(m.group(3) or 22)
    if not 0 < port < 65536:
        raise QueueError(f"bad port in --via {text!r}")
    return m.group(1), m.group(2).strip("[]"), port


class SSHTunnel:
    """A local port forwarded to `remote` through an SSH connection; use as a context manager."""

    def __init__(
        self,
        via: str,
        remote: tuple[str, int],
        *,
        known_hosts: Path | None = None,
        identity: Path | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.user, self.host, self.port = parse_via(via)
        self.via = via
        self.remote = remote
        self.known_hosts = known_hosts
        self.identity = identity
        self.timeout = timeout
        self._client: Any = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.local: tuple[str, int] = ("127.0.0.1", 0)

    def open(self) -> tuple[str, int]:
        from vmtool import ssh

        kh = self.known_hosts or Path(os.path.expanduser("~/.ssh/known_hosts"))
        try:
            client = ssh.connect(
                self.host,
                self.port,
                self.user,
                known_hosts=kh,
                identity=os.fspath(self.identity) if self.identity else None,
                timeout=self.timeout,
            )
        except ssh.SshConnectError as e:
            if e.kind == ssh.MISSING:
                raise QueueError("--via ssh:// needs paramiko", hint="pip install paramiko") from None
            if e.kind == ssh.KNOWN_HOSTS:
                raise QueueError(f"cannot read known hosts file {kh}: {e.detail}") from None
            if e.kind == ssh.CHANGED_KEY:
                raise QueueError(
                    f"the host key of {self.host}:{self.port} does not match known_hosts",
                    hint="someone may be intercepting the connection; check the key with the host's admin",
                ) from None
            if e.kind in (ssh.RESOLVE, ssh.UNREACHABLE):
                raise QueueError(f"cannot reach ssh server {self.host}:{self.port}: {e.detail}") from None
            raise QueueError(
                f"ssh to {self.host}:{self.port} failed: {e.detail}",
                hint=(
                    f"add the host key to {kh} (ssh-keyscan -p {self.port} {self.host})"
                    if e.kind == ssh.UNKNOWN_KEY
                    else "check the user, key (--identity) and that sshd allows TCP forwarding"
                ),
            ) from None
        self._client = client
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        lst.settimeout(0.5)
        self._listener = lst
        self.local = ("127.0.0.1", int(lst.getsockname()[1]))
        t = threading.Thread(target=self._accept, name="vmtool-tunnel", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("tunnel 127.0.0.1:%d -> %s -> %s:%d", self.local[1], self.host, *self.remote)
        return self.local

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                transport = self._client.get_transport()
                chan = transport.open_channel("direct-tcpip", self.remote, peer, timeout=self.timeout)
            except Exception as e:  # paramiko raises several types here; the client sees a closed socket
                log.warning("tunnel: cannot open a channel to %s:%d: %s", *self.remote, e)
                conn.close()
                continue
            t = threading.Thread(target=self._pump, args=(conn, chan), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, conn: socket.socket, chan: Any) -> None:
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([conn, chan], [], [], 0.5)
                if conn in r:
                    data = conn.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in r:
                    data = chan.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for t in self._threads:
            t.join(2)
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> tuple[str, int]:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
