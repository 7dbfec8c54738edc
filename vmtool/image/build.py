"""`vmtool build`: a whole-disk image in, a kernel + initrd + root filesystem + manifest.json out.

The output directory is built under a temporary name beside OUTDIR and renamed when complete
(vmtool.fsutil.atomic_dir), so a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmtool import __version__
from vmtool.errors import CommandError, ImageError, VmtoolError
from vmtool.fsutil import atomic_dir, os_error, sha256_file, write_atomic
from vmtool.image import fstab as fstabmod
from vmtool.image import initsys
from vmtool.image.extfs import ExtFs
from vmtool.image.extract import (
    PendingDigest,
    allocated_bytes,
    changed_ranges,
    compose,
    extract,
    sparse_clone,
)
from vmtool.image.fs import probe
from vmtool.image.guesttree import GuestTree
from vmtool.image.initrd import InitrdReport
from vmtool.image.initsys import InitSystem
from vmtool.image.inspect import (
    EXT_TYPES,
    DiskLayout,
    Kernel,
    Volume,
    choose_kernel,
    guest_tree,
    inspect_disk,
    read_fstab,
    reader_for,
)
from vmtool.image.options import DEFAULT_LABEL, Backend, BuildOptions, check_label
from vmtool.image.source import BackgroundHash, SourceDisk, build_cache_dir, open_source, raw_view
from vmtool.manifest import BootFile, DiskInfo, ImageFormat, Manifest, RootfsInfo, SourceInfo
from vmtool.queue.agent import AgentMode
from vmtool.run import run

log = logging.getLogger("vmtool.image.build")

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
BACKGROUND_NICE = 19  # the kernel-copy thread's niceness: see _native


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    backend: Backend
    backend_reason: str
    outdir: Path


@dataclass(frozen=True)
class Edits:
    """What a build changes in the guest's root filesystem besides /etc/fstab."""

    label: str
    ssh_keys: bytes  # appended to root's authorized_keys
    files: Mapping[str, tuple[bytes, int]]  # guest path -> (content, mode): the agent's files
    symlinks: Mapping[str, str] = field(default_factory=dict)  # guest path -> target
    xattrs: Mapping[str, bytes] = field(default_factory=dict)  # guest path -> security.selinux label
    agent: AgentMode | None = None  # hooked into the guest's init once it is known


@dataclass(frozen=True)
class GuestReport:
    """What the build found in the guest and did about it (the manifest's "guest" section)."""

    init: InitSystem
    agent_hook: str | None
    initrd: InitrdReport | None = None
    selinux: tuple[str, ...] = ()  # where each written file's label came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init.to_dict(),
            "agent_hook": self.agent_hook,
            "selinux": list(self.selinux),
            "initrd": self.initrd.to_dict() if self.initrd else None,
        }


def guest_edits(
    edits: Edits, tree: GuestTree, init: InitSystem | None, existing_label: Callable[[str], bytes | None]
) -> tuple[Edits, GuestReport]:
    """The edits completed for this guest: the agent hooked into its init (refused if it cannot be),
    and, in an SELinux guest, a label for every file written."""
    init = init or initsys.detect(tree)
    if edits.agent is None:
        return _labelled(edits, tree, existing_label, GuestReport(init, None))
    h = initsys.hook(init, tree)
    files = dict(edits.files)
    conf_path = agentmod_conf_path()
    if conf_path in files and init.kind != "vmtool":
        content, mode = files[conf_path]
        files[conf_path] = (content + f"VMTOOL_AGENT_POWEROFF='{initsys.poweroff_command(init.kind)}'\n".encode(), mode)
    files.update(h.files)
    log.info("agent: %s", h.description)
    done = replace(edits, files=files, symlinks={**edits.symlinks, **h.symlinks})
    return _labelled(done, tree, existing_label, GuestReport(init, h.description))


def _labelled(
    edits: Edits, tree: GuestTree, existing: Callable[[str], bytes | None], report: GuestReport
) -> tuple[Edits, GuestReport]:
    from vmtool.image import selinux

    policy = selinux.load_policy(tree)
    if policy is None:
        return edits, report
    files = ["/etc/fstab", *edits.files]
    if edits.ssh_keys:
        files.append(AUTHORIZED_KEYS)
    xattrs, said = selinux.labels(policy, set(files), set(edits.symlinks), existing)
    log.warning("SELinux is %s in the guest: labelled %d files vmtool wrote", policy.mode, len(xattrs))
    for line in said:
        log.info("selinux: %s", line)
    return replace(edits, xattrs=xattrs), replace(report, selinux=tuple(said))


def agentmod_conf_path() -> str:
    from vmtool.queue import agent as agentmod

    return agentmod.CONF_PATH


@dataclass(frozen=True)
class Work:
    """Where a build reads and writes: the source disk as raw bytes, and the output directory being
    filled (renamed into place when complete)."""

    raw: Path
    tmp: Path

    @property
    def rootfs(self) -> Path:
        return self.tmp / "rootfs.img"


@dataclass(frozen=True)
class CopiedBoot:
    """The kernel and initrd copied out of the guest."""

    kernel: Kernel
    kernel_path: Path
    initrd_path: Path
    sha256: tuple[str, str] | None = None  # (kernel, initrd): set by each backend once they are copied


@dataclass(frozen=True)
class RootOutput:
    """The changed root filesystem in Work.rootfs."""

    fstab_before: str | None
    fstab_after: str
    # Its sha256, still being computed on a thread when it was hashed as it was written.
    digest: PendingDigest | None = None


@dataclass(frozen=True)
class GuestFilesystems:
    """The guest's root and /boot as the native backend reads them."""

    root: ExtFs
    boot: ExtFs | None
    root_copied: bool  # the root volume is already Work.rootfs (it was copied out to be inspected)


def read_ssh_keys(paths: Iterable[Path]) -> bytes:
    out = b""
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise os_error(e, f"cannot read ssh key {p}") from None
        if len(data) > 64 << 10:
            raise VmtoolError(f"{p}: too large to be an ssh public key", hint="give the .pub file")
        lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
        if not lines or any(not re.match(r"^(ssh-|ecdsa-|sk-|[a-z0-9@.,=\"-]+ ssh-)", ln) for ln in lines):
            raise VmtoolError(
                f"{p}: not an OpenSSH public key", hint="give the .pub file (ssh-ed25519 AAAA...)"
            )
        if any("PRIVATE KEY" in ln for ln in lines):
            raise VmtoolError(f"{p}: this is a private key", hint="give the public key (.pub)")
        out += ("\n".join(lines) + "\n").encode()
    return out


def agent_files(mode: AgentMode) -> tuple[dict[str, tuple[bytes, int]], dict[str, Any]]:
    """Files of the guest agent for --agent, and what the manifest records of it."""
    from vmtool.queue import agent as agentmod  # lazy: reads its templates

    return dict(agentmod.agent_files(mode.value)), {"mode": mode.value, "version": agentmod.AGENT_VERSION}


def pick_backend(requested: Backend, layout: DiskLayout) -> tuple[Backend, str]:
    root = layout.root
    assert root is not None
    if requested is Backend.NATIVE:
        if root.fstype not in EXT_TYPES:
            raise ImageError(
                f"the root filesystem {root.name} is {root.fstype}; the native backend changes only ext2/3/4",
                hint="use --backend guestfs (or --backend auto)",
            )
        if layout.boot is not None and layout.boot.fstype not in EXT_TYPES:
            raise ImageError(
                f"/boot ({layout.boot.name}) is {layout.boot.fstype}; the native backend reads ext2/3/4",
                hint="use --backend guestfs (or --backend auto)",
            )
        return Backend.NATIVE, "requested with --backend native"
    if requested is Backend.GUESTFS:
        return Backend.GUESTFS, "requested with --backend guestfs"
    if root.fstype in EXT_TYPES and (layout.boot is None or layout.boot.fstype in EXT_TYPES):
        return Backend.NATIVE, f"root filesystem is {root.fstype}: read and changed natively with e2fsprogs"
    if root.fstype not in EXT_TYPES:
        return Backend.GUESTFS, f"{root.fstype} cannot be changed without an appliance: using libguestfs"
    boot_type = layout.boot.fstype if layout.boot else "?"
    return (
        Backend.GUESTFS,
        f"/boot is {boot_type}, which vmtool cannot read without an appliance: using libguestfs",
    )


def build(opts: BuildOptions) -> BuildResult:
    src = open_source(opts.source, opts.format.value if opts.format else None)
    keys = read_ssh_keys(opts.ssh_keys) if opts.ssh_keys else b""
    extra_files: dict[str, tuple[bytes, int]] = {}
    agent_info = None
    if opts.agent:
        extra_files, agent_info = agent_files(opts.agent)
    outdir = opts.outdir
    if outdir.resolve() == src.path.resolve() or src.path.resolve().is_relative_to(outdir.resolve()):
        raise VmtoolError("the output directory must not contain the source image", hint="choose another -o")
    with atomic_dir(outdir, force=opts.force) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the VM runner (libvirt's qemu user) must read it
        src_hash = BackgroundHash(src.path)
        try:
            edits = Edits(opts.label or DEFAULT_LABEL, keys, extra_files, agent=opts.agent)
            return _build_in(opts, src, tmp, src_hash, edits, agent_info)
        except BaseException:
            src_hash.cancel()
            raise


def _build_in(
    opts: BuildOptions,
    src: SourceDisk,
    tmp: Path,
    src_hash: BackgroundHash,
    edits: Edits,
    agent_info: dict[str, Any] | None,
) -> BuildResult:
    """The build inside the temporary output directory `tmp`."""
    with raw_view(src, tmp) as raw:
        work = Work(raw=raw, tmp=tmp)
        materialized: dict[str, Path] = {}

        def materialize(v: Volume) -> Path:
            if v.name not in materialized:
                p = tmp / f".volume-{len(materialized)}.img"
                extract(raw, v.pieces, p, label=f"reading {v.name}")
                materialized[v.name] = p
            return materialized[v.name]

        layout = inspect_disk(src, raw, root_spec=opts.root, materialize=materialize)
        root = layout.root
        assert root is not None
        backend, reason = pick_backend(opts.backend, layout)
        log.info("backend %s: %s", backend, reason)
        label = edits.label
        check_label(label, root.fstype, explicit=opts.label is not None)  # its limit depends on the type
        if backend is Backend.NATIVE:
            boot, out, report = _native(
                layout, work, edits, opts.kernel_version, materialized, initrd_check=opts.initrd_check
            )
        else:
            boot, out, report = _guestfs(layout, work, edits, opts.kernel_version)
        if opts.initrd_check and report.initrd is None:  # the native backend checked it on its thread
            report = replace(report, initrd=_check_initrd(boot, layout, work))
        if agent_info is not None:
            agent_info = {**agent_info, "init": report.init.kind, "hook": report.agent_hook}
        for p in materialized.values():
            p.unlink(missing_ok=True)
    # On a native build the rootfs sha256 is still being finished on its thread: it is collected last.
    digest = out.digest
    try:
        rootfs = work.rootfs
        rootfs_uuid, rootfs_type = _fs_identity(rootfs)
        virtual = os.path.getsize(rootfs)
        final = rootfs
        if opts.rootfs_format is ImageFormat.QCOW2:
            if digest is not None:  # it is the raw file's: the qcow2 file is hashed instead
                digest.cancel()
                digest = None
            final = tmp / "rootfs.qcow2"
            run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(rootfs), os.fspath(final)],
                hint="check free space beside the output directory",
            )
            rootfs.unlink()
        # Hash the rootfs on one core while its pages are written back (fsync) and the small files hashed.
        rootfs_hash = BackgroundHash(final, cache=False) if digest is None else None
        kpath, ipath = boot.kernel_path, boot.initrd_path
        _fsync(final, kpath, ipath)  # durable before the rename that publishes them
        assert boot.sha256 is not None
        k_sha, i_sha = boot.sha256
        version = boot.kernel.version
        manifest = Manifest(
            source=SourceInfo(os.fspath(src.path.resolve()), src.format, src.size, src_hash.get()),
            rootfs=RootfsInfo(
                final.name,
                opts.rootfs_format.value,
                rootfs_type,
                label,
                rootfs_uuid,
                virtual,
                allocated_bytes(final),
                rootfs_hash.get() if rootfs_hash else digest.get() if digest else "",
            ),
            kernel=BootFile(kpath.name, version, k_sha),
            initrd=BootFile(ipath.name, version, i_sha),
            cmdline=f"root=LABEL={label} ro console=ttyS0",
            fstab_before=out.fstab_before,
            fstab_after=out.fstab_after,
            created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
            vmtool_version=__version__,
            agent=agent_info,
            extra={
                "build": {
                    "backend": backend.value,
                    "backend_reason": reason,
                    "root": root.name,
                    "root_reason": layout.root_reason,
                    "boot": layout.boot.name if layout.boot else None,
                    "boot_reason": layout.boot_reason,
                },
                "guest": report.to_dict(),
            },
            base_dir=tmp,
        )
        if opts.disk:
            manifest = replace(manifest, disk=_assemble(manifest, opts.disk_format))
        manifest.save(tmp / "manifest.json")
        return BuildResult(replace(manifest, base_dir=opts.outdir), backend, reason, opts.outdir)
    except BaseException:
        if digest is not None:
            digest.cancel()
        raise


def _check_initrd(boot: CopiedBoot, layout: DiskLayout, work: Work) -> InitrdReport:
    """Read the initrd copied out (and hashed), with the kernel's config: refuse one that cannot boot
    from any disk."""
    from vmtool.image import initrd as initrdmod

    root = layout.root
    assert root is not None
    config = work.tmp / f".config-{boot.kernel.version}"
    try:
        config_text = config.read_text(errors="replace") if config.exists() else None
    except OSError as e:
        raise os_error(e, "reading the kernel's config") from None
    finally:
        config.unlink(missing_ok=True)
    what = f"initrd {boot.kernel.initrd_real}"
    try:
        assert boot.sha256 is not None
        report = _remembered_check(boot.initrd_path, boot.sha256[1], config_text, root.fstype, what)
    except initrdmod.InitrdError as e:
        raise initrdmod.InitrdError(
            e.message, hint=f"{e.hint}; or build with --no-initrd-check to boot it from virtio unchecked"
        ) from None
    except OSError as e:
        raise os_error(e, "reading the initrd") from None
    fix = initrdmod.fix_hint(report.generator)
    if not report.buses:
        missing = ", ".join(d for d, s in report.drivers.items() if s == "missing")
        raise initrdmod.InitrdError(
            f"{what} cannot boot from any disk vmtool offers: {missing} neither built into kernel "
            f"{boot.kernel.version} nor in the initrd",
            hint=fix,
        )
    for w in report.warnings:
        log.warning("%s: %s (to fix: %s)", what, w, fix)
    return report


def _remembered_check(
    path: Path, sha256: str, config_text: str | None, fstype: str, what: str
) -> InitrdReport:
    """initrd.check(), remembered by content: the report is a function of the initrd's bytes, the
    kernel's config and the root filesystem's type, and rebuilding images of one distribution release
    (another label, other keys, new data) meets the same initrd again. Reading one costs a core for
    about half a second (a 35 MiB zstd initrd unpacks to 140 MiB), on a node whose cores the root
    volume's copy and hash need. Only reports that passed are remembered; their warnings are logged
    from the report each time."""
    from vmtool.image import initrd as initrdmod

    if config_text is None:
        return initrdmod.check(path, config_text, fstype, what=what)  # refused, with its hint
    key = hashlib.sha256(
        f"{initrdmod.CHECK_VERSION}\0{sha256}\0{fstype}\0{config_text}".encode()
    ).hexdigest()
    entry = build_cache_dir("initrd") / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):
        return initrdmod.InitrdReport.from_dict(json.loads(entry.read_bytes()))
    report = initrdmod.check(path, config_text, fstype, what=what)
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, json.dumps(report.to_dict()) + "\n")
    return report


def _guestfs(
    layout: DiskLayout, work: Work, edits: Edits, kernel_version: str | None
) -> tuple[CopiedBoot, RootOutput, GuestReport]:
    from vmtool.image import guestfs_backend  # lazy: needs the guestfs binding

    reports: list[GuestReport] = []

    def prepare(
        tree: GuestTree, existing: Callable[[str], bytes | None]
    ) -> tuple[dict[str, tuple[bytes, int]], dict[str, str], dict[str, bytes]]:
        done, report = guest_edits(edits, tree, None, existing)
        reports.append(report)
        return dict(done.files), dict(done.symlinks), dict(done.xattrs)

    kernel, kpath, ipath, fstab_before, fstab_after = guestfs_backend.build(
        layout,
        work.rootfs,
        work.tmp,
        config_dir=work.tmp,
        label=edits.label,
        ssh_keys=edits.ssh_keys,
        prepare=prepare,
        kernel_version=kernel_version,
    )
    return _hashed(CopiedBoot(kernel, kpath, ipath)), RootOutput(fstab_before, fstab_after), reports[0]


def _fsync(*paths: Path) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise os_error(e, f"writing {p}") from None


def _assemble(m: Manifest, fmt: ImageFormat) -> DiskInfo:
    from vmtool.image.assemble import assemble_disk  # lazy: only --disk needs it

    out = m.base_dir / f"disk.{'qcow2' if fmt is ImageFormat.QCOW2 else 'img'}"
    return assemble_disk(m, out, fmt.value)


def _fs_identity(rootfs: Path) -> tuple[str, str]:
    with open(rootfs, "rb") as f:
        fs = probe(f, 0, os.path.getsize(rootfs))
    if fs is None:
        raise ImageError(
            "the extracted root filesystem is not recognisable any more",
            hint="report this as a bug in vmtool",
        )
    return fs.uuid, fs.type


def _native(
    layout: DiskLayout,
    work: Work,
    edits: Edits,
    kernel_version: str | None,
    materialized: dict[str, Path],
    *,
    initrd_check: bool,
) -> tuple[CopiedBoot, RootOutput, GuestReport]:
    """The native backend: the kernel and initrd are copied out (and hashed, and the initrd checked)
    on a thread while the root volume is copied and changed on this one, itself hashed on a third as
    it is written."""
    # Pick the kernel before the long copy, so a disk without one fails fast.
    kernel = choose_kernel(layout.kernels, kernel_version)
    assert kernel is not None and kernel.initrd_real is not None
    guest = _locate(layout, work, materialized)
    tree = guest_tree(guest.root, guest.boot)
    root_fs = guest.root

    def existing(path: str) -> bytes | None:
        return root_fs.get_xattr(path, "security.selinux")

    edits, report = guest_edits(edits, tree, layout.init, existing)
    boot = CopiedBoot(kernel, work.tmp / f"vmlinuz-{kernel.version}", work.tmp / f"initrd.img-{kernel.version}")
    copied: list[CopiedBoot] = []
    dump_errors: list[BaseException] = []
    checked: list[InitrdReport] = []

    def copy_boot() -> None:
        try:
            # Off the critical path: on a small node the root volume's copy and hash need every core,
            # so this thread (and the decompressor it starts) takes only the time they leave idle.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            _copy_boot_files(guest, boot)
            copied.append(_hashed(boot))
            if initrd_check:
                _copy_config(guest_tree(guest.root, guest.boot), kernel.version, work.tmp)
                checked.append(_check_initrd(copied[0], layout, work))
        except BaseException as e:  # re-raised below, in the main thread
            dump_errors.append(e)

    dumper = threading.Thread(target=copy_boot, name="vmtool-kernel-copy", daemon=True)
    dumper.start()
    try:
        out = _root_volume(layout, work, edits, guest)
    finally:
        dumper.join()
    if dump_errors:
        if out.digest is not None:
            out.digest.cancel()
        if isinstance(dump_errors[0], OSError):
            raise os_error(dump_errors[0], "copying the kernel") from None
        raise dump_errors[0]
    if checked:
        report = replace(report, initrd=checked[0])
    return copied[0], out, report


def _copy_config(tree: GuestTree, version: str, tmp: Path) -> None:
    """/boot/config-<version> out of the guest (for the initrd check), when it has one."""
    try:
        real = tree.resolve(f"/boot/config-{version}")
        data = tree.read_file(real, 16 << 20)
    except ImageError:
        return
    try:
        (tmp / f".config-{version}").write_bytes(data)
    except OSError as e:
        raise os_error(e, f"copying /boot/config-{version} out of the guest") from None


def _locate(layout: DiskLayout, work: Work, materialized: dict[str, Path]) -> GuestFilesystems:
    """The root and /boot filesystems, with the readers inspection already used. A root volume that
    was copied out to be inspected becomes the output rootfs itself (taken out of `materialized`)."""
    root = layout.root
    assert root is not None
    root_fs = reader_for(layout, root, None)
    boot_fs = reader_for(layout, layout.boot, None) if layout.boot else None
    copied = root.name in materialized
    if copied:
        os.replace(materialized.pop(root.name), work.rootfs)
        root_fs = ExtFs(work.rootfs, name=f"root filesystem ({root.name})")
    if layout.boot is not None and boot_fs is None and layout.boot.name in materialized:
        boot_fs = ExtFs(materialized[layout.boot.name], name=layout.boot.name)
    assert root_fs is not None
    return GuestFilesystems(root_fs, boot_fs, copied)


def _copy_boot_files(guest: GuestFilesystems, boot: CopiedBoot) -> None:
    """Copy the kernel and initrd out of the (unchanged) guest filesystems."""
    kernel = boot.kernel
    assert kernel.initrd_real is not None
    tree = guest_tree(guest.root, guest.boot)
    by_fs: dict[int, tuple[ExtFs, list[tuple[str, Path]]]] = {}
    for gpath, host in ((kernel.real, boot.kernel_path), (kernel.initrd_real, boot.initrd_path)):
        fs, rel, _ = tree.fs_of(gpath)
        assert isinstance(fs, ExtFs)
        by_fs.setdefault(id(fs), (fs, []))[1].append((rel, host))
    for fs, files_out in by_fs.values():
        fs.dump(files_out)
    for host in (boot.kernel_path, boot.initrd_path):
        os.chmod(host, 0o644)


def _hashed(boot: CopiedBoot) -> CopiedBoot:
    """`boot` with the sha256 of its kernel and initrd (the manifest's, and the initrd report's key)."""
    return replace(
        boot, sha256=(sha256_file(boot.kernel_path, sparse=False), sha256_file(boot.initrd_path, sparse=False))
    )


def _root_volume(layout: DiskLayout, work: Work, edits: Edits, guest: GuestFilesystems) -> RootOutput:
    """Copy and change the root filesystem; its sha256 comes back pending if it was hashed on the way."""
    root = layout.root
    assert root is not None
    before = layout.fstab if layout.fstab_read else read_fstab(guest_tree(guest.root, None))
    after = fstabmod.rewrite(before, label=edits.label, fstype=root.fstype)
    files: dict[str, tuple[bytes, int]] = {"/etc/fstab": (after.encode(), 0o644)}
    if edits.ssh_keys:
        files[AUTHORIZED_KEYS] = (_existing_keys(guest.root) + edits.ssh_keys, 0o600)
    files.update(edits.files)
    rootfs = work.rootfs
    links = dict(edits.symlinks)
    xattrs = dict(edits.xattrs)
    if not guest.root_copied:
        digest = _overlay_build(work.raw, root, guest.root, rootfs, work.tmp, files, edits.label, links, xattrs)
        if digest is not None:
            return RootOutput(before, after, digest)
        extract(work.raw, root.pieces, rootfs, label=f"extracting {root.name}")
    ExtFs(rootfs, name=f"root filesystem ({root.name})").write_files(
        files, workdir=rootfs.parent, label=edits.label, symlinks=links, xattrs=xattrs
    )
    return RootOutput(before, after)


def _overlay_build(
    raw: Path,
    root: Volume,
    source_fs: ExtFs,
    rootfs: Path,
    tmp: Path,
    files: dict[str, tuple[bytes, int]],
    label: str,
    links: dict[str, str],
    xattrs: dict[str, bytes],
) -> PendingDigest | None:
    """One pass over the root volume: changes made first on an `e2image -r` metadata copy, then the
    volume copied with the changed blocks laid over it and hashed as it is written. None: not possible
    here (the caller then copies first and changes the copy)."""
    if len(root.pieces) != 1:
        return None
    meta = tmp / ".rootfs-meta.img"
    meta0 = tmp / ".rootfs-meta0.img"
    try:
        run(["e2image", "-r", "-o", str(root.pieces[0][0]), os.fspath(raw), os.fspath(meta)], timeout=600)
        if os.path.getsize(meta) > root.size:
            meta.unlink()
            return None
        os.truncate(meta, root.size)
        sparse_clone(meta, meta0)
        with open(meta, "rb") as f:
            f.seek(1024 + 24)
            block = 1024 << min(int.from_bytes(f.read(4), "little"), 6)
    except (CommandError, OSError) as e:
        log.info("e2image could not copy the root filesystem's metadata (%s): copying it whole first", e)
        _remove(meta, meta0)
        return None
    try:
        meta_fs = ExtFs(meta, name=f"root filesystem ({root.name})")
        meta_fs.lookups_from(source_fs)  # the same directories: what inspection listed need not be again
        meta_fs.write_files(files, workdir=tmp, label=label, symlinks=links, xattrs=xattrs)
        # e2image writes whole host blocks, so its data ranges also cover unrelated filesystem blocks
        # (as zeros): only the blocks the changes really touched are laid over the source.
        changed = changed_ranges(meta0, meta, block)
    except BaseException:
        _remove(meta, meta0)
        raise
    # The copies are done with. Removing them can take longer than making them (debugfs synced one,
    # and a filesystem mounted with discard trims what they held): it happens beside the copy.
    remover = threading.Thread(target=_remove, args=(meta, meta0), name="vmtool-remove", daemon=True)
    remover.start()
    try:
        digest = compose(raw, root.pieces, rootfs, changed, label=f"extracting {root.name}")
        _check_copy(rootfs, root, files, links, label, digest)
    finally:
        remover.join()  # before the output directory is renamed into place
    return digest


def _check_copy(
    rootfs: Path,
    root: Volume,
    files: dict[str, tuple[bytes, int]],
    links: dict[str, str],
    label: str,
    digest: PendingDigest,
) -> None:
    """Check the result the way a reader will see it (the files as written, the label in the
    superblock) while the hash thread finishes; a failed check cancels the hash."""
    try:
        out = ExtFs(rootfs, name="the new root filesystem")
        for gpath, (content, _mode) in files.items():
            if out.cat(gpath) != content:
                raise ImageError(
                    f"{gpath} did not survive the copy of the root filesystem", hint="report this bug"
                )
        for gpath, target in links.items():
            if out.readlink(gpath) != target:
                raise ImageError(
                    f"{gpath} did not survive the copy of the root filesystem", hint="report this bug"
                )
        with open(rootfs, "rb") as f:
            fs = probe(f, 0, root.size)
        if fs is None or fs.label != label:
            raise ImageError("the new root filesystem lost its label in the copy", hint="report this bug")
    except BaseException:
        digest.cancel()
        raise


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def _existing_keys(fs: ExtFs) -> bytes:
    tree = guest_tree(fs, None)
    try:
        real = tree.resolve(AUTHORIZED_KEYS)
    except ImageError:
        return b""
    data = fs.read(real, limit=1 << 20)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data
