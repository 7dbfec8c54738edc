"""CLI for `vmtool inspect` and `vmtool build`."""

from __future__ import annotations

import argparse
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmtool.cli.output import add_json_flag, emit
from vmtool.image.formats import FORMATS, ImageFormat
from vmtool.image.options import Backend
from vmtool.queue.agent import AgentMode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a whole-disk image's partitions, LVM, filesystems and kernels",
        description="Show the partition table, LVM volumes, filesystems (type, label, UUID), "
        "which one is root and /boot, and the kernels found. Needs no root.",
    )
    p.add_argument("image", metavar="DISK", help="whole-disk image (raw or qcow2)")
    p.add_argument("--format", choices=FORMATS, help="image format (default: from its header)")
    p.add_argument("--root", metavar="NAME", help="the root volume, when several could be (see the list)")
    add_json_flag(p)
    p.set_defaults(func=cmd_inspect)

    b = sub.add_parser(
        "build",
        help="turn a whole-disk image into kernel + initrd + rootfs + manifest",
        description="Extract the root filesystem of a whole-disk image (partition or LVM LV), "
        "relabel it, rewrite its fstab, and copy out the newest kernel and initrd.",
    )
    # The choices of these options are checked once, by BuildOptions (a clear error with a hint).
    b.add_argument("image", metavar="DISK", help="whole-disk image (raw or qcow2)")
    b.add_argument("-o", "--output", dest="outdir", metavar="OUTDIR", required=True, help="output directory")
    b.add_argument("--format", metavar=_one_of(ImageFormat), help="image format (default: from its header)")
    b.add_argument("--label", help="root filesystem label (default cloudimg-rootfs; xfs allows 12 bytes)")
    b.add_argument(
        "--rootfs-format", metavar=_one_of(ImageFormat), default="raw", help="format of the rootfs file"
    )
    b.add_argument("--kernel-version", metavar="V", help="use this kernel version instead of the newest")
    b.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="FILE",
        type=Path,
        help="append this public key to root's authorized_keys (repeatable)",
    )
    b.add_argument(
        "--backend",
        metavar=_one_of(Backend),
        default="auto",
        help="native: no root, no appliance (ext2/3/4); guestfs: libguestfs appliance (any fs)",
    )
    b.add_argument(
        "--root", metavar="NAME", help="the root volume, when several could be (see vmtool inspect)"
    )
    b.add_argument("--force", action="store_true", help="replace OUTDIR if it exists and is not empty")
    b.add_argument(
        "--agent",
        nargs="?",
        const="relay",
        metavar=_one_of(AgentMode),
        default=None,
        help="install the vmtool guest agent (default mode: relay)",
    )
    b.add_argument(
        "--no-initrd-check",
        dest="initrd_check",
        action="store_false",
        help="do not read the initrd for its disk drivers (the guest is then booted from virtio)",
    )
    b.add_argument("--disk", action="store_true", help="also assemble a bootable whole-disk image")
    b.add_argument(
        "--disk-format", metavar=_one_of(ImageFormat), default="raw", help="format of the --disk image"
    )
    add_json_flag(b)
    b.set_defaults(func=cmd_build)

    img = sub.add_parser(
        "image",
        help="make whole-disk images from the recipes in images/",
        description="Image recipes (images/*.toml) say how to make a root tree and lay it out on a disk "
        "as an installer would; a site can make a worker image without running an installer.",
    )
    isub = img.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    c = isub.add_parser(
        "create",
        help="make an installer-style whole-disk image from a recipe",
        description="Make a whole-disk image from RECIPE (a name from `vmtool image list`, or a .toml "
        "file). Distribution recipes run mmdebstrap and need root.",
    )
    c.add_argument("recipe", metavar="RECIPE", help="recipe name or .toml file")
    c.add_argument("-o", "--output", dest="out", metavar="DISK", required=True, help="the disk image to write")
    c.add_argument("--format", choices=FORMATS, default="raw", help="format of DISK (default raw)")
    c.add_argument(
        "--cache", metavar="DIR", type=Path, help="keep the distribution tree here and reuse it next time"
    )
    c.add_argument("--build", metavar="OUTDIR", help="then `vmtool build` DISK into OUTDIR")
    c.add_argument(
        "--agent",
        nargs="?",
        const="relay",
        metavar=_one_of(AgentMode),
        default=None,
        help="with --build: install the guest agent (default mode: relay)",
    )
    c.add_argument("--force", action="store_true", help="replace DISK (and OUTDIR) if they exist")
    add_json_flag(c)
    c.set_defaults(func=cmd_image_create)
    ls = isub.add_parser("list", help="list the recipes in images/")
    add_json_flag(ls)
    ls.set_defaults(func=cmd_image_list)


def _one_of(kind: type[StrEnum]) -> str:
    return "{" + ",".join(m.value for m in kind) + "}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def render_inspect(d: dict[str, Any]) -> str:
    out = []
    disk = d["disk"]
    pt = d["partition_table"]
    out.append(f"disk: {disk['path']} ({disk['format']}, {_size(disk['size'])})")
    out.append(f"partition table: {pt['kind']}" + (f" (id {pt['disk_id']})" if pt.get("disk_id") else ""))
    for vg in d["volume_groups"]:
        lvs = ", ".join(f"{lv['name']} {_size(lv['size'])}" for lv in vg["lvs"])
        out.append(f"volume group: {vg['name']} (extent {_size(vg['extent_size'])}; LVs: {lvs or 'none'})")
    out.append("")
    rows = [("NAME", "SIZE", "TYPE", "FSTYPE", "LABEL", "UUID", "ROLE")]
    for v in d["filesystems"]:
        role = v["role"] or ""
        if v["mountpoint"] and v["mountpoint"] not in ("/",):
            role = f"{role} ({v['mountpoint']})" if role else v["mountpoint"]
        if v["unsupported"]:
            role = (role + " " if role else "") + f"[unsupported: {v['unsupported']}]"
        kind = v["partition_type"] or v["kind"]
        rows.append(
            (
                v["name"],
                _size(v["size"]),
                kind,
                v["fstype"] or "-",
                v["label"] or "-",
                v["uuid"] or "-",
                role or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    out.append("")
    out.append(f"root: {d['root']} ({d['root_reason']})")
    out.append(f"boot: {d['boot'] or 'directory in root'} ({d['boot_reason']})")
    if d["kernels"]:
        out.append("kernels:")
        for k in d["kernels"]:
            mark = "  (newest)" if k["version"] == d["newest_kernel"] else ""
            link = f" -> {k['resolved']}" if k["resolved"] != k["path"] else ""
            initrd = k["initrd"] or "no initrd"
            out.append(f"  {k['version']}: {k['path']}{link}, {initrd}{mark}")
    else:
        out.append(f"kernels: {d['kernels_note'] or 'none found'}")
    if d.get("init"):
        out.append(f"init: {d['init']['kind']} ({d['init']['evidence']})")
    if d["fstab"] is not None:
        out.append("fstab:")
        out.extend(f"  {line}" for line in d["fstab"].splitlines())
    for n in d["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    from vmtool.image.inspect import inspect_disk
    from vmtool.image.source import open_source, raw_view

    src = open_source(args.image, args.format)
    with tempfile.TemporaryDirectory(prefix="vmtool-inspect-") as td:
        tmp = Path(td)
        with raw_view(src, tmp) as raw:
            made: dict[str, Path] = {}

            def materialize(v: Any) -> Path:
                from vmtool.image.extract import extract

                if v.name not in made:
                    made[v.name] = tmp / f"vol{len(made)}.img"
                    extract(raw, v.pieces, made[v.name], label=f"reading {v.name}")
                return made[v.name]

            layout = inspect_disk(src, raw, root_spec=args.root, materialize=materialize)
            data = layout.to_dict()
    emit(args, data, render_inspect(data))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from vmtool.image.build import build
    from vmtool.image.options import BuildOptions

    opts = BuildOptions(
        source=Path(args.image),
        outdir=Path(args.outdir),
        format=args.format,
        label=args.label,
        rootfs_format=args.rootfs_format,
        kernel_version=args.kernel_version,
        ssh_keys=tuple(args.ssh_key),
        backend=args.backend,
        root=args.root,
        force=args.force,
        agent=args.agent,
        disk=args.disk,
        disk_format=args.disk_format,
        initrd_check=args.initrd_check,
    )
    res = build(opts)
    data = res.manifest.to_dict()
    data["outdir"] = str(res.outdir)
    emit(args, data, _build_text(res))
    return 0


def _build_text(res: Any) -> str:
    m = res.manifest
    return "\n".join(
        [
            f"built {res.outdir} with the {res.backend} backend ({res.backend_reason})",
            f"  rootfs:  {m.rootfs.path} ({m.rootfs.fstype}, label {m.rootfs.label}, {_size(m.rootfs.virtual_size)}, "
            f"{_size(m.rootfs.allocated_size)} allocated)",
            f"  kernel:  {m.kernel.path}",
            f"  initrd:  {m.initrd.path}",
            f"  cmdline: {m.cmdline}",
            *_guest_lines(m.extra.get("guest")),
            *([f"  disk:    {m.disk.path} ({m.disk.format})"] if m.disk else []),
            "  manifest.json",
        ]
    )


def _guest_lines(guest: Any) -> list[str]:
    if not guest:
        return []
    lines = [f"  init:    {guest['init']['kind']} ({guest['init']['evidence']})"]
    if guest.get("agent_hook"):
        lines.append(f"  agent:   {guest['agent_hook']}")
    ird = guest.get("initrd")
    if ird:
        lines.append(
            f"  initrd:  {'+'.join(ird['archives'])} by {ird['generator']}; boots from "
            f"{', '.join(ird['buses'])}"
        )
        lines.extend(f"  warning: {w}" for w in ird["warnings"])
    for s in guest.get("selinux") or []:
        lines.append(f"  selinux: {s}")
    return lines


def cmd_image_list(args: argparse.Namespace) -> int:
    from vmtool.recipe.recipe import load_recipe, recipe_names

    recipes = [load_recipe(n) for n in recipe_names()]
    data = {"recipes": [{"name": r.name, "description": r.description, "path": str(r.path)} for r in recipes]}
    width = max((len(r.name) for r in recipes), default=0)
    emit(args, data, "\n".join(f"{r.name.ljust(width)}  {r.description}" for r in recipes))
    return 0


def cmd_image_create(args: argparse.Namespace) -> int:
    from vmtool.errors import VmtoolError
    from vmtool.recipe.create import create_disk
    from vmtool.recipe.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    if args.agent and not args.build:
        raise VmtoolError("--agent needs --build OUTDIR", hint="add --build OUTDIR, or drop --agent")
    if out.exists() and not args.force:
        raise VmtoolError(f"{out} exists", hint="choose another -o, or add --force")
    if out.is_dir():
        raise VmtoolError(f"{out} is a directory", hint="give a file name for the disk image")
    from vmtool.image.build import build
    from vmtool.image.options import BuildOptions

    # Checked before the disk is made, so a bad option leaves nothing behind.
    opts = BuildOptions(source=out, outdir=Path(args.build), force=args.force, agent=args.agent) if args.build else None
    facts = create_disk(recipe, out, fmt=args.format, cache=args.cache)
    data: dict[str, Any] = {"recipe": recipe.name, "disk": str(out), "format": args.format, "facts": facts}
    lines = [f"made {out} ({args.format}) from recipe {recipe.name}: {recipe.description}"]
    if opts is not None:
        res = build(opts)
        data["build"] = res.manifest.to_dict()
        lines.append(_build_text(res))
    emit(args, data, "\n".join(lines))
    return 0
