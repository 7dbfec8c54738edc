"""Kernel version ordering: 6.1.0-56 is newer than 6.1.0-9 (Debian's dpkg order for the common cases)."""

from __future__ import annotations

import re


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: runs of digits compare as numbers, other runs as text, numbers before text."""
    parts: list[tuple[int, int | str]] = []
    for tok in re.findall(r"\d+|[A-Za-z]+|~", version):
        if tok == "~":
            parts.append((-1, 0))  # a tilde sorts before anything, as in dpkg (6.1~rc1 < 6.1)
        elif tok.isdigit():
            parts.append((1, int(tok)))
        else:
            parts.append((0, tok))
    return tuple(parts)
