"""The real guest agent (busybox sh, its busybox applets) against the real host relay, over a pty.

The pty stands in for the virtio-serial character device; the VM tests run the same agent in a guest.
A second group drives Relay with a hostile peer to check that a lying guest cannot hurt the host.
"""

from __future__ import annotations

import hashlib
import os
import pty
import select
import shutil
import socket
import termios
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer
from tests.fixtures.stage import HttpServer
from vmtool.queue.agent import AGENT_VERSION, agent_files, agent_script
from vmtool.queue.beanstalk import Beanstalk
from vmtool.queue.client import collect_results, put_items, tube_stats
from vmtool.queue.items import Item, job_script
from vmtool.queue.relay import PROTOCOL_VERSION, Relay, RelayError
from vmtool.run import DEVNULL, PIPE, Popen, spawn

pytestmark = pytest.mark.integration

BUSYBOX = "/bin/busybox"


class AgentOnPty:
    def __init__(self, tmp: Path, grace: int = 120) -> None:
        self.tmp = tmp
        bindir = tmp / "bin"
        bindir.mkdir()
        for applet in (
            "sh",
            "cat",
            "cut",
            "rm",
            "mkdir",
            "base64",
            "tail",
            "head",
            "timeout",
            "awk",
            "sleep",
            "sync",
            "echo",
            "printf",
            "wc",
            "ls",
            "true",
            "false",
            "tr",
            "sed",
            "kill",
            "nc",
            "mkfifo",
            "od",
            "touch",
            "cp",
            "dd",
            "stat",
            "du",
            "grep",
            "sha256sum",
            "wget",
            "ln",
        ):
            (bindir / applet).symlink_to(BUSYBOX)
        script = tmp / "agent.sh"
        script.write_text(agent_script("relay"))
        for path, (content, _mode) in agent_files("direct").items():
            if path.endswith(".awk"):
                (tmp / "agent-item.awk").write_bytes(content)
        master, slave = pty.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.master = master
        self.slave_name = os.ttyname(slave)
        self.slave = slave
        self.proc: Popen[bytes] = spawn(
            [BUSYBOX, "sh", os.fspath(script)],
            env={
                "PATH": os.fspath(bindir),
                "VMTOOL_AGENT_DEV": self.slave_name,
                "VMTOOL_AGENT_ITEM_AWK": os.fspath(tmp / "agent-item.awk"),
                "VMTOOL_AGENT_NET": "skip",  # never touch the host's network
                "VMTOOL_AGENT_GRACE": str(grace),
                "TMPDIR": os.fspath(tmp),
            },
            stdin=DEVNULL,
            stdout=DEVNULL,
            stderr=PIPE,
            new_session=True,
        )
        self.host_sock, peer = socket.socketpair()
        self.peer = peer
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._bridge, daemon=True)
        self._t.start()

    def _bridge(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.master, self.peer], [], [], 0.2)
            try:
                if self.master in r:
                    data = os.read(self.master, 65536)
                    if not data:
                        break
                    self.peer.sendall(data)
                if self.peer in r:
                    data = self.peer.recv(65536)
                    if not data:
                        break
                    os.write(self.master, data)
            except OSError:
                break

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self._stop.set()
        self._t.join(2)
        for fd in (self.master, self.slave):
            os.close(fd)
        self.peer.close()
        self.host_sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentOnPty]:
    if not os.path.exists(BUSYBOX) or shutil.which("base64") is None:
        pytest.skip("busybox-static is not installed")
    a = AgentOnPty(tmp_path)
    try:
        yield a
    finally:
        a.close()


def test_agent_files_layout() -> None:
    files = agent_files("relay")
    assert set(files) == {
        "/usr/lib/vmtool/agent.sh",
        "/usr/lib/vmtool/agent-item.awk",
        "/etc/vmtool/rc.d/50-vmtool-agent",
        "/etc/vmtool/agent.conf",
    }
    assert files["/usr/lib/vmtool/agent.sh"][1] == 0o755
    assert b"@VERSION@" not in files["/usr/lib/vmtool/agent.sh"][0]
    assert f"VMTOOL_AGENT_VERSION={AGENT_VERSION}".encode() in files["/etc/vmtool/agent.conf"][0]
    from vmtool.errors import QueueError

    with pytest.raises(QueueError, match="unknown agent mode"):
        agent_files("carrier-pigeon")
    direct = agent_files("direct")
    assert b"VMTOOL_AGENT_MODE=direct" in direct["/etc/vmtool/agent.conf"][0]
    assert b"function value(" in direct["/usr/lib/vmtool/agent-item.awk"][0]


def test_agent_serves_items_until_stop(agent: AgentOnPty) -> None:
    agent.host_sock.settimeout(1.0)
    relay = Relay(agent.host_sock, name="pty")
    assert relay.wait_hello(timeout=20) == "relay"
    assert relay.agent_version == AGENT_VERSION

    # Inputs in, stdout/stderr tails and output files back, the exit code kept.
    it = Item(
        "i1",
        ["sh", "-c", "cat data.bin | wc -c; echo oops >&2; cp data.bin $VMTOOL_OUTDIR/copy.bin; exit 7"],
    )
    payload = bytes(range(256)) * 4
    g = relay.run(1, job_script(it, {"data.bin": payload}), timeout_s=20, max_output=4096)
    assert (g.exit, g.stdout.strip(), g.stderr) == (7, b"1024", b"oops\n")
    assert g.outputs == {"copy.bin": payload}

    # Only plain output names come back: any other name makes the item an error, nothing is taken.
    it_names = Item("names", ["sh", "-c", "cd $VMTOOL_OUTDIR && touch 'a b' -- -x .hidden ok.txt"])
    g_names = relay.run(9, job_script(it_names, {}), timeout_s=20, max_output=4096)
    assert g_names.exit == 0 and g_names.outputs == {}
    assert g_names.output_error is not None and "not a plain file name" in g_names.output_error
    it_link = Item("link", ["sh", "-c", "ln -s /etc/passwd $VMTOOL_OUTDIR/pw"])
    g_link = relay.run(10, job_script(it_link, {}), timeout_s=20, max_output=4096)
    assert g_link.output_error is not None and "symbolic link" in g_link.output_error

    # Raw input files in, whole outputs out to a spool directory, checksummed on the way.
    blob = os.urandom(3 << 20)
    src = agent.tmp / "blob.bin"
    src.write_bytes(blob)
    spool = agent.tmp / "spool"
    spool.mkdir()
    it_big = Item("big", ["sh", "-c", "cat blob.bin blob.bin > $VMTOOL_OUTDIR/twice.bin; wc -c < blob.bin"])
    g_big = relay.run(
        11,
        job_script(it_big, {}),
        timeout_s=60,
        max_output=4096,
        files=[("blob.bin", src, len(blob))],
        spool=spool,
        max_output_bytes=8 << 20,
    )
    assert g_big.exit == 0 and g_big.stdout.strip() == str(len(blob)).encode()
    path, size, sha = g_big.spooled["twice.bin"]
    assert size == 2 * len(blob) and path.read_bytes() == blob + blob
    assert sha == hashlib.sha256(blob + blob).hexdigest()
    assert (g_big.bytes_in, g_big.bytes_out) == (len(blob), 2 * len(blob))
    # Over the item's output limit: nothing is taken.
    g_over = relay.run(
        12,
        job_script(it_big, {}),
        timeout_s=60,
        max_output=4096,
        files=[("blob.bin", src, len(blob))],
        spool=spool,
        max_output_bytes=len(blob),
    )
    assert g_over.output_error is not None and "max_output_bytes" in g_over.output_error
    assert g_over.bytes_out == 0

    # Hostile arguments stay arguments.
    it2 = Item("i2", ["printf", "%s|", "$(echo pwned)", "a b", "'q'"])
    g2 = relay.run(2, job_script(it2, {}), timeout_s=20, max_output=4096)
    assert (g2.exit, g2.stdout) == (0, b"$(echo pwned)|a b|'q'|")

    # Only the tail of a long output comes back.
    it3 = Item("i3", ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"])
    g3 = relay.run(3, job_script(it3, {}), timeout_s=30, max_output=100)
    assert len(g3.stdout) == 100 and g3.stdout.endswith(b"line1999\n")

    # The item's time limit is enforced in the guest.
    it4 = Item("i4", ["sleep", "30"], timeout_s=1)
    t0 = time.monotonic()
    g4 = relay.run(4, job_script(it4, {}), timeout_s=1, max_output=100)
    assert g4.exit in (124, 143) and time.monotonic() - t0 < 10

    relay.stop()
    assert agent.proc.wait(10) == 0


def test_agent_stops_when_host_is_silent(tmp_path: Path) -> None:
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    a = AgentOnPty(tmp_path, grace=3)
    try:
        a.host_sock.settimeout(1.0)
        relay = Relay(a.host_sock, name="pty")
        relay.wait_hello(timeout=20)
        # No PINGs: the agent gives up by itself (a worker that was SIGKILLed leaves no VM behind).
        assert a.proc.wait(30) == 0
    finally:
        a.close()


class HostileGuest:
    def __init__(self) -> None:
        self.host, self.guest = socket.socketpair()
        self.host.settimeout(0.5)
        self.relay = Relay(self.host, name="evil")
        self.relay.agent_version = PROTOCOL_VERSION

    def answer(self, data: bytes) -> None:
        self.guest.sendall(data)

    def close(self) -> None:
        self.host.close()
        self.guest.close()


@pytest.mark.parametrize(
    "reply, words",
    [
        (b"x" * 10000, "longer than"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n" + b"QUFB\n" * 3000 + b".\n", "more than max_output"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n@@@@\n.\n", "invalid base64"),
        (b"RESULT 9 0 0.1 0\n", "malformed RESULT"),
        (b"RESULT 1 0 0.1\n", "malformed RESULT"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n.\nSTDERR\n.\nOUTPUT ../../etc/passwd\n", "expected OUTPUTS"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n.\nSTDERR\n.\nOUTPUTS 1\nf 5 ok\nDATA ok 999\n", "expected DATA"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n.\nSTDERR\n.\nOUTPUTS 1\nf 5 ok\nDATA ok 5\nab", "went away"),
        (b"RESULT 1 0 0.1 0\nSTDOUT\n.\n", "went away"),
        (b"\xff\xfe\n", "non-ASCII"),
        (b"rm -rf /\n", "unexpected line"),
    ],
)
def test_relay_refuses_a_lying_guest(reply: bytes, words: str) -> None:
    h = HostileGuest()
    try:
        h.answer(reply)
        h.guest.shutdown(socket.SHUT_WR)
        with pytest.raises(RelayError) as e:
            h.relay.run(1, "true\n", timeout_s=2, max_output=1000, grace=1)
        assert words in e.value.message
    finally:
        h.close()


@pytest.mark.parametrize(
    "listing, words",
    [
        (b"f 5 ../../etc/passwd\n", "not a plain file name"),
        (b"f 5 /etc/passwd\n", "not a plain file name"),
        (b"n 5 ?\n", "not a plain file name"),
        (b"l 0 pw\n", "symbolic link"),
        (b"d 0 sub\n", "directory"),
    ],
)
def test_relay_takes_no_output_that_leaves_its_directory(listing: bytes, words: str) -> None:
    """A guest that names outputs outside $VMTOOL_OUTDIR gets an error result; the host asks for nothing."""
    h = HostileGuest()
    try:
        h.answer(b"RESULT 1 0 0.1 0\nSTDOUT\n.\nSTDERR\n.\nOUTPUTS 1\n" + listing + b"END 1\n")
        g = h.relay.run(1, "true\n", timeout_s=2, max_output=1000, grace=1)
        assert g.output_error is not None and words in g.output_error
        assert not g.outputs and not g.spooled
        h.guest.settimeout(1)
        assert h.guest.recv(65536).split(b"\n")[-2] == b"DONE"  # no SEND went out
    finally:
        h.close()


def test_relay_gives_up_on_a_silent_guest() -> None:
    h = HostileGuest()
    try:
        t0 = time.monotonic()
        with pytest.raises(RelayError, match="did not answer in time"):
            h.relay.run(1, "true\n", timeout_s=1, max_output=1000, grace=1)
        assert time.monotonic() - t0 < 5
    finally:
        h.close()


@pytest.mark.queue
def test_direct_mode_agent_speaks_beanstalkd_itself(agent: AgentOnPty, beanstalkd: BeanstalkServer) -> None:
    """Direct mode: the agent reserves, runs, puts results and buries bad items with busybox nc."""
    with Beanstalk(beanstalkd.address) as bs:
        put_items(
            bs,
            "d",
            [
                Item(
                    "d1",
                    [
                        "sh",
                        "-c",
                        "printf '%s\\n' \"$1\"; echo oops >&2; cp in.txt $VMTOOL_OUTDIR/out.txt; exit 2",
                        "x",
                        'quote" back\\slash\ttab',
                    ],
                    {"in.txt": {"data": "aGkK"}},
                ),
                Item("d2", ["sh", "-c", "printf no-newline"]),
                Item(
                    "d3",
                    [
                        "sh",
                        "-c",
                        "for i in 1 2 3 4 5 6; do head -c 16000 /dev/urandom > $VMTOOL_OUTDIR/f$i; done",
                    ],
                    max_output=16384,
                ),
            ],
            ttr=30,
        )
        bs.put(b'{"v":1,"id":"bad","cmd":"not a list"}', tube="d")
    agent.host_sock.settimeout(1.0)
    relay = Relay(agent.host_sock, name="pty")
    relay.wait_hello(timeout=20)
    relay.send(f"DIRECT 127.0.0.1 {beanstalkd.port} d 1 2 vm-direct\n")
    assert agent.proc.wait(60) == 0  # the queue went idle: the agent stops (the image powers off)
    with Beanstalk(beanstalkd.address, watch="d.results") as rb:
        got = collect_results(rb, want=3, timeout=5)
    assert got.invalid == 0
    r1, r2 = got.results["d1"], got.results["d2"]
    assert (r1["status"], r1["exit"], r1["vm"]) == ("failed", 2, "vm-direct")
    assert r1["stdout"] == 'quote" back\\slash\ttab\n' and r1["stderr"] == "oops\n"
    assert r1["outputs"] == {"out.txt": "aGkK"}
    assert (r2["status"], r2["stdout"]) == ("ok", "no-newline")
    # Outputs too big for one beanstalkd job: the result comes back without them, marked truncated.
    assert got.results["d3"]["truncated"] is True and got.results["d3"]["outputs"] == {}
    with Beanstalk(beanstalkd.address) as bs:
        st = tube_stats(bs, "d")
    assert st["tubes"]["d"]["buried"] == 1 and st["tubes"]["d"]["ready"] == 0
    assert "no cmd" in st["buried"][0]["reason"]


@pytest.mark.queue
def test_direct_mode_agent_fetches_checks_and_puts_data(
    agent: AgentOnPty, beanstalkd: BeanstalkServer, http_server: HttpServer
) -> None:
    """Direct mode: the agent fetches http inputs itself (sha256 checked) and PUTs outputs to output_url."""
    data = os.urandom(200_000)
    (http_server.root / "in.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    up = http_server.url("up/{id}/")
    with Beanstalk(beanstalkd.address) as bs:
        put_items(
            bs,
            "dd",
            [
                Item(
                    "flow",
                    ["sh", "-c", "cat in.bin in.bin > $VMTOOL_OUTDIR/twice.bin"],
                    {"in.bin": {"url": http_server.url("in.bin"), "sha256": sha}},
                    output_url=up,
                ),
                Item("badsum", ["true"], {"in.bin": {"url": http_server.url("in.bin"), "sha256": "1" * 64}}),
                Item("missing", ["true"], {"x": {"url": http_server.url("nope.bin")}}),
                Item("s3in", ["true"], {"x": {"url": "s3://b/k"}}),
                Item("link", ["sh", "-c", "ln -s /etc/passwd $VMTOOL_OUTDIR/pw"], output_url=up),
                Item(
                    "big",
                    ["sh", "-c", "head -c 3000 /dev/zero > $VMTOOL_OUTDIR/z"],
                    output_url=up,
                    max_output_bytes=1000,
                ),
            ],
            ttr=30,
        )
    agent.host_sock.settimeout(1.0)
    relay = Relay(agent.host_sock, name="pty")
    relay.wait_hello(timeout=20)
    relay.send(f"DIRECT 127.0.0.1 {beanstalkd.port} dd 1 2 vm-direct\n")
    assert agent.proc.wait(60) == 0
    with Beanstalk(beanstalkd.address, watch="dd.results") as rb:
        got = collect_results(rb, want=6, timeout=5).results
    r = got["flow"]
    assert r["status"] == "ok", r
    assert r["outputs"] == {
        "twice.bin": {
            "url": http_server.url("up/flow/twice.bin"),
            "size": 2 * len(data),
            "sha256": hashlib.sha256(data + data).hexdigest(),
        }
    }
    assert http_server.uploads["/up/flow/twice.bin"] == data + data
    assert (r["bytes_in"], r["bytes_out"]) == (len(data), 2 * len(data))
    for iid, words in [
        ("badsum", "checksum mismatch"),
        ("missing", "cannot fetch"),
        ("s3in", "only http(s) inputs"),
        ("link", "symbolic link"),
        ("big", "max_output_bytes"),
    ]:
        assert got[iid]["status"] == "error" and words in got[iid]["error"], got[iid]
        assert got[iid]["outputs"] == {}
    assert set(http_server.uploads) == {"/up/flow/twice.bin"}
