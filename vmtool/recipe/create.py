"""`vmtool image create`: a recipe in, an installer-style whole-disk image out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmtool.recipe import debian
from vmtool.recipe.busybox import make_rootfs_tree
from vmtool.recipe.disk import make_whole_disk
from vmtool.recipe.recipe import Recipe


def create_disk(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    fmt: str = "raw",
    cache: Path | None = None,
    boot_files: Mapping[str, bytes | str] | None = None,
    boot_symlinks: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Make the recipe's whole-disk image at `out`; returns its layout facts (partitions, LVs, UUIDs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    d = recipe.disk
    with tempfile.TemporaryDirectory(prefix="vmtool-create-", dir=out.parent) as t:
        work = Path(t)
        tree = work / "tree"
        kernels: list[tuple[Path, Path, str]] | None
        if recipe.tree.kind == "busybox":
            from vmtool.launch.host import newest_host_kernel

            kernels = None  # the host's newest
            make_rootfs_tree(tree, label="rootfs", kernel_version=newest_host_kernel()[2])
        else:
            kernels = []  # the distribution's own, in the tree's /boot
            debian.unpack_tree(debian.tree_tarball(recipe, cache, work), tree)
            (tree / "etc/hostname").write_text(recipe.tree.hostname + "\n")
        facts = make_whole_disk(
            out,
            tree=tree,
            table=d.table,
            boot=d.boot,
            boot_fstype=d.boot_fstype,
            root=d.root,
            fstype=d.fstype,
            fstab_style=d.fstab,
            kernels=kernels,
            fmt=fmt,
            vg=d.vg,
            lv_root=d.lv_root,
            lv_swap=d.lv_swap,
            swap_mib=d.swap_mib,
            root_size_mib=d.root_size_mib or None,
            root_label="rootfs",
            boot_files=dict(boot_files or {}),
            boot_symlinks=dict(boot_symlinks or {}),
            consume_tree=True,
        )
    facts["recipe"] = recipe.name
    facts["init"] = recipe.tree.init
    return facts


def make_default_disk(out: str | os.PathLike[str], *, fmt: str = "raw", **kw: Any) -> dict[str, Any]:
    """The embedded default guest's disk (images/default.toml)."""
    from vmtool.recipe.recipe import load_recipe

    return create_disk(load_recipe("default"), out, fmt=fmt, **kw)
