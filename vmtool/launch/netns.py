"""`--network nat`: one network namespace per VM, NAT to the host, per-VM byte accounting and egress policy.

The only module that creates namespaces, veths, taps or nftables tables (it needs root: CAP_NET_ADMIN
in the host's network namespace). The layout, for VM slot N (a /30 out of 100.64.0.0/16):

    guest eth0 10.0.2.15 --tap vmtN-t-- [namespace: 10.0.2.2 gw, 10.0.2.3 DNS/DHCP (dnsmasq)]
        --veth vmtN-n 100.64.a.b+2 / vmtN-h 100.64.a.b+1-- host --masquerade--> the host's networks

- The namespace is made by a holder process (`unshare --net sh`) reading from a pipe of vmtool's; when
  vmtool closes it or dies (even by SIGKILL) the holder kills dnsmasq and ends: the namespace then has
  no process left, and the kernel deletes it with the tap, the namespace end of the veth (so the host
  end too) and the namespace's nftables table.
- The host's table (`ip vmtool_nN`, masquerade of the namespace's one address) has the nftables
  `owner` flag and is held by an `nft -i` process that also dies with vmtool, so the kernel drops it.
- qemu (run by libvirtd in the host namespace) opens the tap there, while the domain is paused; the tap
  is then moved into the namespace (the open file keeps working) before the guest runs.
- A lock file per slot N, held while the VM runs, tells a later start which leftovers are orphans
  (a tap created just before a SIGKILL, before it was moved): `sweep()` removes them.

Accounting lives in the namespace's table, at its border (the veth): bytes out by destination and
bytes in by source, split by the LAN prefix set; the IP length of each packet is counted (no Ethernet
header). Guest packets the egress policy refuses, and unsolicited packets towards the guest, are
counted as dropped.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vmtool.errors import CommandError, LaunchError
from vmtool.run import DEVNULL, PIPE, Popen, TimeoutExpired, find_tool, run, spawn

LOCK_DIR = Path("/run/vmtool/net")
PREFIX = "vmt"
SLOTS = 16384  # /30 blocks in 100.64.0.0/16
LINK_BASE = ipaddress.IPv4Address("100.64.0.0")
GUEST_NET = ipaddress.IPv4Network("10.0.2.0/24")  # what qemu's user-mode networking gives a guest too
GATEWAY = "10.0.2.2"
RESOLVER = "10.0.2.3"
GUEST_ADDR = "10.0.2.15"
RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
COUNTERS = ("rx_lan", "rx_wan", "tx_lan", "tx_wan", "dropped")


class NetworkError(LaunchError):
    pass


@dataclass(frozen=True)
class Allow:
    """One `--allow-net CIDR[:PORT]` entry."""

    net: ipaddress.IPv4Network
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Allow:
        addr, _, port = text.partition(":")
        try:
            net = ipaddress.IPv4Network(addr, strict=False)
        except ValueError:
            raise NetworkError(f"--allow-net {text!r}: {addr!r} is not an IPv4 address or CIDR",
                               hint="e.g. --allow-net 192.0.2.10/32:9418 or --allow-net 10.1.0.0/16") from None
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise NetworkError(f"--allow-net {text!r}: port {port!r} is not 1-65535")
        return cls(net, int(port) if port else None)

    def __str__(self) -> str:
        return f"{self.net}" + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class NetOptions:
    """How a `--network nat` VM is connected, limited and counted."""

    allow: tuple[Allow, ...] = ()  # empty: every destination (but DNS only to vmtool's resolver)
    lan: tuple[ipaddress.IPv4Network, ...] = ()  # empty: RFC 1918 plus the host's own subnets
    counters: bool = True  # False only to measure what accounting costs (bench/launch.py)
    dhcp: bool = True  # dnsmasq answers DHCP and DNS in the namespace

    @staticmethod
    def parse_lan(text: str) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(text, strict=False)
        except ValueError:
            raise NetworkError(f"--lan-net {text!r} is not an IPv4 CIDR", hint="e.g. --lan-net 129.93.0.0/16") from None


@dataclass
class NetCounters:
    rx_lan: int = 0
    rx_wan: int = 0
    tx_lan: int = 0
    tx_wan: int = 0
    dropped: int = 0

    @property
    def rx(self) -> int:
        return self.rx_lan + self.rx_wan

    @property
    def tx(self) -> int:
        return self.tx_lan + self.tx_wan


def host_subnets() -> list[ipaddress.IPv4Network]:
    """The host's own IPv4 subnets (not loopback, not vmtool's own links)."""
    out = run(["ip", "-j", "-4", "addr", "show"]).stdout
    nets = []
    for link in json.loads(out or b"[]"):
        if link.get("ifname", "").startswith(PREFIX) or link.get("ifname") == "lo":
            continue
        for a in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def lan_prefixes(opts: NetOptions) -> list[ipaddress.IPv4Network]:
    if opts.lan:
        return list(opts.lan)
    nets = [ipaddress.IPv4Network(n) for n in RFC1918] + host_subnets()
    return list(ipaddress.collapse_addresses(nets))


def names(n: int) -> tuple[str, str, str]:
    """(host veth end, namespace veth end, tap) of slot n; 15 characters at most."""
    return f"{PREFIX}{n}-h", f"{PREFIX}{n}-n", f"{PREFIX}{n}-t"


def link_addrs(n: int) -> tuple[str, str]:
    base = int(LINK_BASE) + 4 * n
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def _links() -> set[str]:
    out = run(["ip", "-j", "link", "show"]).stdout
    return {link["ifname"] for link in json.loads(out or b"[]")}


def _take_lock(n: int) -> IO[str] | None:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    f = open(LOCK_DIR / f"{n}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _slot_of(ifname: str) -> int | None:
    if not ifname.startswith(PREFIX) or "-" not in ifname:
        return None
    num = ifname[len(PREFIX):].split("-", 1)[0]
    return int(num) if num.isdigit() else None


def sweep() -> list[str]:
    """Remove what a SIGKILLed vmtool may have left in the host namespace (taps not yet moved, veths of
    a namespace still held): every vmtN-* link whose slot lock nobody holds. Returns what was removed."""
    removed = []
    for ifname in sorted(_links()):
        n = _slot_of(ifname)
        if n is None:
            continue
        lock = _take_lock(n)
        if lock is None:
            continue  # a live vmtool owns it
        try:
            run(["ip", "link", "del", ifname], check=False)
            removed.append(ifname)
        finally:
            lock.close()
    return removed


def leftovers() -> list[str]:
    """vmtool's links and nftables tables visible in the host namespace (for tests and `--json` checks)."""
    found = [i for i in _links() if _slot_of(i) is not None]
    out = run(["nft", "list", "tables"], check=False).stdout.decode()
    found += [line.split()[-1] for line in out.splitlines() if line.split()[-1:] and
              line.split()[-1].startswith("vmtool_n")]
    return sorted(found)


def _ruleset(n: int, opts: NetOptions, lan: list[ipaddress.IPv4Network]) -> str:
    _, ns_if, tap = names(n)
    lan_set = ", ".join(str(p) for p in lan) if lan else "0.0.0.0/32"
    lines = [
        "table inet vmtool {",
        f"  set lan {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {lan_set} }} }}",
        *(f"  counter {c} {{ }}" for c in COUNTERS),
        "  chain input { type filter hook input priority 0; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
        f'    iifname "{tap}" udp dport {{ 53, 67 }} accept',
        f'    iifname "{tap}" tcp dport 53 accept',
        f'    iifname "{tap}" icmp type echo-request accept',
        f'    iifname "{tap}" meta nfproto ipv6 drop',  # neighbour discovery noise, no IPv6 offered
        '    counter name "dropped" drop',
        "  }",
        "  chain forward { type filter hook forward priority 0; policy drop;",
        f'    oifname "{tap}" ct state established,related accept',
        f'    iifname "{tap}" oifname "{ns_if}" meta nfproto ipv4 jump egress',
        '    counter name "dropped" drop',
        "  }",
        "  chain egress {",
        # DNS goes only to vmtool's resolver (which is local to the namespace, not forwarded)
        '    meta l4proto { tcp, udp } th dport 53 counter name "dropped" drop',
    ]
    if opts.allow:
        for a in opts.allow:
            if a.port is None:
                lines.append(f"    ip daddr {a.net} accept")
            else:
                lines.append(f"    ip daddr {a.net} meta l4proto {{ tcp, udp }} th dport {a.port} accept")
        lines.append('    counter name "dropped" drop')
    else:
        lines.append("    accept")
    lines += [
        "  }",
        "  chain postrouting { type nat hook postrouting priority srcnat;",
        f'    oifname "{ns_if}" masquerade',
        "  }",
    ]
    if opts.counters:
        lines += [
            # at the border: in before conntrack undoes the masquerade, out after it is applied
            "  chain count_in { type filter hook prerouting priority -300;",
            f'    iifname "{ns_if}" ip saddr @lan counter name "rx_lan" accept',
            f'    iifname "{ns_if}" meta nfproto ipv4 counter name "rx_wan"',
            "  }",
            "  chain count_out { type filter hook postrouting priority 300;",
            f'    oifname "{ns_if}" ip daddr @lan counter name "tx_lan" accept',
            f'    oifname "{ns_if}" meta nfproto ipv4 counter name "tx_wan"',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ensure_forwarding() -> bool:
    """Turn on IPv4 forwarding in the host namespace (NAT needs it); True if vmtool changed it."""
    p = Path("/proc/sys/net/ipv4/ip_forward")
    if p.read_text().strip() == "1":
        return False
    p.write_text("1\n")
    return True


HOLDER = 'pids=; while read -r p; do pids="$pids $p"; done; [ -n "$pids" ] && kill -9 $pids 2>/dev/null; exit 0'


def _pdeath(argv: list[str]) -> list[str]:
    # The child gets SIGKILL when the thread that started it ends, SIGKILL of vmtool included.
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


class VMNetwork:
    """One VM's namespace, links, tables and resolver; `close()` (or vmtool's death) removes them."""

    def __init__(self, n: int, lock: IO[str], opts: NetOptions) -> None:
        self.n = n
        self.opts = opts
        self.host_if, self.ns_if, self.tap = names(n)
        self.host_addr, self.ns_addr = link_addrs(n)
        self.lan = lan_prefixes(opts)
        self._lock: IO[str] | None = lock
        self._holder: Popen[bytes] | None = None
        self._nft: Popen[bytes] | None = None
        self._dnsmasq: Popen[bytes] | None = None
        self._last = NetCounters()
        self.attached = False
        self.notes: list[str] = []

    # -- set-up ---------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._holder is not None
        return self._holder.pid

    def _ns(self, argv: list[str], **kw: Any) -> Any:
        return run(["nsenter", "-t", str(self.pid), "-n", "--", *argv], **kw)

    def _create(self, uid: int, gid: int) -> None:
        # The holder is a shell in the new namespace reading pids from vmtool; at EOF (vmtool closed the
        # VM or died) it kills them (dnsmasq drops capabilities, which clears its parent-death signal).
        self._holder = spawn(["unshare", "--net", "--", "sh", "-c", HOLDER], stdin=PIPE, stderr=DEVNULL)
        end = time.monotonic() + 5
        host_ns = os.readlink("/proc/self/ns/net")
        while True:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/net") != host_ns:
                    break
            except OSError:
                pass
            if self._holder.poll() is not None or time.monotonic() > end:
                raise NetworkError("could not make a network namespace for the VM",
                                   hint="--network nat needs root (CAP_NET_ADMIN)")
            time.sleep(0.01)
        if _ensure_forwarding():
            self.notes.append("IPv4 forwarding was off on this host; vmtool turned it on for --network nat")
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
             "netns", str(self.pid)])
        run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        self._ns(["ip", "link", "set", "lo", "up"])
        self._ns(["ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if])
        self._ns(["ip", "link", "set", self.ns_if, "up"])
        self._ns(["ip", "route", "add", "default", "via", self.host_addr])
        self._ns(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self._ns(["nft", "-f", "-"], input=_ruleset(self.n, self.opts, self.lan).encode())
        self._host_table()
        # qemu opens the tap in the host namespace; it is moved into the VM's namespace by attach().
        run(["ip", "tuntap", "add", "mode", "tap", "name", self.tap, "user", str(uid), "group", str(gid)])

    def _host_table(self) -> None:
        table = f"vmtool_n{self.n}"
        self._nft = spawn(_pdeath(["nft", "-i"]), stdin=PIPE, stdout=DEVNULL, stderr=PIPE)
        assert self._nft.stdin is not None
        cmds = (f"add table ip {table} {{ flags owner; }}\n"
                f"add chain ip {table} nat {{ type nat hook postrouting priority srcnat; }}\n"
                f'add rule ip {table} nat ip saddr {self.ns_addr} oifname != "{self.host_if}" masquerade\n')
        self._nft.stdin.write(cmds.encode())
        self._nft.stdin.flush()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if "masquerade" in run(["nft", "list", "table", "ip", table], check=False).stdout.decode():
                return
            if self._nft.poll() is not None:
                break
            time.sleep(0.05)
        raise NetworkError(f"could not add the host's NAT table {table}",
                           hint="check that the kernel has nf_tables with the table 'owner' flag (Linux 5.12+)")

    def attach(self) -> None:
        """After qemu opened the tap (domain created paused): move it into the namespace, start DHCP/DNS."""
        run(["ip", "link", "set", self.tap, "netns", str(self.pid)])
        self._ns(["ip", "addr", "add", f"{GATEWAY}/24", "dev", self.tap])
        self._ns(["ip", "addr", "add", f"{RESOLVER}/24", "dev", self.tap])
        self._ns(["ip", "link", "set", self.tap, "up"])
        if self.opts.dhcp:
            pid_file = LOCK_DIR / f"{self.n}.dnsmasq.pid"
            self._dnsmasq = spawn(_pdeath([
                "nsenter", "-t", str(self.pid), "-n", "--", find_tool("dnsmasq"), "--keep-in-foreground",
                "--conf-file=/dev/null", f"--pid-file={pid_file}", f"--interface={self.tap}",
                "--bind-interfaces", "--except-interface=lo", "--no-hosts", "--leasefile-ro",
                f"--dhcp-range={GUEST_ADDR},{GUEST_ADDR},255.255.255.0,1h", "--dhcp-authoritative",
                f"--dhcp-option=option:router,{GATEWAY}", f"--dhcp-option=option:dns-server,{RESOLVER}",
                "--user=root",
            ]), stderr=DEVNULL)
            assert self._holder is not None and self._holder.stdin is not None
            self._holder.stdin.write(f"{self._dnsmasq.pid}\n".encode())
            self._holder.stdin.flush()
        self.attached = True

    # -- accounting ------------------------------------------------------------------------------------

    def counters(self) -> NetCounters:
        """The namespace's counters now (the last figures once the namespace is gone)."""
        if self._holder is None or self._holder.poll() is not None:
            return self._last
        if not self.opts.counters:
            return self._interface_totals()
        try:
            out = self._ns(["nft", "-j", "list", "counters", "table", "inet", "vmtool"]).stdout
        except CommandError:
            return self._last
        c = NetCounters()
        for item in json.loads(out).get("nftables", []):
            ctr = item.get("counter")
            if ctr and ctr.get("name") in COUNTERS:
                value = ctr["packets"] if ctr["name"] == "dropped" else ctr["bytes"]
                setattr(c, ctr["name"], int(value))
        self._last = c
        return c

    def _interface_totals(self) -> NetCounters:
        # Without vmtool's counters: the veth's own totals (Ethernet frames), all of it called WAN.
        try:
            text = Path(f"/proc/{self.pid}/net/dev").read_text()
        except OSError:
            return self._last
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == self.ns_if:
                f = rest.split()
                self._last = NetCounters(rx_wan=int(f[0]), tx_wan=int(f[8]))
        return self._last

    # -- tear-down -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything now (the kernel would also do it when vmtool dies); safe to call twice."""
        if self._holder is not None and self._holder.poll() is None:
            self.counters()
        if self._holder is not None and self._holder.stdin is not None:
            self._holder.stdin.close()  # the holder kills what it was told of, and ends
        for p in (self._dnsmasq, self._nft, self._holder):
            if p is not None and p.poll() is None:
                try:
                    p.wait(2 if p is self._holder else 0.01)
                except TimeoutExpired:
                    p.kill()
            if p is not None:
                p.wait()
                for s in (p.stdin, p.stderr):
                    if s is not None:
                        s.close()
        run(["ip", "link", "del", self.tap], check=False)  # only if it never reached the namespace
        run(["ip", "link", "del", self.host_if], check=False)
        _wait_gone([self.host_if, self.tap])
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _wait_gone(ifnames: list[str], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and set(ifnames) & _links():
        time.sleep(0.05)


def setup(opts: NetOptions, *, uid: int | None = None, gid: int | None = None) -> VMNetwork:
    """Sweep orphans, take a free slot, make the namespace, links and tables; the tap waits for qemu."""
    if os.geteuid() != 0:
        raise NetworkError("--network nat needs root here (network namespace, veth and nftables)",
                           hint="run as root, or use --network user")
    for tool in ("nft", "unshare", "nsenter", "setpriv", "ip") + (("dnsmasq",) if opts.dhcp else ()):
        find_tool(tool)
    sweep()
    existing = _links()
    for n in range(SLOTS):
        if any(i in existing for i in names(n)):
            continue
        lock = _take_lock(n)
        if lock is None:
            continue
        net = VMNetwork(n, lock, opts)
        try:
            net._create(os.getuid() if uid is None else uid, os.getgid() if gid is None else gid)
        except BaseException:
            net.close()
            raise
        return net
    raise NetworkError("no free network slot for the VM", hint=f"{SLOTS} VMs with --network nat run already")
