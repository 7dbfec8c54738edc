"""The top-level `images/` (recipes) and `templates/` folders, wherever vmtool runs from.

In a checkout (and an editable install) they are the repository's own folders. A wheel carries copies
under vmtool/_data/, made at build time by setup.py, because a wheel can only install files inside its
packages.
"""

from __future__ import annotations

from pathlib import Path

from vmtool.errors import VmtoolError

_PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel: vmtool/_data/{images,templates}. Run from a checkout: the repository's folders.
_ROOTS = (_PACKAGE / "_data", _PACKAGE.parent)
FOLDERS = ("images", "templates")


def data_dir(folder: str) -> Path:
    """The `images` or `templates` folder this vmtool uses."""
    if folder not in FOLDERS:
        raise ValueError(folder)
    for root in _ROOTS:
        d = root / folder
        if d.is_dir():
            return d
    raise VmtoolError(
        f"vmtool's {folder}/ folder is missing (looked in {', '.join(str(r) for r in _ROOTS)})",
        hint="reinstall vmtool (pip install .); a wheel carries it as vmtool/_data",
    )


def data_file(folder: str, rel: str) -> Path:
    """A file in `images/` or `templates/`, e.g. data_file("templates", "domain/domain.xml")."""
    p = data_dir(folder) / rel
    if not p.is_file():
        raise VmtoolError(
            f"vmtool's {folder}/{rel} is missing", hint="reinstall vmtool (pip install .)"
        )
    return p
