"""What this host can run: libvirt's capabilities, its newest kernel, and whether KVM really works (the
only KVM prober).

An openable /dev/kvm proves nothing (on a host that is itself a VM, qemu aborts on an MSR or hangs in
the BIOS), so the probe boots the host's kernel with `-accel kvm` and no root filesystem: a working KVM
prints "Linux version" on the serial port within a few seconds and panics, and qemu exits
(-no-reboot, panic=-1). Anything else within the deadline - an abort, a hang, no output - means KVM is
unusable and vmtool falls back to TCG. The answer is cached, keyed by the host kernel, the qemu binary
and /dev/kvm, in the user's vmtool cache (vmtool.fsutil.user_cache_dir: /var/cache/vmtool for root,
a per-user directory otherwise, even when $HOME is not the user's); VMTOOL_KVM=0|1 overrides the probe
(tests, sites that know). A non-root user needs read-write access to /dev/kvm (the `kvm` group): without
it the probe says how to get it and vmtool falls back to TCG, unless VMTOOL_KVM=1 demands KVM.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from vmtool.errors import LaunchError, VmtoolError
from vmtool.fsutil import write_atomic
from vmtool.image.kernels import version_key
from vmtool.run import DEVNULL, PIPE, spawn

PROBE_DEADLINE = 10.0
PROBE_MARK = b"Linux version"


@dataclass(frozen=True)
class HostFacts:
    """What this host can run (libvirt's capabilities and the KVM probe); domain.policy renders for it."""

    emulator: str
    arch: str = "x86_64"
    machines: tuple[str, ...] = ("pc", "q35")
    domain_types: tuple[str, ...] = ("qemu",)
    kvm: bool = False
    kvm_reason: str = ""
    secmodels: tuple[str, ...] = ("dac",)  # libvirt's security drivers; qemu:///session has no 'dac'

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm else "tcg"


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    key: str
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"usable": self.usable, "reason": self.reason, "key": self.key}


def newest_host_kernel(boot: Path = Path("/boot")) -> tuple[Path, Path, str]:
    """(vmlinuz, initrd, version) of the newest kernel installed on this machine."""
    found = []
    for p in boot.glob("vmlinuz-*"):
        ver = p.name[len("vmlinuz-"):]
        initrd = boot / f"initrd.img-{ver}"
        if initrd.exists() and os.access(p, os.R_OK):
            found.append((version_key(ver), p, initrd, ver))
    if not found:
        raise VmtoolError(
            "no kernel with an initrd in /boot to boot the default image",
            hint="install the Debian package linux-image-amd64 (make deps)",
        )
    found.sort(key=lambda t: t[0])
    _, k, i, v = found[-1]
    return k, i, v


def cache_path() -> Path:
    if os.environ.get("VMTOOL_CACHE_DIR"):
        return Path(os.environ["VMTOOL_CACHE_DIR"]) / "kvm-probe.json"
    from vmtool.fsutil import user_cache_dir

    return user_cache_dir() / "kvm-probe.json"


def _no_access_reason() -> str:
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    return (f"/dev/kvm is not readable and writable by {user} (add the user to the group of /dev/kvm, "
            f"usually kvm: usermod -aG kvm {user})")


def probe_key(emulator: str) -> str:
    st = os.stat(emulator)
    kvm = "present" if os.path.exists("/dev/kvm") else "absent"
    return f"kernel={os.uname().release};qemu={emulator}:{st.st_size}:{int(st.st_mtime)};kvm={kvm}"


def _run_probe(emulator: str, kernel: Path, deadline: float) -> tuple[bool, str]:
    argv = [emulator, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "128", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 earlyprintk=serial"]
    proc = spawn(argv, stdout=PIPE, stderr=PIPE, stdin=DEVNULL, new_session=True)
    out = bytearray()
    err = bytearray()

    def pump(stream: Any, buf: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.extend(chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline
    while time.monotonic() < end and proc.poll() is None and PROBE_MARK not in out:
        time.sleep(0.05)
    booted = PROBE_MARK in out
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for t in threads:
        t.join(1)
    if booted:
        return True, "a test guest booted with -accel kvm"
    tail = err.decode(errors="replace").strip().splitlines()
    if proc.returncode not in (None, -9) and tail:
        return False, f"qemu -accel kvm failed: {tail[-1]}"
    return False, f"a test guest made no progress under -accel kvm within {deadline:.0f} s (hangs)"


def probe_kvm(emulator: str, *, refresh: bool = False, deadline: float = PROBE_DEADLINE) -> KvmProbe:
    """Whether KVM guests really run here; cached (see the module docstring)."""
    forced = os.environ.get("VMTOOL_KVM")
    if forced == "1" and os.path.exists("/dev/kvm") and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise LaunchError(f"VMTOOL_KVM=1 demands KVM, but {_no_access_reason()}",
                          hint="or unset VMTOOL_KVM to fall back to TCG")
    if forced in ("0", "1"):
        return KvmProbe(forced == "1", f"VMTOOL_KVM={forced} in the environment", "env", cached=True)
    if not os.path.exists("/dev/kvm"):
        return KvmProbe(False, "/dev/kvm does not exist", "no-dev-kvm", cached=True)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmProbe(False, _no_access_reason(), "no-access", cached=True)
    key = probe_key(emulator)
    path = cache_path()
    if not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return KvmProbe(bool(data["usable"]), str(data["reason"]), key, cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    kernel, _initrd, _ver = newest_host_kernel()
    usable, reason = _run_probe(emulator, kernel, deadline)
    result = KvmProbe(usable, reason, key)
    try:
        if os.geteuid() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            from vmtool.fsutil import private_dir

            private_dir(path.parent)
        write_atomic(path, json.dumps(result.to_dict(), indent=2) + "\n")
    except (OSError, VmtoolError):
        pass  # an unwritable cache only costs another probe next time
    return result


def parse_secmodels(xml: str) -> tuple[str, ...]:
    """The security drivers of a libvirt connection (qemu:///session has only 'none', no 'dac')."""
    root = etree.fromstring(xml.encode())
    return tuple(m.findtext("model") or "" for m in root.findall("host/secmodel"))


def parse_capabilities(xml: str, arch: str | None = None) -> tuple[str, tuple[str, ...], tuple[str, ...], str]:
    """(emulator, machine types incl. aliases, domain types, arch) for hvm guests of the host's arch."""
    root = etree.fromstring(xml.encode())
    arch = arch or root.findtext("host/cpu/arch") or os.uname().machine
    for guest in root.findall("guest"):
        if guest.findtext("os_type") != "hvm":
            continue
        a = guest.find("arch")
        if a is None or a.get("name") != arch:
            continue
        emulator = a.findtext("emulator") or ""
        machines: list[str] = []
        for m in a.findall("machine"):
            if m.text:
                machines.append(m.text.strip())
            if m.get("canonical"):
                machines.append(m.get("canonical", ""))
        types = tuple(d.get("type", "") for d in a.findall("domain"))
        return emulator, tuple(dict.fromkeys(machines)), types, arch
    raise LaunchError(f"libvirt on this host cannot run {arch} hvm guests",
                      hint="install qemu-system-x86 and restart libvirtd")


_facts: dict[str, HostFacts] = {}
_lock = threading.Lock()


def host_facts(uri: str, *, conn: Any = None) -> HostFacts:
    """Host facts for a libvirt URI, computed once per process (capabilities + the cached KVM probe)."""
    with _lock:
        if uri in _facts:
            return _facts[uri]
        from vmtool.launch.libvirtconn import connect, release

        own = conn is None
        if own:
            conn = connect(uri)
        try:
            caps = conn.getCapabilities()
        except Exception as e:  # libvirt.libvirtError
            raise LaunchError(f"cannot read libvirt capabilities from {uri}: {e}") from None
        finally:
            if own:
                release(uri)
        emulator, machines, types, arch = parse_capabilities(caps)
        if not emulator:
            raise LaunchError("libvirt names no qemu emulator for hvm guests", hint="install qemu-system-x86")
        kvm, reason = False, "libvirt offers no kvm domain type"
        if os.path.exists("/dev/kvm") and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            reason = _no_access_reason()  # qemu:///session lists no kvm type then: say how to get it
        if "kvm" in types or os.environ.get("VMTOOL_KVM") == "1":
            probe = probe_kvm(emulator)  # raises when VMTOOL_KVM=1 demands a KVM this user cannot open
            kvm, reason = probe.usable and "kvm" in types, probe.reason if "kvm" in types else reason
        facts = HostFacts(emulator=emulator, arch=arch, machines=machines, domain_types=types, kvm=kvm,
                          kvm_reason=reason, secmodels=parse_secmodels(caps))
        _facts[uri] = facts
        return facts
