#!/usr/bin/env python3
"""Benchmark `vmtool launch` (issue 4): wall time from starting `vmtool launch` to the guest's poweroff
(the process's exit, cleanup included), over the wall time of `qemu-system-x86_64` booting the same
guest - same kernel, initrd, command line, qcow2 overlay, memory, NIC and accelerator - directly.
Limit 1.15. Median of 5 of each (BENCH_LAUNCH_RUNS), in ABBA order (v q q v v q) so load from
elsewhere hits both alike.

vmtool runs as a job would: in a fake slot cgroup (made here in each cgroup v1 hierarchy, removed
afterwards; the direct qemu runs in a sibling cgroup with the same CPU weight), through the system libvirtd (started here, and stopped afterwards, if none answers).
Exits 1 if the limit is not met. Scratch files go to $VMTOOL_BENCH_DIR (default /var/tmp).

`bench/launch.py --network` (issue 14, root): download throughput of a 256 MiB file into the guest
(an HTTP/1.0 request over busybox nc, timed in the guest from /proc/uptime) from an HTTP server in a network namespace made
here (tests/fixtures/netlab.py; no other address is used), three ways in one run: `--network nat`,
`--network nat` with vmtool's counters disabled (same namespace, NAT and policy, no accounting
chains), and user-mode networking. Prints nat/user and counted/uncounted; the accounting must cost
< 5% (counted/uncounted throughput >= 0.95). BENCH_NET_RUNS rounds (default 1), median. `--mib N`
downloads N MiB instead (the printed line says which size).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.libvirtd import FakeSlot, _v1_writable, make_guest, shared_libvirtd  # noqa: E402
from vmtool.run import DEVNULL, run, spawn  # noqa: E402

RUNS = int(os.environ.get("BENCH_LAUNCH_RUNS", "5"))
LIMIT = 1.15
MEMORY_MIB = 512
URI = "qemu:///system"
GUEST = {"10-hello": "#!/bin/sh\necho 'vmtool-bench: hello'\n"}


def overlay(base: Path, dest: Path) -> Path:
    dest.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(dest)])
    return dest


def time_vmtool(slot: FakeSlot | None, manifest: Path, img: Path, work: Path) -> float:
    ovl = overlay(img, work / "v.qcow2")
    argv = [sys.executable, "-m", "vmtool", "launch", "--manifest", str(manifest), "--disk", str(ovl),
            "--memory", str(MEMORY_MIB), "--uri", URI, "--sandbox", str(work), "--timeout", "600"]
    if slot is None:
        argv.append("--no-cgroup")
        cmd = argv
    else:
        cmd = ["sh", "-c", f"{slot.enter_script()}; exec \"$@\"", "sh", *argv]
    t0 = time.monotonic()
    proc = spawn(cmd, stdout=DEVNULL, stderr=DEVNULL, stdin=DEVNULL, cwd=ROOT)
    rc = proc.wait()
    wall = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"vmtool launch exited with {rc}")
    return wall


def time_qemu(slot: FakeSlot | None, emulator: str, accel: str, manifest: Path, img: Path, work: Path) -> float:
    from vmtool.manifest import load

    man = load(manifest)
    ovl = overlay(img, work / "q.qcow2")
    cpu = "host" if accel == "kvm" else "qemu64"
    argv = [emulator, "-accel", accel, "-cpu", cpu, "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", f"file:{work / 'q.console.log'}",
            "-kernel", str(man.kernel_path), "-initrd", str(man.initrd_path),
            "-append", f"{man.cmdline} console=ttyS0",
            "-drive", f"file={ovl},format=qcow2,if=virtio",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    # The anchor runs in a cgroup of its own beside the VM's (same slot, same cpu.shares), so on a loaded
    # machine both get the same CPU share; in the root group each qemu thread would count as a task.
    anchor = {h: d / f"anchor-{os.getpid()}" for h, d in slot.dirs.items()} if slot else {}
    for d in anchor.values():
        d.mkdir()
    if "cpu" in anchor:
        (anchor["cpu"] / "cpu.shares").write_text("1024")
    enter = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in anchor.values()) or "true"
    t0 = time.monotonic()
    try:
        run(["sh", "-c", f"{enter}; exec \"$@\"", "sh", *argv], timeout=600)
        wall = time.monotonic() - t0
    finally:
        for d in anchor.values():
            d.rmdir()
    if "reboot: Power down" not in (work / "q.console.log").read_text(errors="replace"):
        raise SystemExit("the direct qemu run did not reach poweroff")
    return wall


def main() -> int:
    base = Path(os.environ.get("VMTOOL_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="vmtool-bench-launch.", dir=base))
    try:
        with shared_libvirtd():
            return _bench(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(work: Path) -> int:
    from vmtool.launch.host import host_facts

    slot = None
    try:
        facts = host_facts(URI)
        manifest, img = make_guest(work, "bench", GUEST)
        why = _v1_writable()
        if why is None:
            slot = FakeSlot(f"vmtool-bench-slot-{os.getpid()}")
        else:
            print(f"note: no cgroup v1 slot ({why}); vmtool runs with --no-cgroup")
        v_times, q_times = [], []
        for i in range(RUNS):
            # ABBA order: load from elsewhere that drifts during the run hits both sides alike
            if i % 2 == 0:
                v_times.append(time_vmtool(slot, manifest, img, work))
                q_times.append(time_qemu(slot, facts.emulator, facts.accel, manifest, img, work))
            else:
                q_times.append(time_qemu(slot, facts.emulator, facts.accel, manifest, img, work))
                v_times.append(time_vmtool(slot, manifest, img, work))
        v, q = statistics.median(v_times), statistics.median(q_times)
        ratio = v / q
        print(f"launch: vmtool {v:.1f} s / qemu direct {q:.1f} s = {ratio:.2f} (limit {LIMIT}) "
              f"[{facts.accel}, median of {RUNS}; vmtool {' '.join(f'{t:.1f}' for t in v_times)}; "
              f"qemu {' '.join(f'{t:.1f}' for t in q_times)}]")
        return 0 if ratio <= LIMIT else 1
    finally:
        if slot is not None:
            slot.remove()


NET_MIB = 256
NET_RUNS = int(os.environ.get("BENCH_NET_RUNS", "1"))
NET_LIMIT = 0.95


def time_download(manifest: Path, img: Path, work: Path, network: str, counters: bool, mib: int) -> float:
    """MiB/s of the guest's download, as the guest timed it."""
    from vmtool import manifest as mf
    from vmtool.domain.policy import BootFiles, RenderOptions
    from vmtool.launch import LaunchSpec, launch
    from vmtool.launch.netns import NetOptions

    opts = RenderOptions(sandbox=work, boot=BootFiles.of(mf.load(manifest)), disks=(overlay(img, work / "n.qcow2"),),
                         memory_mib=MEMORY_MIB, network=network,
                         console_log=work / f"{network}-{'counted' if counters else 'uncounted'}.console.log")
    report = launch(LaunchSpec(opts, uri=URI, use_cgroup=False, timeout=1200, net=NetOptions(counters=counters)))
    text = report.console_log.read_text(errors="replace")
    for line in text.splitlines():
        if "vmtool-bench: download" in line:
            f = line.split("vmtool-bench: download")[1].split()
            got, t0, t1 = int(f[0]), float(f[1]), float(f[2])
            if got <= mib << 20:
                raise SystemExit(f"{network}: the guest got {got} bytes")
            if network == "nat" and counters and (report.stats.net_rx_bytes or 0) < got:
                raise SystemExit(f"nat: only {report.stats.net_rx_bytes} bytes counted")
            rate = mib / max(t1 - t0, 0.01)
            print(f"  {network}{'' if counters else ' (counters off)'}: {rate:.2f} MiB/s", flush=True)
            return rate
    raise SystemExit(f"{network}: no download in the guest:\n{text[-1500:]}")


def bench_network(work: Path, mib: int) -> int:
    from tests.fixtures.netlab import PORT, _make, _remove
    from tests.vm.test_launch_network import NET_UP

    lan = _make("b", f"10.202.{os.getpid() % 250 + 1}", work)
    try:
        get = ("read t0 _ < /proc/uptime; "
               f"n=$(printf 'GET /bytes/{mib << 20} HTTP/1.0\\r\\n\\r\\n' | nc {lan.addr} {PORT} | wc -c); "
               "read t1 _ < /proc/uptime; echo \"vmtool-bench: download $n $t0 $t1\"\n")
        # user-mode networking has no DHCP of vmtool's but the same addresses: udhcpc gets them from slirp
        manifest, img = make_guest(work, "netbench", {"10-net": NET_UP, "20-get": "#!/bin/sh\n" + get})
        nat, bare, user = [], [], []
        for i in range(NET_RUNS):
            # the order alternates, so a machine that gets busier or quieter during the run favours neither
            pair = [(nat, True), (bare, False)]
            for out, counters in pair if i % 2 == 0 else pair[::-1]:
                out.append(time_download(manifest, img, work, "nat", counters, mib))
            user.append(time_download(manifest, img, work, "user", True, mib))
        n, b, u = statistics.median(nat), statistics.median(bare), statistics.median(user)
        print(f"network: nat {n:.1f} MiB/s / user-mode {u:.1f} MiB/s = {n / u:.2f} "
              f"({mib} MiB into a TCG guest, median of {NET_RUNS})")
        print(f"network accounting: counted {n:.1f} MiB/s / uncounted {b:.1f} MiB/s = {n / b:.2f} "
              f"(limit >= {NET_LIMIT}) {'OK' if n / b >= NET_LIMIT else 'FAIL'}")
        return 0 if n / b >= NET_LIMIT else 1
    finally:
        _remove(lan)


def main_network(argv: list[str]) -> int:
    mib = NET_MIB
    if "--mib" in argv:  # a smaller download when a 256 MiB one does not fit a loaded machine's time
        i = argv.index("--mib")
        try:
            mib = int(argv[i + 1])
        except (IndexError, ValueError):
            print("bench/launch.py: --mib needs a whole number of MiB", file=sys.stderr)
            return 2
    base = Path(os.environ.get("VMTOOL_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="vmtool-bench-net.", dir=base))
    try:
        with shared_libvirtd():
            return bench_network(work, mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main_network(sys.argv[1:]) if "--network" in sys.argv[1:] else main())
