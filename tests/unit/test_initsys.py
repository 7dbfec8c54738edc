"""Init detection from a guest tree and the agent hook each init gets (an in-memory tree, no tools)."""

from __future__ import annotations

import pytest

from vmtool.errors import ImageError
from vmtool.image import initsys
from vmtool.image.guesttree import S_IFDIR, S_IFLNK, S_IFREG, GuestTree

pytestmark = pytest.mark.unit

BINARY = b"\x7fELF" + b"\0" * (200 << 10)  # larger than a script: never read


class MemFs:
    name = "mem"

    def __init__(self, entries: dict[str, bytes | str]) -> None:
        # path -> bytes (file) or str (symlink target); parents are directories
        self.entries = entries

    def _dirs(self) -> set[str]:
        out = {"/"}
        for p in self.entries:
            parts = p.split("/")[1:-1]
            for i in range(1, len(parts) + 1):
                out.add("/" + "/".join(parts[:i]))
        return out

    def lstat(self, path: str) -> tuple[int, int, int] | None:
        if path in self.entries:
            v = self.entries[path]
            return (1, S_IFLNK | 0o777, len(v)) if isinstance(v, str) else (1, S_IFREG | 0o755, len(v))
        return (1, S_IFDIR | 0o755, 0) if path in self._dirs() else None

    def readlink(self, path: str) -> str:
        v = self.entries[path]
        assert isinstance(v, str)
        return v

    def listdir(self, path: str) -> list[tuple[str, int]]:
        return []

    def read(self, path: str) -> bytes:
        v = self.entries[path]
        assert isinstance(v, bytes)
        return v


def tree(entries: dict[str, bytes | str]) -> GuestTree:
    return GuestTree({"/": MemFs(entries)})


@pytest.mark.parametrize(
    ("entries", "kind"),
    [
        ({"/sbin/init": "../lib/systemd/systemd", "/lib/systemd/systemd": BINARY}, "systemd"),
        (
            {"/sbin": "usr/sbin", "/usr/sbin/init": BINARY, "/etc/inittab": b"id:2:initdefault:\n"},
            "sysvinit",
        ),
        (
            {
                "/sbin/init": "/bin/busybox",
                "/bin/busybox": BINARY,
                "/sbin/openrc": BINARY,
                "/etc/inittab": b"::sysinit:/sbin/openrc sysinit\n",
            },
            "openrc",
        ),
        ({"/sbin/init": b"#!/bin/busybox sh\n# vmtool default guest init: set up\n"}, "vmtool"),
        ({"/sbin/init": b"#!/bin/sh\nexec /opt/myinit\n"}, "unknown"),
        ({"/etc/hostname": b"x\n"}, "unknown"),
    ],
    ids=["systemd", "sysvinit", "openrc", "vmtool", "script", "none"],
)
def test_detect(entries: dict[str, bytes | str], kind: str) -> None:
    assert initsys.detect(tree(entries)).kind == kind


def test_hooks() -> None:
    sysd = tree({"/sbin/init": "/lib/systemd/systemd", "/lib/systemd/systemd": BINARY})
    h = initsys.hook(initsys.detect(sysd), sysd)
    assert h.symlinks == {initsys.SYSTEMD_WANTS: "../vmtool-agent.service"}
    assert b"After=local-fs.target" in h.files[initsys.SYSTEMD_UNIT][0]
    sysv = tree({"/sbin/init": BINARY, "/etc/inittab": b"id:2:initdefault:"})
    h = initsys.hook(initsys.detect(sysv), sysv)
    text = h.files[initsys.INITTAB][0]
    assert text.startswith(b"id:2:initdefault:\n") and text.endswith(
        b"va:2345:once:/usr/lib/vmtool/agent-boot\n"
    )
    # Built twice: the entry is not added again.
    again = tree({"/sbin/init": BINARY, "/etc/inittab": text})
    assert initsys.hook(initsys.detect(again), again).files[initsys.INITTAB][0] == text
    unknown = tree({"/sbin/init": b"#!/bin/sh\n"})
    with pytest.raises(ImageError) as e:
        initsys.hook(initsys.detect(unknown), unknown)
    assert "cannot start its agent" in e.value.message and "agent-boot" in (e.value.hint or "")
