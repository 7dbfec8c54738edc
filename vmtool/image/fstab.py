"""/etc/fstab parsing and the rewrite for a root-filesystem-only image.

The rewrite keeps every line: the root entry becomes `LABEL=<label> / <fstype> ...`, entries for block
devices that are not in the output (swap, /boot, other LVs or partitions) are commented out with a note,
pseudo filesystems (proc, tmpfs, ...) and network or bind mounts stay as they are, and comments stay.
"""

from __future__ import annotations

from dataclasses import dataclass

PSEUDO = {
    "proc",
    "sysfs",
    "tmpfs",
    "devpts",
    "devtmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "hugetlbfs",
    "mqueue",
    "efivarfs",
    "pstore",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "tracefs",
    "ramfs",
    "bpf",
    "autofs",
    "none",
}
NETWORK = {"nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "sshfs", "glusterfs", "ceph", "fuse.sshfs"}
BLOCK_PREFIXES = ("UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/")
MARK = "# vmtool:"


@dataclass
class Entry:
    spec: str
    file: str
    vfstype: str
    options: str
    freq: str
    passno: str
    line: int  # index in the file's lines


def _unescape(s: str) -> str:
    # fstab encodes spaces etc. as octal escapes (\040)
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1 : i + 4].isdigit() and len(s[i + 1 : i + 4]) == 3:
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[Entry]:
    entries = []
    for n, raw in enumerate(text.splitlines()):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        f = s.split()
        if len(f) < 2:
            continue
        f = f[:6] + ["", "", "auto", "defaults", "0", "0"][len(f) :]
        entries.append(
            Entry(
                _unescape(f[0]),
                _unescape(f[1]),
                f[2] or "auto",
                f[3] or "defaults",
                f[4] or "0",
                f[5] or "0",
                n,
            )
        )
    return entries


def root_entry(text: str | None) -> Entry | None:
    if not text:
        return None
    for e in parse(text):
        if e.file == "/":
            return e
    return None


def is_block_entry(e: Entry) -> bool:
    if e.vfstype in PSEUDO or e.vfstype in NETWORK or e.vfstype.startswith("fuse"):
        return False
    if "bind" in e.options.split(","):
        return False
    return e.spec.startswith(BLOCK_PREFIXES) or e.vfstype == "swap"


def rewrite(text: str | None, *, label: str, fstype: str) -> str:
    """The fstab for the extracted root filesystem (see module doc). A missing fstab gets just the root."""
    root_line = f"LABEL={label}\t/\t{fstype}\t{{opts}}\t0 1"
    if text is None:
        return "# /etc/fstab written by vmtool build\n" + root_line.format(opts="defaults") + "\n"
    lines = text.splitlines()
    entries = parse(text)
    had_root = False
    for e in entries:
        original = lines[e.line]
        if e.file == "/":
            if had_root:
                lines[e.line] = f"{MARK} second root entry disabled: {original}"
                continue
            had_root = True
            opts = e.options if fstype == e.vfstype or e.vfstype == "auto" else "defaults"
            lines[e.line] = f"{MARK} root was: {original}\n" + root_line.format(opts=opts)
        elif is_block_entry(e):
            lines[e.line] = f"{MARK} not in this image: {original}"
    out = "\n".join(lines)
    if not had_root:
        out = root_line.format(opts="defaults") + "\n" + out
    return out + "\n"
