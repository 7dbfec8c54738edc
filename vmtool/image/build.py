"""`vmtool build`: a whole-disk image in, a kernel + initrd + root filesystem + manifest.json out.

The output directory is built under a temporary name beside OUTDIR and renamed when complete
(vmtool.fsutil.atomic_dir), so a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool import __version__
from vmtool.errors import CommandError, ImageError, VmtoolError
from vmtool.fsutil import atomic_dir, os_error
from vmtool.image import fstab as fstabmod
from vmtool.image.extfs import ExtFs
from vmtool.image.extract import (
    PendingDigest,
    allocated_bytes,
    changed_ranges,
    compose,
    extract,
    sparse_clone,
)
from vmtool.image.fs import LABEL_MAX, probe
from vmtool.image.inspect import (
    EXT_TYPES,
    Kernel,
    Layout,
    Volume,
    choose_kernel,
    guest_tree,
    inspect_disk,
    read_fstab,
    reader_for,
)
from vmtool.image.source import BackgroundHash, Source, open_source, raw_view, sha256_file
from vmtool.manifest import BootFile, DiskInfo, Manifest, RootfsInfo, SourceInfo
from vmtool.run import run

log = logging.getLogger("vmtool.image.build")

DEFAULT_LABEL = "cloudimg-rootfs"
LABEL_RE = re.compile(r"[A-Za-z0-9._-]+")
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"


@dataclass
class BuildOptions:
    source: Path
    outdir: Path
    format: str | None = None
    label: str | None = None
    rootfs_format: str = "raw"
    kernel_version: str | None = None
    ssh_keys: list[Path] = field(default_factory=list)
    backend: str = "auto"
    root: str | None = None
    force: bool = False
    agent: str | None = None
    disk: bool = False
    disk_format: str = "raw"


@dataclass
class Result:
    manifest: Manifest
    backend: str
    backend_reason: str
    outdir: Path


def check_label(label: str, fstype: str, *, explicit: bool) -> None:
    if not LABEL_RE.fullmatch(label):
        raise ImageError(
            f"label {label!r} may only hold letters, digits, '.', '_' and '-'",
            hint="it goes on the kernel command line as root=LABEL=...; choose a simple --label",
        )
    limit = LABEL_MAX.get(fstype, 16)
    if len(label.encode()) > limit:
        what = "the label you gave" if explicit else f"the default label {label!r}"
        raise ImageError(
            f"{fstype} labels are limited to {limit} bytes and {what} has {len(label.encode())}",
            hint="give a shorter one, e.g. --label img-rootfs"
            if fstype == "xfs"
            else "give a shorter --label",
        )


def read_ssh_keys(paths: list[Path]) -> bytes:
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


def agent_files(mode: str) -> tuple[dict[str, tuple[bytes, int]], dict[str, Any]]:
    """Files of the guest agent for --agent (written by the queue engineer's vmtool.queue.agent)."""
    try:
        from vmtool.queue import agent as agentmod  # lazy: another area's module
    except ImportError:
        raise VmtoolError(
            "--agent is not available in this build of vmtool (vmtool.queue.agent is missing)",
            hint="build without --agent",
        ) from None
    files = agentmod.agent_files(mode)
    return dict(files), {"mode": mode, "version": getattr(agentmod, "AGENT_VERSION", "")}


def write_files_into_rootfs(rootfs: Path, fstype: str, files: dict[str, tuple[bytes, int]]) -> None:
    """Create or replace files (guest path -> (content, mode)) owned by root in a root filesystem image.

    ext2/3/4 are changed in place with debugfs; other filesystems through one libguestfs appliance.
    """
    if not files:
        return
    if fstype in EXT_TYPES:
        ExtFs(rootfs, name=os.fspath(rootfs)).write_files(files, workdir=rootfs.parent)
        return
    from vmtool.image import guestfs_backend  # lazy: needs the guestfs binding

    guestfs_backend.write_files(rootfs, fstype, files)


def pick_backend(requested: str, layout: Layout) -> tuple[str, str]:
    root = layout.root
    assert root is not None
    if requested == "native":
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
        return "native", "requested with --backend native"
    if requested == "guestfs":
        return "guestfs", "requested with --backend guestfs"
    if root.fstype in EXT_TYPES and (layout.boot is None or layout.boot.fstype in EXT_TYPES):
        return "native", f"root filesystem is {root.fstype}: read and changed natively with e2fsprogs"
    if root.fstype not in EXT_TYPES:
        return "guestfs", f"{root.fstype} cannot be changed without an appliance: using libguestfs"
    boot_type = layout.boot.fstype if layout.boot else "?"
    return (
        "guestfs",
        f"/boot is {boot_type}, which vmtool cannot read without an appliance: using libguestfs",
    )


def build(opts: BuildOptions) -> Result:
    if opts.rootfs_format not in ("raw", "qcow2"):
        raise VmtoolError(f"unknown --rootfs-format {opts.rootfs_format}", hint="use raw or qcow2")
    if opts.backend not in ("auto", "native", "guestfs"):
        raise VmtoolError(f"unknown --backend {opts.backend}", hint="use auto, native or guestfs")
    src = open_source(opts.source, opts.format)
    keys = read_ssh_keys(opts.ssh_keys) if opts.ssh_keys else b""
    extra_files: dict[str, tuple[bytes, int]] = {}
    agent_info = None
    if opts.agent:
        extra_files, agent_info = agent_files(opts.agent)
    if opts.label is not None:
        check_label(opts.label, "ext4", explicit=True)
    outdir = Path(opts.outdir)
    if outdir.resolve() == src.path.resolve() or src.path.resolve().is_relative_to(outdir.resolve()):
        raise VmtoolError("the output directory must not contain the source image", hint="choose another -o")
    with atomic_dir(outdir, force=opts.force) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the VM runner (libvirt's qemu user) must read it
        src_hash = BackgroundHash(src.path)
        try:
            return _build_in(opts, src, tmp, outdir, src_hash, keys, extra_files, agent_info)
        except BaseException:
            src_hash.cancel()
            raise


def _build_in(
    opts: BuildOptions,
    src: Source,
    tmp: Path,
    outdir: Path,
    src_hash: BackgroundHash,
    keys: bytes,
    extra_files: dict[str, tuple[bytes, int]],
    agent_info: dict[str, Any] | None,
) -> Result:
    with raw_view(src, tmp) as raw:
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
        label = opts.label or DEFAULT_LABEL
        check_label(label, root.fstype, explicit=opts.label is not None)
        rootfs = tmp / "rootfs.img"
        digest: PendingDigest | None = None
        boot_sha: tuple[str, str] | None = None
        if backend == "native":
            kernel, kpath, ipath, fstab_before, fstab_after, digest, boot_sha = _native(
                layout, raw, rootfs, tmp, label, keys, extra_files, opts.kernel_version, materialized
            )
        else:
            from vmtool.image import guestfs_backend  # lazy: needs the guestfs binding

            kernel, kpath, ipath, fstab_before, fstab_after = guestfs_backend.build(
                layout,
                rootfs,
                tmp,
                label=label,
                ssh_keys=keys,
                files=extra_files,
                kernel_version=opts.kernel_version,
            )
        for p in materialized.values():
            p.unlink(missing_ok=True)
    # On a native build the rootfs sha256 is still being finished on its thread: it is collected last.
    try:
        rootfs_uuid, rootfs_type = _fs_identity(rootfs)
        virtual = os.path.getsize(rootfs)
        final = rootfs
        if opts.rootfs_format == "qcow2":
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
        _fsync(final, kpath, ipath)  # durable before the rename that publishes them
        k_sha, i_sha = boot_sha or (sha256_file(kpath, sparse=False), sha256_file(ipath, sparse=False))
        manifest = Manifest(
            source=SourceInfo(os.fspath(src.path.resolve()), src.format, src.size, src_hash.get()),
            rootfs=RootfsInfo(
                final.name,
                opts.rootfs_format,
                rootfs_type,
                label,
                rootfs_uuid,
                virtual,
                allocated_bytes(final),
                rootfs_hash.get() if rootfs_hash else digest.get() if digest else "",
            ),
            kernel=BootFile(kpath.name, kernel.version, k_sha),
            initrd=BootFile(ipath.name, kernel.version, i_sha),
            cmdline=f"root=LABEL={label} ro console=ttyS0",
            fstab_before=fstab_before,
            fstab_after=fstab_after,
            created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
            vmtool_version=__version__,
            agent=agent_info,
            extra={
                "build": {
                    "backend": backend,
                    "backend_reason": reason,
                    "root": root.name,
                    "root_reason": layout.root_reason,
                    "boot": layout.boot.name if layout.boot else None,
                    "boot_reason": layout.boot_reason,
                }
            },
            base_dir=tmp,
        )
        mpath = tmp / "manifest.json"
        manifest.save(mpath)
        if opts.disk:
            manifest.disk = _assemble(mpath, tmp, opts.disk_format)
            manifest.save(mpath)
        manifest.base_dir = outdir
        return Result(manifest, backend, reason, outdir)
    except BaseException:
        if digest is not None:
            digest.cancel()
        raise


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


def _assemble(mpath: Path, tmp: Path, fmt: str) -> DiskInfo:
    try:
        from vmtool.image.assemble import assemble_disk  # lazy: the publish area's module
    except ImportError:
        raise VmtoolError(
            "--disk is not available in this build of vmtool (vmtool.image.assemble is missing)",
            hint="build without --disk",
        ) from None
    out = tmp / f"disk.{'qcow2' if fmt == 'qcow2' else 'img'}"
    info: DiskInfo = assemble_disk(mpath, out, fmt)
    return info


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
    layout: Layout,
    raw: Path,
    rootfs: Path,
    tmp: Path,
    label: str,
    keys: bytes,
    extra: dict[str, tuple[bytes, int]],
    kernel_version: str | None,
    materialized: dict[str, Path],
) -> tuple[Kernel, Path, Path, str | None, str, PendingDigest | None, tuple[str, str]]:
    """Returns kernel, its files, fstab before/after, the rootfs sha256 if it is hashed on the way,
    and the sha256 of the kernel and the initrd."""
    root = layout.root
    assert root is not None
    # Pick the kernel before the long copy, so a disk without one fails fast.
    kernel = choose_kernel(layout.kernels, kernel_version)
    assert kernel is not None and kernel.initrd_real is not None
    # Kernels are read from the source (unchanged), with the readers inspection already used.
    root_src = reader_for(layout, root, None)
    boot_src = reader_for(layout, layout.boot, None) if layout.boot else None
    extracted = root.name in materialized
    if extracted:
        os.replace(materialized.pop(root.name), rootfs)
        root_src = ExtFs(rootfs, name=f"root filesystem ({root.name})")
    if layout.boot is not None and boot_src is None and layout.boot.name in materialized:
        boot_src = ExtFs(materialized[layout.boot.name], name=layout.boot.name)
    assert root_src is not None
    kpath = tmp / f"vmlinuz-{kernel.version}"
    ipath = tmp / f"initrd.img-{kernel.version}"
    tree = guest_tree(root_src, boot_src)
    by_fs: dict[int, tuple[ExtFs, list[tuple[str, Path]]]] = {}
    for guest, host in ((kernel.real, kpath), (kernel.initrd_real, ipath)):
        fs, rel, _ = tree.fs_of(guest)
        assert isinstance(fs, ExtFs)
        by_fs.setdefault(id(fs), (fs, []))[1].append((rel, host))
    # The kernel and initrd are copied out on a thread while the root volume is copied.
    dump_errors: list[BaseException] = []
    boot_sha: list[str] = []

    def dump() -> None:
        try:
            for fs, files_out in by_fs.values():
                fs.dump(files_out)
            for host in (kpath, ipath):
                os.chmod(host, 0o644)
                boot_sha.append(sha256_file(host, sparse=False))
        except BaseException as e:  # re-raised below, in the main thread
            dump_errors.append(e)

    dumper = threading.Thread(target=dump, name="vmtool-kernel-copy", daemon=True)
    dumper.start()
    try:
        result = _root_volume(layout, raw, rootfs, tmp, label, keys, extra, root_src, extracted)
    finally:
        dumper.join()
    if dump_errors:
        if result[2] is not None:
            result[2].cancel()
        if isinstance(dump_errors[0], OSError):
            raise os_error(dump_errors[0], "copying the kernel") from None
        raise dump_errors[0]
    before, after, digest = result
    return kernel, kpath, ipath, before, after, digest, (boot_sha[0], boot_sha[1])


def _root_volume(
    layout: Layout,
    raw: Path,
    rootfs: Path,
    tmp: Path,
    label: str,
    keys: bytes,
    extra: dict[str, tuple[bytes, int]],
    root_src: ExtFs,
    extracted: bool,
) -> tuple[str | None, str, PendingDigest | None]:
    """Copy and change the root filesystem; returns fstab before/after and the sha256 if hashed on the way."""
    root = layout.root
    assert root is not None
    before = layout.fstab if layout.fstab_read else read_fstab(guest_tree(root_src, None))
    after = fstabmod.rewrite(before, label=label, fstype=root.fstype)
    files: dict[str, tuple[bytes, int]] = {"/etc/fstab": (after.encode(), 0o644)}
    if keys:
        files[AUTHORIZED_KEYS] = (_existing_keys(root_src) + keys, 0o600)
    files.update(extra)
    if not extracted:
        digest = _overlay_build(raw, root, rootfs, tmp, files, label)
        if digest is not None:
            return before, after, digest
        extract(raw, root.pieces, rootfs, label=f"extracting {root.name}")
    ExtFs(rootfs, name=f"root filesystem ({root.name})").write_files(
        files, workdir=rootfs.parent, label=label
    )
    return before, after, None


def _overlay_build(
    raw: Path, root: Volume, rootfs: Path, tmp: Path, files: dict[str, tuple[bytes, int]], label: str
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
        meta.unlink(missing_ok=True)
        meta0.unlink(missing_ok=True)
        return None
    try:
        ExtFs(meta, name=f"root filesystem ({root.name})").write_files(files, workdir=tmp, label=label)
        # e2image writes whole host blocks, so its data ranges also cover unrelated filesystem blocks
        # (as zeros): only the blocks the changes really touched are laid over the source.
        changed = changed_ranges(meta0, meta, block)
        digest = compose(raw, root.pieces, meta, rootfs, changed, label=f"extracting {root.name}")
    finally:
        meta.unlink(missing_ok=True)
        meta0.unlink(missing_ok=True)
    # Check the result the way a reader will see it (the files as written, the label in the
    # superblock) while the hash thread finishes.
    try:
        out = ExtFs(rootfs, name="the new root filesystem")
        for gpath, (content, _mode) in files.items():
            if out.cat(gpath) != content:
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
    return digest


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
