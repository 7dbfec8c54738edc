"""`--network nat` with real parts: a busybox guest (TCG) behind its own network namespace, downloading
from a "LAN" and a "WAN" HTTP server that live in namespaces the test made (tests/fixtures/netlab.py);
no other address is ever used. Three boots, assertions combined:

- A: the API, no policy: the guest gets its address from vmtool's DHCP, downloads N bytes from each
  server and powers off; the report's LAN and WAN bytes are within 2% of what each server sent,
  nothing is dropped; afterwards no namespace, link or nftables table of vmtool is left.
- B: the CLI with --allow-net to the LAN server only: the LAN download works, the WAN server gets no
  request and a DNS query to it goes nowhere; both are counted as dropped; SIGTERM ends the run
  (exit 143, a full report) and nothing is left.
- C: the CLI killed with SIGKILL while the guest runs: the kernel removes the namespace, tap, veths and
  both nftables tables (the holders die with vmtool); nothing is left without any sweep.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.libvirtd import make_guest, overlay
from tests.fixtures.netlab import PORT, NetLab, Server, netlab  # noqa: F401 - fixture
from vmtool import manifest as mf
from vmtool.domain.policy import BootFiles, RenderOptions
from vmtool.launch import ExitReason, LaunchSpec, launch, netns
from vmtool.run import DEVNULL, PIPE, Popen, spawn

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

N = 3 << 20

NET_UP = """#!/bin/sh
for i in /sys/class/net/*; do n=$(basename $i); [ "$n" != lo ] && IF=$n; done
echo "vmtool-test: nic $IF"
cat > /tmp/dhcp.sh <<'S'
#!/bin/sh
[ "$1" = bound ] || exit 0
ifconfig $interface $ip netmask $subnet up
route add default gw $router
echo "vmtool-test: lease $ip router $router dns $dns"
S
chmod +x /tmp/dhcp.sh
ip link set $IF up
udhcpc -i $IF -q -n -t 10 -T 2 -s /tmp/dhcp.sh
"""


def _fetch(server: Server, n: int, tag: str) -> str:
    # busybox's static wget crashes in this guest; a raw HTTP/1.0 request over nc does the same
    return (f"n=$(printf 'GET /bytes/{n} HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {server.addr} {PORT} | wc -c); "
            f"if [ \"$n\" -gt {n} ]; then echo \"vmtool-test: {tag} got body\"; "
            f"else echo \"vmtool-test: {tag} failed ($n)\"; fi\n")


def _guest(d: Path, name: str, body: str) -> tuple[Path, Path]:
    return make_guest(d, name, {"10-net": NET_UP, "20-test": "#!/bin/sh\n" + body})


def _wait_console(path: Path, text: str, proc: Popen[bytes] | None, timeout: float = 240) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = path.read_text(errors="replace")
        except OSError:
            got = ""
        if text in got:
            return got
        assert proc is None or proc.poll() is None, "vmtool ended early"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on the console")


def _nothing_left(timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while netns.leftovers() and time.monotonic() < end:
        time.sleep(0.2)
    assert netns.leftovers() == []


def _cli(args: list[str]) -> Popen[bytes]:
    return spawn([sys.executable, "-m", "vmtool", "launch", *args], stdout=PIPE, stderr=PIPE, stdin=DEVNULL)


def test_a_lan_wan_accounting(libvirt_uri: str, netlab: NetLab, tmp_path: Path) -> None:  # noqa: F811
    body = _fetch(netlab.lan, N, "lan") + _fetch(netlab.wan, N, "wan")
    manifest, img = _guest(tmp_path, "fetch", body)
    lan0, wan0 = netlab.lan.sent(), netlab.wan.sent()
    opts = RenderOptions(sandbox=tmp_path, boot=BootFiles.of(mf.load(manifest)),
                         disks=(overlay(img, tmp_path / "a.qcow2"),), memory_mib=512, network="nat")
    spec = LaunchSpec(opts, uri=libvirt_uri, use_cgroup=False, timeout=300,
                      net=netns.NetOptions(lan=(netns.NetOptions.parse_lan("10.201.0.0/16"),)))
    report = launch(spec)
    console = report.console_log.read_text(errors="replace")
    assert report.reason is ExitReason.POWEROFF, (report.detail, console[-2000:])
    assert "vmtool-test: lease 10.0.2.15 router 10.0.2.2 dns 10.0.2.3" in console
    assert "vmtool-test: lan got body" in console and "vmtool-test: wan got body" in console, console[-2000:]
    lan, wan = netlab.lan.sent() - lan0, netlab.wan.sent() - wan0
    st = report.stats
    assert lan > N and wan > N
    assert st.net_rx_lan_bytes is not None and st.net_rx_wan_bytes is not None
    assert abs(st.net_rx_lan_bytes - lan) <= 0.02 * lan, (st, lan)
    assert abs(st.net_rx_wan_bytes - wan) <= 0.02 * wan, (st, wan)
    # requests and ACKs went out, each to its own side; totals are the sums
    assert 0 < (st.net_tx_lan_bytes or 0) < lan // 4 and 0 < (st.net_tx_wan_bytes or 0) < wan // 4
    assert st.net_rx_bytes == st.net_rx_lan_bytes + st.net_rx_wan_bytes
    assert st.net_tx_bytes == (st.net_tx_lan_bytes or 0) + (st.net_tx_wan_bytes or 0)
    assert st.net_dropped_packets == 0
    d = report.to_dict()
    assert d["net_rx_lan_bytes"] == st.net_rx_lan_bytes and d["net_dropped_packets"] == 0
    _nothing_left()


def test_b_allow_net_drops_and_sigterm(libvirt_uri: str, netlab: NetLab, tmp_path: Path) -> None:  # noqa: F811
    body = (_fetch(netlab.lan, N, "lan") + _fetch(netlab.wan, N, "wan")
            + f"nslookup vmtool.test {netlab.wan.addr} >/dev/null 2>&1 || echo 'vmtool-test: dns failed'\n"
            + "echo 'vmtool-test: policy done'\nsleep 600\n")
    manifest, img = _guest(tmp_path, "policy", body)
    wan0 = netlab.wan.sent()
    report = tmp_path / "report.json"
    console = tmp_path / "b.console.log"
    proc = _cli(["--manifest", str(manifest), "--disk", str(overlay(img, tmp_path / "b.qcow2")),
                 "--sandbox", str(tmp_path), "--uri", libvirt_uri, "--no-cgroup", "--memory", "512",
                 "--console-log", str(console), "--network", "nat", "--grace", "2",
                 "--allow-net", f"{netlab.lan.addr}/32:8080", "--report", str(report), "--json"])
    text = _wait_console(console, "vmtool-test: policy done", proc, timeout=400)
    assert "vmtool-test: lan got body" in text and "vmtool-test: wan failed" in text, text[-2000:]
    assert "vmtool-test: dns failed" in text
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    data = json.loads(report.read_text())
    assert data == json.loads(out)
    assert data["exit_reason"] == "signalled"
    assert netlab.wan.sent() == wan0  # nothing reached the WAN server
    assert data["net_rx_lan_bytes"] > N and data["net_rx_wan_bytes"] == 0 and data["net_tx_wan_bytes"] == 0
    assert data["net_dropped_packets"] >= 2  # the WAN SYN (and its retries) and the DNS query
    assert data["net_rx_bytes"] == data["net_rx_lan_bytes"] and data["net_tx_bytes"] == data["net_tx_lan_bytes"]
    _nothing_left()


def test_c_sigkill_leaves_nothing(libvirt_uri: str, netlab: NetLab, tmp_path: Path) -> None:  # noqa: F811
    manifest, img = _guest(tmp_path, "idle", "sleep 600\n")
    console = tmp_path / "c.console.log"
    proc = _cli(["--manifest", str(manifest), "--disk", str(overlay(img, tmp_path / "c.qcow2")),
                 "--sandbox", str(tmp_path), "--uri", libvirt_uri, "--no-cgroup", "--memory", "512",
                 "--console-log", str(console), "--network", "nat"])
    _wait_console(console, "vmtool-test: lease", proc, timeout=400)
    assert netns.leftovers()  # the VM's host-side veth and NAT table exist while it runs
    proc.kill()
    proc.communicate(timeout=30)
    _nothing_left()
