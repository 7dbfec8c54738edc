"""One way to open an SSH connection with checked host keys, for sftp:// sources and `--via ssh://`.

Host keys come from the system files and a known_hosts file; an unknown key is refused unless the
caller accepts new keys (then it is recorded), a changed key is always refused. Failures are sorted
into kinds so each caller can word them for its own users (plugin failure ads, queue errors).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from vmtool.errors import VmtoolError

# Kinds of SshConnectError
MISSING = "paramiko-missing"  # the paramiko package is not installed
KNOWN_HOSTS = "known-hosts"  # the known_hosts file could not be read
CHANGED_KEY = "changed-key"  # the host's key differs from known_hosts: possible attack
UNKNOWN_KEY = "unknown-key"  # the host is not in known_hosts and new keys are not accepted
AUTH = "auth"  # the server refused our user or key
RESOLVE = "resolve"  # the host name does not resolve
UNREACHABLE = "unreachable"  # no TCP connection
PROTOCOL = "ssh"  # any other SSH-level failure


class SshConnectError(VmtoolError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def connect(
    host: str,
    port: int,
    user: str | None,
    *,
    known_hosts: Path,
    identity: str | None = None,
    timeout: float = 15.0,
    accept_new_host_key: bool = False,
) -> Any:
    """A connected paramiko SSHClient; the caller closes it. Raises SshConnectError."""
    try:
        import paramiko  # lazy: only sftp sources and ssh tunnels need it
    except ImportError:
        raise SshConnectError(MISSING, "the paramiko package is not installed") from None

    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys()
        if known_hosts.exists():
            client.load_host_keys(os.fspath(known_hosts))
    except (OSError, paramiko.SSHException) as e:
        raise SshConnectError(KNOWN_HOSTS, str(e)) from None
    policy = paramiko.AutoAddPolicy() if accept_new_host_key else paramiko.RejectPolicy()
    client.set_missing_host_key_policy(policy)
    try:
        client.connect(
            host,
            port=port,
            username=user or None,
            key_filename=identity or None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=not identity,
            look_for_keys=not identity,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SshConnectError(CHANGED_KEY, str(e)) from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise SshConnectError(AUTH, str(e)) from None
    except paramiko.SSHException as e:
        client.close()
        kind = UNKNOWN_KEY if "not found in known_hosts" in str(e) else PROTOCOL
        raise SshConnectError(kind, str(e)) from None
    except socket.gaierror as e:
        client.close()
        raise SshConnectError(RESOLVE, str(e)) from None
    except OSError as e:
        client.close()
        raise SshConnectError(UNREACHABLE, e.strerror or str(e)) from None
    if accept_new_host_key and known_hosts.parent.is_dir():
        try:
            client.save_host_keys(os.fspath(known_hosts))
        except OSError:
            pass
    return client
