"""Run one VM through libvirt, inside the job's (slot's) cgroup, and report what it used.

Public API (used by `vmtool launch` and by the queue worker, which may run 1-2 VMs at once in one slot):

    from vmtool import manifest
    from vmtool.domain.policy import BootFiles, RenderOptions
    from vmtool.launch import LaunchSpec, start, launch, ExitReason

    spec = LaunchSpec(
        render=RenderOptions(                   # the domain (vmtool.domain.policy renders it)
            sandbox=Path("sandbox"),            # console log, sockets and report live here
            boot=BootFiles.of(manifest.load(Path("build/manifest.json"))),  # direct kernel boot from a
                                                #   build; None with a domain XML that boots itself
            disks=(Path("sandbox/root.qcow2"),),  # staged overlays, in target order (vda, vdb, ...)
            cpus=None, memory_mib=None,         # None: from the slot (_CONDOR_MACHINE_AD) or the host
            memory_limit_mib=None,              # the VM cgroup's limit; None: guest memory + qemu overhead
            name=None,                          # None: "vmtool-<pid>-<random>" (unique per job)
            channels=(("org.vmtool.relay.0", Path("sandbox/relay0.sock")),),  # virtio-serial <-> unix socket
            console_log=None,                   # None: sandbox/<name>.console.log
            extra_cmdline=("vmtool.job=42",),   # appended to the kernel command line (manifest boot)
            network="user",                     # "user", "none" or a libvirt network name
            graphics=False,                     # keep graphics on 127.0.0.1
        ),
        domain_xml=None,                        # a domain XML from elsewhere (rendered for this host)
        timeout=3600.0,                         # seconds; None = no limit
        uri=None,                               # None: qemu:///system for root, else qemu:///session
                                                #   served by a private libvirtd this process starts
        use_cgroup=True,                        # False = --no-cgroup (VM stays where libvirt puts it)
        cgroup_parent=None,                     # None: the job's own cgroup (/proc/self/cgroup); or a
                                                #   path relative to the hierarchy roots
        machine_ad=None,                        # slot ad other than the environment's
        grace=30.0,                             # seconds between ACPI shutdown and destroy
    )

    with start(spec) as vm:                     # RunningVM; domain is running, qemu is in our cgroup
        vm.pid, vm.name, vm.console_log, vm.xml, vm.warnings
        reason = vm.wait(timeout=None, stop=ev) # -> ExitReason (POWEROFF, TIMEOUT, MEMORY, CRASHED, SIGNALLED)
                                                #   timeout or ev.set(): shutdown(grace) first
        vm.shutdown(grace=30)                   # ACPI request, destroy after `grace` seconds
        vm.destroy()
        vm.stats()                              # -> VMStats: cpu_seconds, peak_memory_bytes, disk/net bytes
        vm.is_running()                         # False once libvirt reported the domain stopped
    # on leaving the block: domain destroyed if still there, cgroup removed, session daemon stopped.
    # vm.cgroup_mode: moved (root), delegated (an owned cgroup v2 subtree), inherited, none

    report = launch(spec, stop=threading.Event())  # whole run for the CLI -> LaunchReport (.to_dict())

For a unix-socket channel, libvirt creates (binds) the socket; connect to it after start() returns.
In the guest the port appears as /dev/vportNpM whose /sys/class/virtio-ports/*/name is the channel name.

ExitReason.X.exit_code is what `vmtool launch` exits with (0, 124, 5, 4, 143; docs/launch.md).
The domain is transient, started paused and with AUTODESTROY (if the process dies, libvirt destroys it).

Modules: `host` (HostFacts: libvirt capabilities, the host's kernel, the KVM probe and its cache), `cgroups` (the only writer of
/sys/fs/cgroup), `vm` (LaunchSpec, RunningVM, start, launch), `libvirtconn` (connections, the private session daemon). The domain XML itself is made by
`vmtool.domain` (`render`).
"""

from __future__ import annotations

from vmtool.launch.vm import ExitReason, LaunchReport, LaunchSpec, RunningVM, VMStats, launch, start

__all__ = ["ExitReason", "LaunchReport", "LaunchSpec", "RunningVM", "VMStats", "launch", "start"]
