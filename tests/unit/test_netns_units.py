"""--network nat without a VM: option parsing, the namespace's ruleset, the interface render, the
LAN default, the chirp call path, and (as root, with real links) the sweep of an orphaned tap."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest
from lxml import etree

from tests.unit.test_domain_render import SLOT, TCG, qcow2
from vmtool.cli.main import main
from vmtool.condor import chirp
from vmtool.domain.policy import NAT_TAP_PLACEHOLDER, RenderOptions, render
from vmtool.errors import CommandError
from vmtool.launch import netns
from vmtool.launch.vm import VMStats
from vmtool.run import run

pytestmark = pytest.mark.unit


def test_allow_parse() -> None:
    a = netns.Allow.parse("192.0.2.7:3128")
    assert a.net == ipaddress.IPv4Network("192.0.2.7/32") and a.port == 3128 and str(a) == "192.0.2.7/32:3128"
    b = netns.Allow.parse("10.1.2.3/16")
    assert b.net == ipaddress.IPv4Network("10.1.0.0/16") and b.port is None
    for bad in ("nothing", "10.0.0.0/8:0", "10.0.0.0/8:http", "10.0.0.0/8:70000", "::1"):
        with pytest.raises(netns.NetworkError):
            netns.Allow.parse(bad)
    with pytest.raises(netns.NetworkError):
        netns.NetOptions.parse_lan("campus")


def test_ruleset_counts_and_policy() -> None:
    lan = [ipaddress.IPv4Network("10.0.0.0/8")]
    rs = netns._ruleset(3, netns.NetOptions(allow=(netns.Allow.parse("10.9.0.1:8080"),)), lan)
    assert 'oifname "vmt3-n" ip daddr @lan counter name "tx_lan"' in rs
    assert 'iifname "vmt3-n" ip saddr @lan counter name "rx_lan"' in rs
    assert "ip daddr 10.9.0.1/32 meta l4proto { tcp, udp } th dport 8080 accept" in rs
    egress = rs.split("chain egress {")[1].split("}\n")[0]
    # DNS is refused before any allow rule, and whatever is not allowed is dropped and counted
    assert egress.index("th dport 53") < egress.index("10.9.0.1")
    assert egress.rstrip().endswith('counter name "dropped" drop')
    open_rs = netns._ruleset(3, netns.NetOptions(counters=False), lan)
    assert "count_in" not in open_rs and "rx_lan\" accept" not in open_rs
    assert open_rs.split("chain egress {")[1].split("}\n")[0].rstrip().endswith("accept")
    if os.geteuid() == 0 and (Path("/usr/sbin/nft").exists()):
        # the kernel accepts it (checked in a throw-away namespace, nothing applied to this host)
        run(["unshare", "--net", "nft", "-c", "-f", "-"], input=rs.encode())


def test_lan_default_and_names() -> None:
    lan = netns.lan_prefixes(netns.NetOptions())
    for p in netns.RFC1918:
        assert any(ipaddress.IPv4Network(p).subnet_of(n) for n in lan)
    assert netns.lan_prefixes(netns.NetOptions(lan=(ipaddress.IPv4Network("129.93.0.0/16"),))) == [
        ipaddress.IPv4Network("129.93.0.0/16")]
    assert all(len(n) <= 15 for n in netns.names(netns.SLOTS - 1))
    assert netns.link_addrs(0) == ("100.64.0.1", "100.64.0.2")
    assert netns.link_addrs(netns.SLOTS - 1) == ("100.64.255.253", "100.64.255.254")
    assert netns._slot_of("vmt12-t") == 12 and netns._slot_of("eth0") is None and netns._slot_of("vmtx-h") is None


def test_render_nat_interface(tmp_path: Path) -> None:
    ovl = qcow2(tmp_path / "root.qcow2")
    for tap, want in ((None, NAT_TAP_PLACEHOLDER), ("vmt7-t", "vmt7-t")):
        r = render(None, RenderOptions(sandbox=tmp_path, disks=(ovl,), network="nat", tap=tap, seed=1), TCG, SLOT)
        nics = etree.fromstring(r.xml.encode()).findall("./devices/interface")
        assert len(nics) == 1
        assert nics[0].get("type") == "ethernet"
        t = nics[0].find("target")
        assert t is not None and t.get("dev") == want and t.get("managed") == "no"


def test_cli_refuses_net_options_without_nat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["launch", "--manifest", str(tmp_path / "m.json"), "--allow-net", "10.0.0.0/8"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--network nat" in err and "Traceback" not in err
    rc = main(["launch", "--manifest", str(tmp_path / "m.json"), "--network", "nat", "--allow-net", "bad"])
    assert rc != 0 and "is not an IPv4 address" in capsys.readouterr().err


def test_chirp_attributes_and_missing_binary() -> None:
    st = VMStats(net_rx_lan_bytes=5, net_rx_wan_bytes=6, net_tx_lan_bytes=7, net_tx_wan_bytes=8,
                 net_dropped_packets=1)
    assert chirp.attributes(st) == {"NetworkIncomingInternal": 5, "NetworkIncomingExternal": 6,
                                    "NetworkOutgoingInternal": 7, "NetworkOutgoingExternal": 8,
                                    "NetworkDroppedPackets": 1}
    assert chirp.attributes(VMStats()) == {}
    c = chirp.Chirper(chirp=None)
    c.chirp = None
    note = c.update(st)
    assert note is not None and "condor_chirp not found" in note
    assert c.update(st) is None  # said once


@pytest.mark.skipif(chirp.find_chirp() is None, reason="condor_chirp is not installed (the condor tier runs it)")
def test_chirp_outside_a_job_fails_clearly() -> None:
    # Outside a job (no .chirp.config) the real condor_chirp refuses: one warning, no exception
    exe = chirp.find_chirp()
    assert exe is not None
    with pytest.raises(CommandError):
        chirp.set_job_attrs({"NetworkDroppedPackets": 1}, exe)
    c = chirp.Chirper(chirp=exe)
    note = c.update(VMStats(net_dropped_packets=1), final=True)
    assert note is not None and note.startswith("--chirp:")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a tap")
def test_sweep_removes_orphaned_tap_only() -> None:
    n = netns.SLOTS - 2
    tap = netns.names(n)[2]
    run(["ip", "tuntap", "add", "mode", "tap", "name", tap])
    held = netns._take_lock(n - 1)
    held_tap = netns.names(n - 1)[2]
    run(["ip", "tuntap", "add", "mode", "tap", "name", held_tap])
    try:
        removed = netns.sweep()
        assert tap in removed and held_tap not in removed
        assert tap not in netns._links() and held_tap in netns._links()
    finally:
        run(["ip", "link", "del", held_tap], check=False)
        run(["ip", "link", "del", tap], check=False)
        if held is not None:
            held.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_setup_and_close_leave_nothing() -> None:
    net = netns.setup(netns.NetOptions())
    try:
        found = netns.leftovers()
        assert net.host_if in found and net.tap in found and f"vmtool_n{net.n}" in found
        assert net.counters() == netns.NetCounters()
    finally:
        net.close()
    end = time.monotonic() + 5
    while netns.leftovers() and time.monotonic() < end:
        time.sleep(0.1)
    assert net.host_if not in netns.leftovers() and f"vmtool_n{net.n}" not in netns.leftovers()
