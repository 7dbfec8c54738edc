"""VMs for the worker, started through vmtool.launch (libvirt, qemu inside the slot's cgroup).

Each VM gets its own copy-on-write overlay on the image (so N VMs share one read-only base), a
virtio-serial channel `org.vmtool.relay.0` backed by a unix socket in its sandbox directory, and is
destroyed (overlay removed) when its context ends, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmtool.errors import QueueError
from vmtool.image import formats
from vmtool.launch.netns import NetOptions
from vmtool.queue.agent import RELAY_PORT_NAME
from vmtool.stage.cache import BASE_RE
from vmtool.stage.stage import make_overlay

if TYPE_CHECKING:
    from vmtool.manifest import Manifest

_LIBVIRT_LOCK = threading.Lock()


# The disk the VMs' overlays are made on: a build's root filesystem, or an overlay vmtool staged on a
# base in a cache (any cache: its base is named <sha256>.<format>, with its format, and stands alone).
# qemu-img info, under limits, reads its size, so making each overlay never opens it.
IMAGE_POLICY = formats.Policy(backing_roots=formats.ANYWHERE, backing_name=BASE_RE)


@dataclass(frozen=True)
class ImageRef:
    manifest: Manifest  # loaded once; its kernel, initrd and command line boot every VM
    base: Path  # the disk the per-VM overlays are made on
    base_format: str
    virtual_size: int  # given to make_overlay, so making an overlay never opens the base


def resolve_image(image: Path, *, manifest: Path | None = None) -> ImageRef:
    """`--image` is a manifest.json (its rootfs is the base) or an overlay/disk next to a manifest."""
    from vmtool import manifest as mf

    image = image.resolve()
    if not image.exists():
        raise QueueError(f"image {image} does not exist", hint="give the manifest.json of 'vmtool build'")
    if mf.is_manifest(image):
        m = mf.load(image)
        mpath, base, fmt = image, m.rootfs_path, m.rootfs.format
    else:
        mpath = manifest.resolve() if manifest else _find_manifest(image)
        m = mf.load(mpath)
        base, fmt = image, None
    if not m.agent:
        raise QueueError(
            f"the image of {mpath} has no vmtool guest agent",
            hint="rebuild it with 'vmtool build --agent relay'",
        )
    info = formats.check(base, fmt, IMAGE_POLICY, what=f"image {base}", error=QueueError)
    return ImageRef(m, base, info.format, info.virtual_size)


def _find_manifest(image: Path) -> Path:
    for cand in (image.parent / "manifest.json", image.with_suffix(".manifest.json")):
        if cand.exists():
            return cand
    raise QueueError(
        f"no manifest.json found for {image}",
        hint="give the build's manifest.json as --image, or pass --manifest with the overlay",
    )


class LaunchedVM:
    """Adapter from vmtool.launch's RunningVM to the worker's GuestVM."""

    def __init__(self, running: Any, relay_socket: Path) -> None:
        self.running = running
        self.name: str = running.name
        self.relay_socket = relay_socket

    def failure(self) -> str | None:
        """Why the guest is as good as dead though qemu runs (a kernel panic on its console), or None."""
        log = getattr(self.running, "console_log", None)
        if not log:
            return None
        try:
            with open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in tail.splitlines():
            if "Kernel panic - not syncing" in line or "can't execute '/sbin/init'" in line:
                return line.split("] ", 1)[-1].strip()[:200]
        return None

    def alive(self) -> bool:
        if not self.running.is_running() or self.failure() is not None:
            return False
        pid = getattr(self.running, "pid", None)
        if not pid:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def usage(self) -> dict[str, Any]:
        try:
            st = self.running.stats()
        except Exception:  # the domain may already be gone; usage is best effort
            return {}
        d: dict[str, Any] = st.to_dict()
        return d


@dataclass
class VMFactory:
    """Starts the worker's VMs: `with factory(slot) as vm: ...`."""

    image: ImageRef
    workdir: Path
    memory_mib: int | None = None
    cpus: int | None = None
    use_cgroup: bool = True
    cgroup_parent: str | None = None
    # Relay mode needs no guest network at all: without a NIC the guest cannot reach the queue (or
    # anything else); user-mode networking would let it reach the host's loopback at 10.0.2.2.
    network: str = "none"
    net: NetOptions = NetOptions()  # with network="nat" (vmtool.launch.netns)
    uri: str | None = None  # None: vmtool.launch's default (system for root, a private session otherwise)
    name_prefix: str = "vmtool-q"

    def __call__(self, slot: int) -> Any:
        return self._start(slot)

    @contextmanager
    def _start(self, slot: int) -> Iterator[LaunchedVM]:
        from vmtool.domain.policy import BootFiles, RenderOptions
        from vmtool.launch import LaunchSpec, start

        d = self.workdir / f"vm{slot}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        try:
            overlay = d / "root.qcow2"
            make_overlay(self.image.base, self.image.base_format, overlay, self.image.virtual_size)
            sock = d / "relay.sock"
            spec = LaunchSpec(
                render=RenderOptions(
                    sandbox=d,
                    boot=BootFiles.of(self.image.manifest),
                    disks=(overlay,),
                    cpus=self.cpus,
                    memory_mib=self.memory_mib,
                    name=f"{self.name_prefix}{os.getpid()}-{slot}-{os.urandom(2).hex()}",
                    channels=((RELAY_PORT_NAME, sock),),
                    network=self.network,
                ),
                timeout=None,
                uri=self.uri,
                net=self.net,
                use_cgroup=self.use_cgroup,
                cgroup_parent=self.cgroup_parent,
            )
            with _LIBVIRT_LOCK:
                running = start(spec)
            try:
                yield LaunchedVM(running, sock)
            finally:
                running.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
