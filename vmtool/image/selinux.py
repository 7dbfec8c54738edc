"""SELinux labels for the files a build writes into an enforcing (or permissive) guest.

An SELinux guest cannot read a file without its security.selinux label (an fstab or authorized_keys
written unlabelled is denied at boot). Each file vmtool writes or replaces gets a label: the label of
the file it replaces, else the one the guest's own policy gives its path (file_contexts, last match
wins as in setfiles, file_contexts.local after it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmtool.errors import ImageError
from vmtool.image.initsys import TreeReader

CONFIG = "/etc/selinux/config"
XATTR = "security.selinux"
_TYPES = {"--": "file", "-d": "dir", "-l": "link", "-c": "chr", "-b": "blk", "-s": "sock", "-p": "fifo"}


@dataclass(frozen=True)
class SelinuxPolicy:
    mode: str  # enforcing | permissive
    name: str  # SELINUXTYPE (targeted, mls ...)
    contexts: tuple[tuple[re.Pattern[str], str | None, str], ...]  # (path regex, file type, context)

    def label_for(self, path: str, kind: str) -> str | None:
        found = None
        for rx, ftype, ctx in self.contexts:
            if (ftype is None or ftype == kind) and rx.fullmatch(path):
                found = ctx
        return None if found in (None, "<<none>>") else found


def _read(tree: TreeReader, path: str) -> bytes | None:
    try:
        return tree.read_file(tree.resolve(path), 64 << 20)
    except ImageError:
        return None


def load_policy(tree: TreeReader) -> SelinuxPolicy | None:
    """The guest's policy when /etc/selinux/config turns SELinux on; None when it is off or absent."""
    raw = _read(tree, CONFIG)
    if raw is None:
        return None
    conf = dict(re.findall(r"^\s*(SELINUX|SELINUXTYPE)\s*=\s*\"?([A-Za-z0-9_-]+)", raw.decode(errors="replace"), re.M))
    mode = conf.get("SELINUX", "disabled").lower()
    if mode not in ("enforcing", "permissive"):
        return None
    name = conf.get("SELINUXTYPE", "targeted")
    base = f"/etc/selinux/{name}/contexts/files/file_contexts"
    text = _read(tree, base)
    if text is None:
        raise ImageError(
            f"SELinux is {mode} in the guest ({CONFIG}) but its policy has no {base}",
            hint=f"install the {name} policy in the image (e.g. selinux-policy-{name}), or set "
            "SELINUX=disabled in /etc/selinux/config if the guest should run without SELinux",
        )
    contexts: list[tuple[re.Pattern[str], str | None, str]] = []
    for t in (text, _read(tree, base + ".local") or b""):
        for line in t.decode(errors="replace").splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) == 2:
                rx, ftype, ctx = parts[0], None, parts[1]
            elif len(parts) == 3 and parts[1] in _TYPES:
                rx, ftype, ctx = parts[0], _TYPES[parts[1]], parts[2]
            else:
                continue
            try:
                contexts.append((re.compile(rx), ftype, ctx))
            except re.error:
                continue  # a PCRE construct Python lacks: that line labels nothing vmtool writes
    return SelinuxPolicy(mode, name, tuple(contexts))


def labels(
    policy: SelinuxPolicy,
    files: Iterable[str],
    links: Iterable[str],
    existing: Callable[[str], bytes | None],
) -> tuple[dict[str, bytes], list[str]]:
    """security.selinux values for the paths written (guest path -> NUL-ended context), and a line per
    path saying where its label came from."""
    out: dict[str, bytes] = {}
    said: list[str] = []
    for kind, paths in (("file", files), ("link", links)):
        for p in sorted(paths):
            old = existing(p)
            if old:
                out[p] = old if old.endswith(b"\0") else old + b"\0"
                said.append(f"{p}: {old.rstrip(bytes(1)).decode(errors='replace')} (kept from the file it replaces)")
                continue
            ctx = policy.label_for(p, kind)
            if ctx is None:
                raise ImageError(
                    f"the guest's SELinux policy ({policy.name}) gives {p} no label",
                    hint="add a file_contexts.local entry for it in the image, or relabel the guest "
                    "(touch /.autorelabel) yourself",
                )
            out[p] = ctx.encode() + b"\0"
            said.append(f"{p}: {ctx} (from file_contexts)")
    return out, said
