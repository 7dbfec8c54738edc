"""The tree of the embedded default guest (images/default.toml): a busybox root that boots the host's
Debian kernel.

Used by `make demo`, `vmtool demo` and the tests. The root tree is made without root privileges or
mounts (mke2fs -d). The guest's /sbin/init mounts the pseudo filesystems, loads the virtio modules the
Debian initrd does not load (virtio_console for virtio-serial channels), runs every executable in
/etc/vmtool/rc.d in order, then powers off. Whole-disk layouts (GPT, /boot, LVM) are made from this
tree by vmtool.recipe.disk.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vmtool.errors import VmtoolError
from vmtool.run import run

BUSYBOX = Path("/bin/busybox")

INIT = """#!/bin/busybox sh
# vmtool default guest init: set up, run /etc/vmtool/rc.d/*, power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mkdir -p /dev/pts /run /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mount -o remount,rw / 2>/dev/null
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
for m in /lib/modules/*/extra/*.ko; do [ -e "$m" ] && insmod "$m" 2>/dev/null; done
hostname -F /etc/hostname 2>/dev/null
echo "vmtool-guest: booted $(uname -r)"
for s in /etc/vmtool/rc.d/*; do [ -x "$s" ] && "$s"; done
echo "vmtool-guest: powering off"
sync
poweroff -f
"""

FSTAB = "LABEL={label}\t/\text4\tdefaults\t0\t1\nproc\t/proc\tproc\tdefaults\t0\t0\n"

# Modules the guest init loads itself, when the kernel has them; the init loads them in name order
# (/lib/modules/*/extra/*.ko), which is also their dependency order.
EXTRA_MODULES = ("kernel/drivers/char/virtio_console.ko", "kernel/net/core/failover.ko",
                 "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko")


def make_rootfs_tree(
    dest: Path,
    *,
    label: str = "root",
    kernel_version: str | None = None,
    rc_scripts: dict[str, str] | None = None,
    files: dict[str, str | bytes] | None = None,
) -> None:
    """Fill `dest` with a busybox root tree. rc_scripts: name -> sh text, run at boot in name order."""
    if not BUSYBOX.exists():
        raise VmtoolError("busybox is not installed", hint="install the Debian package busybox-static")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/vmtool/rc.d", "proc", "sys", "dev", "run", "tmp",
              "root", "var/log", "boot", "mnt"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = run([os.fspath(BUSYBOX), "--list-full"]).stdout.decode().split()
    for applet in applets:
        target = dest / applet
        if not re.fullmatch(r"[a-z0-9_./\[\-]+", applet) or target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(dest / "bin/busybox", target.parent)
        target.symlink_to(rel)
    init = dest / "sbin/init"
    if init.is_symlink() or init.exists():
        init.unlink()
    init.write_text(INIT)
    init.chmod(0o755)
    (dest / "etc/fstab").write_text(FSTAB.format(label=label))
    (dest / "etc/hostname").write_text("vmtool-guest\n")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    (dest / "tmp").chmod(0o1777)
    if kernel_version:
        mod_root = Path("/lib/modules") / kernel_version
        for rel_mod in EXTRA_MODULES:
            src = mod_root / rel_mod
            if src.exists():
                out = dest / "lib/modules" / kernel_version / "extra" / src.name
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
    for name, text in (rc_scripts or {}).items():
        p = dest / "etc/vmtool/rc.d" / name
        p.write_text(text)
        p.chmod(0o755)
    for rel, content in (files or {}).items():
        p = dest / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
