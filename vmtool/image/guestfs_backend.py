"""The guestfs backend: one libguestfs appliance per image, for root filesystems vmtool cannot change
natively (xfs, btrfs), or on request.

The disk (raw view, read-only) is drive 1 and a new sparse file sized like the root volume is drive 2;
`copy_device_to_device(sparse=True)` copies the root volume into it, which is then relabelled, mounted
(xfs with nouuid), and edited. Guest paths are resolved by vmtool.image.guesttree against the mounted
tree inside the appliance, never on the host. KVM is probed cheaply first: /dev/kvm can exist and still
not run guests (nested VMs), and libguestfs does not fall back to TCG by itself.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmtool.errors import CommandError, ImageError, VmtoolError
from vmtool.image import fstab as fstabmod
from vmtool.image.guesttree import S_IFDIR, S_IFMT, GuestTree
from vmtool.image.inspect import (
    DiskLayout,
    Kernel,
    Volume,
    choose_kernel,
    find_boot,
    list_kernels,
    read_fstab,
)
from vmtool.run import DEVNULL, TimeoutExpired, run, spawn

log = logging.getLogger("vmtool.image.guestfs")

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"


@functools.lru_cache(maxsize=1)
def kvm_usable() -> tuple[bool, str]:
    """(usable, why): start a paused qemu with KVM and -cpu host, as libguestfs would, and see if it lives."""
    forced = os.environ.get("VMTOOL_KVM")
    if forced in ("0", "1"):
        return forced == "1", f"VMTOOL_KVM={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    try:
        proc = spawn(
            [
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-M",
                "pc",
                "-nodefaults",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "none",
                "-S",
            ],
            stdout=DEVNULL,
            stderr=DEVNULL,
        )
    except VmtoolError as e:
        return False, e.message
    try:
        rc = proc.wait(timeout=1.5)
    except TimeoutExpired:
        proc.kill()
        proc.wait()
        return True, "a KVM guest with -cpu host starts"
    return False, f"qemu with KVM and -cpu host exits at once (status {rc}); nested virtualisation?"


def _handle() -> Any:
    try:
        import guestfs  # lazy: Debian's python3-guestfs, not on PyPI
    except ImportError:
        raise VmtoolError(
            "the guestfs backend needs the libguestfs Python binding",
            hint="install the Debian package python3-guestfs and use a venv with "
            "--system-site-packages (make deps)",
        ) from None
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    ok, why = kvm_usable()
    if not ok:
        log.info("KVM is not usable (%s): the libguestfs appliance runs under TCG (slower)", why)
        g.set_backend_settings(["force_tcg"])
    return g


def _launch(g: Any) -> None:
    t = time.monotonic()
    try:
        g.launch()
    except RuntimeError as e:
        raise VmtoolError(
            f"the libguestfs appliance did not start: {str(e).splitlines()[0]}",
            hint="run libguestfs-test-tool; or use --backend native for ext2/3/4 roots",
        ) from None
    log.info("libguestfs appliance up in %.1f s", time.monotonic() - t)


class GuestfsReader:
    """FsReader over the appliance's mounted tree (which mirrors the guest's namespace)."""

    def __init__(self, g: Any, name: str) -> None:
        self.g = g
        self.name = name

    def lstat(self, path: str) -> tuple[int, int, int] | None:
        try:
            st = self.g.lstatns(path)
        except RuntimeError:
            return None
        return int(st["st_ino"]), int(st["st_mode"]), int(st["st_size"])

    def readlink(self, path: str) -> str:
        return str(self.g.readlink(path))

    def listdir(self, path: str) -> list[tuple[str, int]]:
        out = []
        for name in self.g.ls(path):
            st = self.lstat(path.rstrip("/") + "/" + name)
            if st is not None:
                out.append((str(name), st[1]))
        return out

    def read(self, path: str) -> bytes:
        st = self.lstat(path)
        if st is None or st[2] > 64 << 20:
            raise ImageError(f"{path} in {self.name} is missing or too large")
        data = self.g.read_file(path)
        return data if isinstance(data, bytes) else str(data).encode()


def _device(g: Any, v: Volume) -> str:
    if v.kind == "partition" and v.partition is not None:
        return f"/dev/sda{v.partition.number}"
    if v.kind == "lv" and v.lv is not None:
        return f"/dev/{v.lv.vg}/{v.lv.name}"
    return "/dev/sda"


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not path.startswith("/") or ".." in parts or not parts:
        raise ImageError(f"guest path {path!r} must be absolute without '..'")
    return "/" + "/".join(parts)


def _write_dirs(g: Any, norm: str) -> None:
    """Make the missing parent directories of `norm`, refusing symlinks on the way."""
    r = GuestfsReader(g, "root filesystem")
    cur = ""
    for comp in norm.split("/")[1:-1]:
        cur += "/" + comp
        st = r.lstat(cur)
        if st is None:
            g.mkdir(cur)
            g.chmod(0o700 if comp == ".ssh" else 0o755, cur)
            g.chown(0, 0, cur)
        elif st[1] & S_IFMT != S_IFDIR:
            raise ImageError(
                f"{cur} in the image is not a directory (a symlink or a file)",
                hint="vmtool does not write through symlinks in the image",
            )
    st = r.lstat(norm)
    if st is not None:
        if st[1] & S_IFMT == S_IFDIR:
            raise ImageError(f"{norm} is a directory in the image", hint="remove it from the image first")
        g.rm(norm)


def _write(g: Any, files: dict[str, tuple[bytes, int]]) -> None:
    for gpath, (content, mode) in sorted(files.items()):
        norm = _norm(gpath)
        _write_dirs(g, norm)
        g.write(norm, content)
        g.chmod(mode & 0o7777, norm)
        g.chown(0, 0, norm)


def build(
    layout: DiskLayout,
    rootfs: Path,
    tmp: Path,
    *,
    label: str,
    ssh_keys: bytes,
    prepare: Callable[
        [GuestTree, Callable[[str], bytes | None]],
        tuple[dict[str, tuple[bytes, int]], dict[str, str], dict[str, bytes]],
    ],
    kernel_version: str | None,
    config_dir: Path | None = None,
) -> tuple[Kernel, Path, Path, str | None, str]:
    """prepare(tree, existing_label): the files, symlinks and SELinux labels to write, decided once the
    guest's tree can be read."""
    root = layout.root
    assert root is not None
    if root.unsupported:
        raise ImageError(f"{root.name} cannot be used: {root.unsupported}")
    with open(rootfs, "xb") as f:
        f.truncate(root.size)
    g = _handle()
    try:
        g.add_drive_opts(os.fspath(layout.raw), format="raw", readonly=True)
        g.add_drive_opts(os.fspath(rootfs), format="raw", readonly=False)
        _launch(g)
        if any(v.kind == "lv" for v in (root, layout.boot) if v is not None) or layout.vgs:
            g.vg_activate_all(True)
        g.copy_device_to_device(_device(g, root), "/dev/sdb", sparse=True)
        if root.fstype != "xfs":  # xfs: xfs_admin is not in Debian's appliance; labelled on the host below
            try:
                g.set_label("/dev/sdb", label)
            except RuntimeError as e:
                raise ImageError(
                    f"cannot set label {label!r} on the {root.fstype} root: {str(e).splitlines()[0]}",
                    hint="give another --label",
                ) from None
        mopts = "nouuid" if root.fstype == "xfs" else ""
        g.mount_options(mopts, "/dev/sdb", "/")
        reader = GuestfsReader(g, f"root filesystem ({root.name})")
        tree = GuestTree({"/": reader})
        before = read_fstab(tree)
        if not layout.fstab_read:
            layout.fstab = before
            layout.fstab_read = True
            layout.boot = None
            find_boot(layout, None)
        if layout.boot is not None:
            st = reader.lstat("/boot")
            if st is None:
                g.mkdir("/boot")
            elif st[1] & S_IFMT != S_IFDIR:
                raise ImageError(
                    "/boot in the root filesystem is not a directory", hint="the image is broken or hostile"
                )
        after = fstabmod.rewrite(before, label=label, fstype=root.fstype)
        all_files: dict[str, tuple[bytes, int]] = {"/etc/fstab": (after.encode(), 0o644)}
        if ssh_keys:
            existing = b""
            try:
                real = tree.resolve(AUTHORIZED_KEYS)
                existing = reader.read(real)
                if existing and not existing.endswith(b"\n"):
                    existing += b"\n"
            except ImageError:
                pass
            all_files[AUTHORIZED_KEYS] = (existing + ssh_keys, 0o600)
        def old_label(path: str) -> bytes | None:
            if reader.lstat(path) is None:
                return None
            try:
                for x in g.lgetxattrs(path):
                    if x["attrname"] == "security.selinux":
                        v = x["attrval"]
                        return v if isinstance(v, bytes) else str(v).encode()
            except RuntimeError:
                return None
            return None

        files, links, xattrs = prepare(tree, old_label)
        all_files.update(files)
        _write(g, all_files)
        for gpath, target in sorted(links.items()):
            norm = _norm(gpath)
            _write_dirs(g, norm)
            g.ln_sf(target, norm)
        for gpath, value in sorted(xattrs.items()):
            g.lsetxattr("security.selinux", value, len(value), _norm(gpath))
        if layout.boot is not None:
            g.mount_ro(_device(g, layout.boot), "/boot")
        kernel = choose_kernel(list_kernels(tree), kernel_version)
        assert kernel is not None and kernel.initrd_real is not None
        kpath = tmp / f"vmlinuz-{kernel.version}"
        ipath = tmp / f"initrd.img-{kernel.version}"
        g.download(kernel.real, os.fspath(kpath))
        g.download(kernel.initrd_real, os.fspath(ipath))
        config = f"/boot/config-{kernel.version}"
        if config_dir is not None and g.is_file(config, followsymlinks=True):
            g.download(config, os.fspath(config_dir / f".config-{kernel.version}"))
        os.chmod(kpath, 0o644)
        os.chmod(ipath, 0o644)
        g.umount_all()
        g.shutdown()
    except RuntimeError as e:
        raise ImageError(
            f"libguestfs: {str(e).splitlines()[0]}",
            hint="the image may be damaged; 'vmtool inspect' shows what vmtool found",
        ) from None
    finally:
        g.close()
    if root.fstype == "xfs":
        try:
            run(["xfs_admin", "-L", label, os.fspath(rootfs)])
        except CommandError as e:
            raise ImageError(
                f"cannot set label {label!r} on the xfs root: {e.message}",
                hint="give another --label (at most 12 bytes)",
            ) from None
    return kernel, kpath, ipath, before, after
