"""Root trees of Debian-family distributions, installed by mmdebstrap from the Debian archive.

mmdebstrap writes a tarball (no mounts); with a cache directory it is kept there under the recipe's
tree key, so the tests and repeated `vmtool image create` runs download and unpack the packages once.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path

from vmtool.errors import VmtoolError
from vmtool.recipe.recipe import Recipe
from vmtool.run import run

MMDEBSTRAP_TIMEOUT = 3600


def tree_tarball(recipe: Recipe, cache: Path | None, workdir: Path) -> Path:
    """The recipe's tree as a tarball: from `cache` when it has it, else made by mmdebstrap (and kept)."""
    if shutil.which("mmdebstrap") is None:
        raise VmtoolError(
            f"recipe {recipe.name} needs mmdebstrap", hint="install the Debian package mmdebstrap (and apt)"
        )
    key = recipe.tree_key()
    if cache is not None:
        cached = cache / f"{key}.tar"
        if cached.is_file():
            return cached
        cache.mkdir(parents=True, exist_ok=True)
        where = cache
    else:
        where = workdir
    fd, tmpname = tempfile.mkstemp(prefix=f".{key}-", suffix=".tar", dir=where)
    os.close(fd)
    tmp = Path(tmpname)
    t = recipe.tree
    hooks = [f'chroot "$1" sh -ec {shlex.quote(line)}' for line in t.customize]
    cmd = ["mmdebstrap", "--quiet", f"--variant={t.variant}"]
    if t.packages:
        cmd.append("--include=" + ",".join(t.packages))
    cmd += [f"--customize-hook={h}" for h in hooks]
    cmd += [t.suite, os.fspath(tmp)]
    try:
        run(cmd, timeout=MMDEBSTRAP_TIMEOUT, hint="mmdebstrap needs the Debian archive (see /etc/apt/sources.list.d)")
        out = cache / f"{key}.tar" if cache is not None else workdir / f"{key}.tar"
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def unpack_tree(tarball: Path, dest: Path) -> None:
    """Unpack a tree tarball with owners, modes and extended attributes as they are."""
    dest.mkdir(parents=True, exist_ok=True)
    run(
        ["tar", "-C", os.fspath(dest), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
         os.fspath(tarball)],
        timeout=1800,
        hint="unpacking a distribution tree needs root (owners and device nodes)",
    )
