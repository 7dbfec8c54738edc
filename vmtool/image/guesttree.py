"""The guest's file namespace (root filesystem + a separate /boot), with symlinks resolved inside it.

Symlinks in a hostile image are resolved here, component by component, against the guest's own
filesystems: an absolute target starts again at the guest's root, and a `..` that would climb above the
guest's root is refused as pointing outside the guest filesystem. Nothing is ever resolved on the host.
"""

from __future__ import annotations

from typing import Protocol

from vmtool.errors import ImageError

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
MAX_LINKS = 40


class FsReader(Protocol):
    name: str

    def read(self, path: str) -> bytes: ...

    def lstat(self, path: str) -> tuple[int, int, int] | None: ...

    def readlink(self, path: str) -> str: ...

    def listdir(self, path: str) -> list[tuple[str, int]]: ...


class SymlinkOutside(ImageError):
    pass


class GuestTree:
    def __init__(self, mounts: dict[str, FsReader]) -> None:
        # mount point ("/", "/boot") -> filesystem
        self.mounts = dict(sorted(mounts.items(), key=lambda kv: -len(kv[0])))

    def _fs_for(self, path: str) -> tuple[FsReader, str, str]:
        for mp, fs in self.mounts.items():
            if mp == "/" or path == mp or path.startswith(mp + "/"):
                rel = path[len(mp) :] if mp != "/" else path
                return fs, "/" + rel.lstrip("/"), mp
        raise ImageError(f"no filesystem holds {path}")

    def lstat(self, path: str) -> tuple[int, int, int] | None:
        fs, rel, _ = self._fs_for(path)
        return fs.lstat(rel)

    def fs_of(self, path: str) -> tuple[FsReader, str, str]:
        """(filesystem, path inside it, mount point) of a resolved guest path."""
        return self._fs_for(path)

    def resolve(self, path: str, *, what: str = "") -> str:
        """The guest path with every symlink resolved inside the guest; raises if it leaves the guest."""
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        links = 0
        label = what or path
        while parts:
            comp = parts.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                if not done:
                    raise SymlinkOutside(
                        f"{label}: a symlink points outside the guest filesystem ({path})",
                        hint="the image is hostile or broken; vmtool never follows such links",
                    )
                done.pop()
                continue
            cand = "/" + "/".join([*done, comp])
            st = self.lstat(cand)
            if st is None:
                raise ImageError(f"{label}: {cand} does not exist in the guest", hint="a dangling symlink?")
            if st[1] & S_IFMT == S_IFLNK:
                links += 1
                if links > MAX_LINKS:
                    raise ImageError(
                        f"{label}: too many levels of symlinks", hint="the image has a symlink loop"
                    )
                fs, rel, _ = self._fs_for(cand)
                target = fs.readlink(rel)
                if not target:
                    raise ImageError(f"{label}: empty symlink {cand}")
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            if parts and st[1] & S_IFMT != S_IFDIR:
                raise ImageError(f"{label}: {cand} is not a directory")
            done.append(comp)
        return "/" + "/".join(done)

    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
            return True
        except ImageError:
            return False

    def listdir(self, path: str) -> list[tuple[str, int]]:
        real = self.resolve(path)
        fs, rel, _ = self._fs_for(real)
        return fs.listdir(rel)

    def read_file(self, path: str, limit: int) -> bytes:
        """At most `limit` bytes of a regular file at a resolved guest path."""
        fs, rel, _ = self._fs_for(path)
        st = fs.lstat(rel)
        if st is None or st[1] & S_IFMT != S_IFREG:
            raise ImageError(f"{path} is not a regular file in the guest")
        if st[2] > limit:
            raise ImageError(f"{path} in the guest is larger than {limit} bytes", hint="the image is unusual")
        return fs.read(rel)
