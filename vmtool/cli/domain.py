"""`vmtool domain render`: rewrite a domain XML (or vmtool's template) for this host and slot."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vmtool.cli.output import add_json_flag, emit, warn
from vmtool.errors import DomainError

if TYPE_CHECKING:
    from vmtool.domain.policy import RenderOptions


def add_render_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `domain render` and `launch`."""
    p.add_argument("--manifest", type=Path, help="boot the kernel, initrd and command line of this build")
    p.add_argument("--disk", type=Path, action="append", default=[], metavar="OVERLAY",
                   help="a staged qcow2 overlay; repeat for more disks (vda, vdb, ...)")
    p.add_argument("--cpus", type=int, help="vCPUs to ask for (at most the slot's)")
    p.add_argument("--memory", type=int, metavar="MiB", help="guest memory to ask for (at most the slot's)")
    p.add_argument("--memory-limit", type=int, metavar="MiB",
                   help="memory limit of the VM's cgroup (default: guest memory + qemu's overhead)")
    p.add_argument("--machine-ad", type=Path, metavar="FILE",
                   help="the slot's machine ClassAd (default: $_CONDOR_MACHINE_AD)")
    p.add_argument("--uri", help="libvirt URI (default: qemu:///system for root; for other users "
                                 "qemu:///session, served by a private libvirtd vmtool starts and stops)")
    p.add_argument("--sandbox", type=Path, help="the job's directory (default: $_CONDOR_SCRATCH_DIR or .)")
    p.add_argument("--name", help="domain name (default: vmtool-<job id or pid>-<random>)")
    p.add_argument("--network", default="user",
                   help="'user' (user-mode networking, default), 'none', 'nat' (the VM's own network namespace "
                        "with NAT, accounting and --allow-net; root, see docs/launch.md), or a libvirt network name")
    p.add_argument("--graphics", action="store_true", help="keep VNC/SPICE graphics, bound to 127.0.0.1")
    p.add_argument("--console-log", type=Path, help="serial console file (default: SANDBOX/NAME.console.log)")
    p.add_argument("--append", action="append", default=[], metavar="ARG",
                   help="an extra kernel command-line argument (with --manifest)")
    p.add_argument("--channel", action="append", default=[], metavar="NAME=SOCKET",
                   help="a virtio-serial port NAME backed by a unix socket libvirt creates at SOCKET")


def sandbox_of(args: argparse.Namespace) -> Path:
    if args.sandbox is not None:
        return Path(args.sandbox)
    return Path(os.environ.get("_CONDOR_SCRATCH_DIR") or ".")


def channels_of(args: argparse.Namespace) -> tuple[tuple[str, Path], ...]:
    out = []
    for c in args.channel:
        name, sep, path = c.partition("=")
        if not sep or not name or not path:
            raise DomainError(f"--channel {c!r} is not NAME=SOCKET", hint="e.g. --channel org.vmtool.relay.0=relay.sock")
        out.append((name, Path(path).resolve()))
    return tuple(out)


def render_options_of(args: argparse.Namespace) -> RenderOptions:
    """The render options of `add_render_options`; the manifest is read here, once."""
    from vmtool import manifest
    from vmtool.domain.policy import BootFiles, RenderOptions

    boot = BootFiles.of(manifest.load(args.manifest)) if args.manifest is not None else None
    return RenderOptions(
        sandbox=sandbox_of(args), disks=tuple(args.disk), name=args.name, cpus=args.cpus, memory_mib=args.memory,
        memory_limit_mib=args.memory_limit, boot=boot, console_log=args.console_log, channels=channels_of(args),
        network=args.network, graphics=args.graphics, extra_cmdline=tuple(args.append),
    )


def _render(args: argparse.Namespace) -> int:
    from vmtool.domain.policy import render
    from vmtool.domain.slot import discover_slot
    from vmtool.fsutil import write_atomic
    from vmtool.launch.host import HostFacts

    if args.capabilities is not None:
        from vmtool.launch.host import parse_capabilities, probe_kvm

        try:
            caps = args.capabilities.read_text()
        except OSError as e:
            raise DomainError(f"cannot read {args.capabilities}: {e.strerror}") from None
        emulator, machines, types, arch = parse_capabilities(caps)
        if args.accel:
            kvm, why = args.accel == "kvm", f"--accel {args.accel}"
        else:
            probe = probe_kvm(emulator)
            kvm, why = probe.usable and "kvm" in types, probe.reason
        host = HostFacts(emulator, arch, machines, types, kvm, why)
    else:
        from vmtool.launch.host import host_facts
        from vmtool.launch.libvirtconn import default_uri

        host = host_facts(args.uri or default_uri())
        if args.accel:
            host = dataclasses.replace(host, kvm=args.accel == "kvm", kvm_reason=f"--accel {args.accel}")
    source = None
    if args.domain is not None:
        try:
            source = Path(args.domain).read_bytes() if args.domain != "-" else sys.stdin.buffer.read()
        except OSError as e:
            raise DomainError(f"cannot read {args.domain}: {e.strerror}") from None
    slot = discover_slot(machine_ad=args.machine_ad)
    opts = render_options_of(args)
    r = render(source, opts, host, slot)
    for w in r.warnings:
        warn(w)
    if args.output is not None:
        write_atomic(args.output, r.xml)
    data = {"name": r.name, "uuid": r.uuid, "cpus": r.cpus, "memory_mib": r.memory_mib,
            "memory_limit_mib": r.memory_limit_mib, "accel": r.accel, "kvm_reason": host.kvm_reason,
            "slot": r.slot.to_dict(), "console_log": str(r.console_log), "warnings": r.warnings,
            "changes": r.changes, "output": str(args.output) if args.output else None}
    if args.json:
        if args.output is None:
            data["xml"] = r.xml
        if args.print_diff:
            data["diff"] = r.diff()
        emit(args, data)
    elif args.print_diff:
        sys.stdout.write(r.diff(str(args.domain or "template"), str(args.output or "rendered")))
    elif args.output is None:
        sys.stdout.write(r.xml)
    else:
        emit(args, data, f"wrote {args.output} ({r.name}: {r.cpus} vCPU, {r.memory_mib} MiB, {r.accel})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("domain", help="libvirt domain XML for this host and slot")
    dsub = p.add_subparsers(dest="domain_command", metavar="SUBCOMMAND")
    r = dsub.add_parser("render", help="rewrite a domain XML (or vmtool's template) for this host and slot",
                        description="Rewrite a domain XML for this host and slot: sizes from the slot, "
                                    "the host's emulator and accelerator, staged overlays as disks, user "
                                    "networking, console to a file; hostile elements removed with a warning.")
    r.add_argument("domain", nargs="?", help="domain XML (virsh dumpxml); default: vmtool's template; - = stdin")
    add_render_options(r)
    r.add_argument("--capabilities", type=Path, metavar="FILE",
                   help="use this saved 'virsh capabilities' output instead of asking libvirt")
    r.add_argument("--accel", choices=("kvm", "tcg"), help="force the accelerator (default: probe KVM)")
    r.add_argument("--print-diff", action="store_true", help="print a unified diff against the input")
    r.add_argument("-o", "--output", type=Path, help="write the XML here (default: stdout)")
    add_json_flag(r)
    r.set_defaults(func=_render)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
