"""The guest agent that `vmtool build --agent` installs: a busybox-sh script plus its boot hook.

`agent_files(mode)` returns guest path -> (content, mode bits); the build writes them into the root
filesystem. The default image's /sbin/init runs /etc/vmtool/rc.d/* in name order and then powers off,
so the agent only has to return when the host says STOP. Other images need an init that runs
/etc/vmtool/rc.d/50-vmtool-agent at boot and powers off after it (docs/queue.md).
"""

from __future__ import annotations

from enum import StrEnum

from vmtool.datafiles import data_file
from vmtool.errors import QueueError

AGENT_VERSION = "2"



class AgentMode(StrEnum):
    # Items and results pass over virtio-serial; the guest has no network.
    RELAY = "relay"
    # The guest agent reserves from beanstalkd itself (the seed's way; unsafe unless the server is
    # reached through a tunnel).
    DIRECT = "direct"


MODES = tuple(m.value for m in AgentMode)

AGENT_PATH = "/usr/lib/vmtool/agent.sh"
ITEM_AWK_PATH = "/usr/lib/vmtool/agent-item.awk"
HOOK_PATH = "/etc/vmtool/rc.d/50-vmtool-agent"
CONF_PATH = "/etc/vmtool/agent.conf"

# The name of the virtio-serial port the agent looks for (/sys/class/virtio-ports/*/name).
RELAY_PORT_NAME = "org.vmtool.relay.0"

HOOK = """#!/bin/sh
# Started by the image's init (vmtool default image: /sbin/init runs /etc/vmtool/rc.d/* then powers off).
[ -r /etc/vmtool/agent.conf ] && . /etc/vmtool/agent.conf
export VMTOOL_AGENT_MODE
/bin/sh /usr/lib/vmtool/agent.sh
"""


def agent_script(mode: str = "relay") -> str:
    """The agent's sh text with its version and default mode filled in."""
    _check_mode(mode)
    text = data_file("templates", "agent/agent.sh").read_text()
    return text.replace("@VERSION@", AGENT_VERSION).replace("@MODE@", mode)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QueueError(f"unknown agent mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")


def agent_files(mode: str = "relay") -> dict[str, tuple[bytes, int]]:
    """Files to write into a guest root filesystem: guest path -> (content, permission bits)."""
    _check_mode(mode)
    conf = f"# written by vmtool build --agent\nVMTOOL_AGENT_MODE={mode}\nVMTOOL_AGENT_VERSION={AGENT_VERSION}\n"
    return {
        AGENT_PATH: (agent_script(mode).encode(), 0o755),
        ITEM_AWK_PATH: (data_file("templates", "agent/agent-item.awk").read_bytes(), 0o644),
        HOOK_PATH: (HOOK.encode(), 0o755),
        CONF_PATH: (conf.encode(), 0o644),
    }
