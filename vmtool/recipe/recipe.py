"""Image recipes: the data in the top-level images/ folder, read into frozen objects.

A recipe says how to make a root tree (the embedded busybox guest, or a Debian-family distribution
installed by mmdebstrap) and how to lay it out on a disk the way an installer would (partition table,
/boot, LVM, filesystem, fstab style). `vmtool image create RECIPE` turns one into a whole-disk image
(vmtool.recipe.create).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vmtool.datafiles import data_dir
from vmtool.errors import VmtoolError

TREE_KINDS = ("busybox", "mmdebstrap")
INITS = ("vmtool", "systemd", "sysvinit", "openrc")
TABLES = ("gpt", "mbr")
BOOTS = ("partition", "dir")
ROOTS = ("partition", "lvm")
FSTYPES = ("ext2", "ext3", "ext4", "xfs")
FSTAB_STYLES = ("uuid", "label", "mapper")
INITRD_TOOLS = ("initramfs-tools", "dracut", "host")
_NAME = re.compile(r"[a-z0-9][a-z0-9.+_-]*")


class RecipeError(VmtoolError):
    pass


@dataclass(frozen=True)
class TreeSpec:
    """How the root tree is made."""

    kind: str = "busybox"  # busybox: the embedded guest with the host's kernel; mmdebstrap: a distribution
    suite: str = ""  # mmdebstrap: the suite (bookworm)
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    init: str = "vmtool"  # what runs as PID 1 (the agent is hooked into it by `vmtool build --agent`)
    initrd: str = "host"  # initramfs-tools | dracut | host (the host's own initrd, busybox trees)
    # Shell lines run in the finished tree (mmdebstrap --customize-hook "chroot $1 sh -c ...").
    customize: tuple[str, ...] = ()
    hostname: str = "vmtool-guest"


@dataclass(frozen=True)
class DiskSpec:
    """How the tree is laid out on the disk."""

    table: str = "gpt"
    boot: str = "partition"  # a separate /boot partition, or /boot as a directory of the root fs
    boot_fstype: str = "ext4"
    root: str = "lvm"  # the root fs on a partition, or on an LV of an LVM volume group
    fstype: str = "ext4"
    fstab: str = "mapper"  # how fstab names the root and swap: uuid | label | mapper (/dev/mapper/VG-LV)
    vg: str = "vg0"
    lv_root: str = "lv_root"
    lv_swap: str = "lv_swap"
    swap_mib: int = 8
    root_size_mib: int = 0  # 0: the tree's size plus room


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    tree: TreeSpec
    disk: DiskSpec
    path: Path | None = field(default=None, compare=False)

    def tree_key(self) -> str:
        """What identifies the made tree in a cache: a change to the tree part of the recipe changes it."""
        spec = asdict(self.tree)
        spec.pop("hostname")  # written when the disk is made, not part of the cached tree
        text = json.dumps(spec, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in data_dir("images").glob("*.toml"))


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist", hint="give a .toml file or a recipe name")
        return p
    if not _NAME.fullmatch(name_or_path):
        raise RecipeError(f"{name_or_path!r} is not a recipe name", hint=f"one of: {', '.join(recipe_names())}")
    q = data_dir("images") / f"{name_or_path}.toml"
    if not q.is_file():
        raise RecipeError(f"no recipe named {name_or_path!r}", hint=f"one of: {', '.join(recipe_names())}")
    return q


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (images/NAME.toml) or by path, checked whole before anything is made."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}", hint="give a readable UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}", hint="fix the file") from None
    return parse_recipe(data, path)


def _table(data: dict[str, Any], key: str, cls: type, where: Path | None) -> Any:
    raw = data.get(key, {})
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {where}: [{key}] must be a table", hint="see images/README.md")
    defaults = {f.name: f.default for f in fields(cls)}
    known = set(defaults)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(
            f"recipe {where}: unknown key(s) in [{key}]: {', '.join(unknown)}",
            hint=f"known keys: {', '.join(sorted(known))}",
        )
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        default = defaults[k]
        if isinstance(default, tuple):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise RecipeError(f"recipe {where}: {key}.{k} must be a list of strings", hint="see images/README.md")
            v = tuple(v)
        elif type(v) is not type(default):
            raise RecipeError(
                f"recipe {where}: {key}.{k} must be a {type(default).__name__}", hint="see images/README.md"
            )
        kw[k] = v
    return cls(**kw)


def parse_recipe(data: dict[str, Any], path: Path | None = None) -> Recipe:
    unknown = sorted(set(data) - {"name", "description", "tree", "disk"})
    if unknown:
        raise RecipeError(f"recipe {path}: unknown key(s) {', '.join(unknown)}", hint="see images/README.md")
    name = data.get("name", path.stem if path else "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RecipeError(f"recipe {path}: name {name!r} is not a simple name", hint="use [a-z0-9.+_-]")
    tree: TreeSpec = _table(data, "tree", TreeSpec, path)
    disk: DiskSpec = _table(data, "disk", DiskSpec, path)
    checks = (
        ("tree.kind", tree.kind, TREE_KINDS),
        ("tree.init", tree.init, INITS),
        ("tree.initrd", tree.initrd, INITRD_TOOLS),
        ("disk.table", disk.table, TABLES),
        ("disk.boot", disk.boot, BOOTS),
        ("disk.boot_fstype", disk.boot_fstype, ("ext2", "ext3", "ext4")),
        ("disk.root", disk.root, ROOTS),
        ("disk.fstype", disk.fstype, FSTYPES),
        ("disk.fstab", disk.fstab, FSTAB_STYLES),
    )
    for what, value, allowed in checks:
        if value not in allowed:
            raise RecipeError(f"recipe {path}: {what} = {value!r}", hint=f"use one of: {', '.join(allowed)}")
    if tree.kind == "mmdebstrap" and not tree.suite:
        raise RecipeError(f"recipe {path}: tree.suite is needed for mmdebstrap", hint='e.g. suite = "bookworm"')
    if tree.kind == "busybox" and (tree.init != "vmtool" or tree.initrd != "host"):
        raise RecipeError(
            f"recipe {path}: a busybox tree has vmtool's own init and the host's initrd",
            hint='leave tree.init = "vmtool" and tree.initrd = "host"',
        )
    for n in (disk.vg, disk.lv_root, disk.lv_swap):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+_.-]*", n):
            raise RecipeError(f"recipe {path}: {n!r} is not a valid LVM name", hint="use [A-Za-z0-9+_.-]")
    if not 0 <= disk.swap_mib <= 1 << 16 or not 0 <= disk.root_size_mib <= 1 << 22:
        raise RecipeError(f"recipe {path}: swap_mib or root_size_mib out of range", hint="sizes are in MiB")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise RecipeError(f"recipe {path}: description must be a string", hint="see images/README.md")
    return Recipe(name, desc, tree, disk, path)
