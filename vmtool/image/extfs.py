"""ext2/3/4 filesystems read and changed in place with e2fsprogs (debugfs, tune2fs): no mount, no root.

A filesystem is addressed as (file, offset): debugfs takes `FILE?offset=N` (the unix I/O manager's
option), so a filesystem inside a whole-disk image is read without copying it out. Paths are looked up
one component at a time with `stat` (debugfs does not follow a final symlink), so symlinks are resolved
by vmtool inside the guest's namespace (see vmtool.image.guesttree), never on the host.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vmtool.errors import CommandError, ImageError
from vmtool.fsutil import os_error
from vmtool.run import run

# 'ls -p' lines: /inode/mode/uid/gid/name/size/
_LS = re.compile(rb"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
MAX_READ = 64 << 20  # largest guest file read into memory (fstab, authorized_keys)


class ExtFs:
    def __init__(self, path: Path, offset: int = 0, *, name: str = "") -> None:
        self.path = path
        self.offset = offset
        self.name = name or os.fspath(path)
        # Each debugfs run re-opens the filesystem: remember what was looked up (cleared on writes).
        self._cache: dict[str, tuple[int, int, int] | None] = {}
        self._listed: set[str] = set()

    def lookups_from(self, other: ExtFs) -> None:
        """Take what `other` already looked up: for an exact metadata copy of it (e2image -r)."""
        self._cache.update(other._cache)
        self._listed |= other._listed

    @property
    def spec(self) -> str:
        return f"{os.fspath(self.path)}?offset={self.offset}" if self.offset else os.fspath(self.path)

    def _debugfs(self, cmd: str, *, write: bool = False) -> tuple[bytes, str]:
        argv = ["debugfs"] + (["-w"] if write else []) + ["-R", cmd, self.spec]
        try:
            p = run(argv, timeout=300)
        except CommandError as e:
            raise ImageError(
                f"cannot read the ext filesystem in {self.name}: {e.message}",
                hint="the filesystem is damaged; check it with e2fsck on a copy",
            ) from None
        err = p.stderr.decode(errors="replace")
        return p.stdout, err

    def lstat(self, path: str) -> tuple[int, int, int] | None:
        """(inode, mode, size) of `path` without following a final symlink, or None if absent.

        Looked up by listing the parent directory (one debugfs run per directory, cached), so the
        parent chain must already be free of symlinks (vmtool.image.guesttree guarantees it).
        """
        path = "/" + "/".join(p for p in path.split("/") if p)
        if path == "/":
            return (2, S_IFDIR | 0o755, 0)
        if path not in self._cache:
            parent = path.rsplit("/", 1)[0] or "/"
            if parent not in self._listed:
                pst = self.lstat(parent)
                if pst is None or pst[1] & S_IFMT != S_IFDIR:
                    return None
                self.listdir(parent)
            self._cache.setdefault(path, None)
        return self._cache[path]

    def readlink(self, path: str) -> str:
        out, _ = self._debugfs(f'stat "{_q(path)}"')
        m = re.search(rb'Fast link dest: "(.*)"', out)
        if m:
            return m.group(1).decode(errors="surrogateescape")
        data, _ = self._debugfs(f'cat "{_q(path)}"')
        return data.split(b"\0", 1)[0].decode(errors="surrogateescape")

    def listdir(self, path: str) -> list[tuple[str, int]]:
        """(name, mode) of the entries of directory `path` (no . and ..)."""
        path = "/" + "/".join(p for p in path.split("/") if p)
        out, err = self._debugfs(f'ls -p "{_q(path)}"')
        self._listed.add(path)
        if "not found" in err:
            return []
        entries = []
        for line in out.splitlines():
            m = _LS.match(line)
            if not m:
                continue
            name = m.group(5).decode(errors="surrogateescape")
            if name in (".", "..") or int(m.group(1)) == 0:
                continue
            mode = int(m.group(2), 8)
            entries.append((name, mode))
            child = path.rstrip("/") + "/" + name
            if "/" not in name:
                self._cache[child] = (int(m.group(1)), mode, int(m.group(6) or 0))
        return entries

    def read(self, path: str, *, limit: int = MAX_READ) -> bytes:
        st = self.lstat(path)
        if st is None:
            raise ImageError(f"{path} not found in {self.name}")
        if st[1] & S_IFMT != S_IFREG:
            raise ImageError(f"{path} in {self.name} is not a regular file")
        if st[2] > limit:
            raise ImageError(f"{path} in {self.name} is too large ({st[2]} bytes)")
        out, _ = self._debugfs(f'cat "{_q(path)}"')
        return out

    def cat(self, path: str) -> bytes:
        """Contents of `path` as debugfs prints them (no checks: for verifying what vmtool wrote)."""
        return self._debugfs(f'cat "{_q(path)}"')[0]

    def dump(self, files: list[tuple[str, Path]]) -> None:
        """Copy regular files (path in the filesystem, new host file) out, in one debugfs run."""
        sizes = []
        for path, _dest in files:
            st = self.lstat(path)
            if st is None or st[1] & S_IFMT != S_IFREG:
                raise ImageError(f"{path} in {self.name} is not a regular file")
            sizes.append(st[2])
        with tempfile.NamedTemporaryFile("w", prefix=".vmtool-dump-", dir=files[0][1].parent) as script:
            script.write("".join(f'dump "{_q(p)}" "{_q(os.fspath(d))}"\n' for p, d in files))
            script.flush()
            try:
                proc = run(["debugfs", "-f", script.name, self.spec], timeout=600)
            except CommandError as e:
                raise ImageError(f"cannot read the ext filesystem in {self.name}: {e.message}") from None
        err = proc.stderr.decode(errors="replace")
        for (path, dest), size in zip(files, sizes, strict=True):
            if not dest.exists() or dest.stat().st_size != size:
                if "No space left" in err:
                    raise ImageError(
                        f"writing {dest}: no space left on device",
                        hint="free some space or choose another output directory",
                    )
                lines = [ln for ln in err.strip().splitlines() if not ln.startswith("debugfs ")]
                raise ImageError(
                    f"cannot copy {path} out of {self.name}" + (f": {lines[-1]}" if lines else ""),
                    hint="check free space in the output directory",
                )

    def write_files(
        self,
        files: dict[str, tuple[bytes, int]],
        *,
        workdir: Path,
        label: str | None = None,
        symlinks: Mapping[str, str] | None = None,
        xattrs: Mapping[str, bytes] | None = None,
    ) -> None:
        """Create or replace regular files (guest path -> (content, mode)) and symlinks (guest path ->
        target), owned by root; xattrs: guest path -> security.selinux label to set on it.

        Missing parent directories are created (0755, or 0700 for .ssh). An existing entry at the path
        (a file or a symlink) is removed first, so a hostile symlink is replaced, never written through.
        """
        cmds: list[str] = []
        with tempfile.TemporaryDirectory(prefix=".vmtool-write-", dir=workdir) as td:
            for n, (gpath, (content, mode)) in enumerate(sorted(files.items())):
                norm = _normalise(gpath)
                name = norm.rpartition("/")[2]
                host = Path(td) / f"f{n}"
                try:
                    host.write_bytes(content)
                except OSError as e:
                    raise os_error(e, f"staging {norm} to write into {self.name}") from None
                cmds.extend(self._make_room(norm))
                cmds.append(f'write "{_q(os.fspath(host))}" "{_q(name)}"')
                cmds.append(f'sif "{_q(name)}" mode 0{S_IFREG | (mode & 0o7777):o}')
                cmds.append(f'sif "{_q(name)}" uid 0')
                cmds.append(f'sif "{_q(name)}" gid 0')
                cmds.append('cd "/"')
            for gpath, target in sorted((symlinks or {}).items()):
                norm = _normalise(gpath)
                name = norm.rpartition("/")[2]
                cmds.extend(self._make_room(norm))
                cmds.append(f'symlink "{_q(name)}" "{_q(target)}"')
                cmds.append('cd "/"')
            for n, (gpath, value) in enumerate(sorted((xattrs or {}).items())):
                vfile = Path(td) / f"x{n}"
                try:
                    vfile.write_bytes(value)
                except OSError as e:
                    raise os_error(e, f"staging the SELinux label of {gpath}") from None
                cmds.append(f'ea_set -f "{_q(os.fspath(vfile))}" "{_q(_normalise(gpath))}" security.selinux')
            if label is not None:
                cmds.append(f'ssv volume_name "{_q(label)}"')
            self._cache.clear()
            self._listed.clear()
            script = Path(td) / "cmds"
            try:
                script.write_text("\n".join(cmds) + "\n")
            except OSError as e:
                raise os_error(e, f"staging the changes to {self.name}") from None
            try:
                p = run(["debugfs", "-w", "-f", os.fspath(script), self.spec], timeout=300)
            except CommandError as e:
                raise ImageError(f"cannot write into {self.name}: {e.message}") from None
            err = p.stderr.decode(errors="replace")
            for gpath, (content, _mode) in files.items():
                norm = _normalise(gpath)
                if self._debugfs(f'cat "{_q(norm)}"')[0] != content:
                    detail = err.strip().splitlines()[-1] if err.strip() else ""
                    if "space" in err.lower() or "no free" in err.lower():
                        raise ImageError(
                            f"cannot write {norm} into {self.name}: the filesystem is full",
                            hint="free space inside the image's root filesystem",
                        )
                    raise ImageError(
                        f"cannot write {norm} into {self.name}" + (f": {detail}" if detail else "")
                    )
            for gpath, target in (symlinks or {}).items():
                norm = _normalise(gpath)
                if self.readlink(norm) != target:
                    raise ImageError(f"cannot make the symlink {norm} in {self.name}")

    def _make_room(self, norm: str) -> list[str]:
        """debugfs commands that make a new entry's parents, remove a file it replaces (never a
        directory) and cd into its parent."""
        parent = norm.rpartition("/")[0] or "/"
        cmds = self._mkdirs(parent)
        st = self.lstat(norm)
        if st is not None:
            if st[1] & S_IFMT == S_IFDIR:
                raise ImageError(f"{norm} is a directory in the image", hint="remove it from the image first")
            cmds.append(f'rm "{_q(norm)}"')
        cmds.append(f'cd "{_q(parent)}"')
        return cmds

    def _mkdirs(self, parent: str) -> list[str]:
        cmds = []
        cur = ""
        for comp in [c for c in parent.split("/") if c]:
            cur += "/" + comp
            st = self.lstat(cur)
            if st is None:
                cmds.append(f'mkdir "{_q(cur)}"')
                mode = 0o700 if comp == ".ssh" else 0o755
                cmds.append(f'sif "{_q(cur)}" mode 0{S_IFDIR | mode:o}')
                cmds.append(f'sif "{_q(cur)}" uid 0')
                cmds.append(f'sif "{_q(cur)}" gid 0')
            elif st[1] & S_IFMT != S_IFDIR:
                raise ImageError(
                    f"{cur} in {self.name} is not a directory (a symlink or a file)",
                    hint="vmtool does not write through symlinks in the image",
                )
        return cmds

    def get_xattr(self, path: str, name: str) -> bytes | None:
        """The value of extended attribute `name` of `path` (not following a final symlink), or None."""
        if self.lstat(path) is None:
            return None
        with tempfile.TemporaryDirectory(prefix=".vmtool-xattr-") as td:
            out = Path(td) / "v"
            self._debugfs(f'ea_get -f "{_q(os.fspath(out))}" "{_q(path)}" {name}')
            return out.read_bytes() if out.exists() else None

    def set_label(self, label: str) -> None:
        self._cache.clear()
        self._listed.clear()
        try:
            run(["tune2fs", "-L", label, self.spec])
        except CommandError as e:
            raise ImageError(f"cannot relabel {self.name}: {e.message}") from None


def _normalise(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not path.startswith("/") or ".." in parts or not parts:
        raise ImageError(f"guest path {path!r} must be absolute without '..'")
    return "/" + "/".join(parts)


def _q(s: str) -> str:
    if '"' in s or "\n" in s:
        raise ImageError(f"unsupported character in path {s!r}")
    return s
