"""A manifest that cannot be read: one clear error with a hint from the real `vmtool` process, never a
traceback. Unreadable files are tried as the user nobody (root reads any file)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtool.run import run

pytestmark = pytest.mark.integration

COMMANDS = [
    ["disk", "assemble", "{m}"],
    ["publish", "openstack", "{m}", "--endpoint", "http://127.0.0.1:9"],
    ["publish", "ec2", "{m}", "--bucket", "b", "--endpoint-url", "http://127.0.0.1:9"],
]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the user nobody can enter (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="vmtool-manifest-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _vmtool(argv: list[str], *, user: str | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "vmtool", *argv]
    if user is not None:
        cmd = [shutil.which("runuser") or "runuser", "-u", user, "--", *cmd]
    proc = run(cmd, check=False, env={"HOME": "/nonexistent"}, timeout=120)
    return proc.returncode, proc.stderr.decode(errors="replace")


@pytest.mark.parametrize("command", COMMANDS, ids=["disk-assemble", "publish-openstack", "publish-ec2"])
def test_unreadable_manifest_as_a_user(shared_dir: Path, command: list[str]) -> None:
    if shutil.which("runuser") is None:
        pytest.fail("runuser (util-linux) is missing: it is part of every Debian system")
    m = shared_dir / "manifest.json"
    m.write_text('{"schema": "vmtool.manifest/1"}\n')
    os.chmod(m, 0o000)
    rc, err = _vmtool([a.replace("{m}", os.fspath(m)) for a in command], user="nobody")
    assert rc == 1, err
    assert f"manifest {m} cannot be read: permission denied" in err
    assert "hint: check the permissions" in err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("command", COMMANDS, ids=["disk-assemble", "publish-openstack", "publish-ec2"])
def test_directory_as_manifest(shared_dir: Path, command: list[str]) -> None:
    rc, err = _vmtool([a.replace("{m}", os.fspath(shared_dir)) for a in command])
    assert rc == 1, err
    assert f"manifest {shared_dir} is a directory" in err and "hint:" in err
    assert "Traceback" not in err and "internal error" not in err


def test_unreadable_directory_of_the_manifest(shared_dir: Path) -> None:
    inner = shared_dir / "build"
    inner.mkdir()
    (inner / "manifest.json").write_text("{}")
    os.chmod(inner, 0o700)  # nobody may not enter it
    rc, err = _vmtool(["disk", "assemble", os.fspath(inner / "manifest.json")], user="nobody")
    assert rc == 1, err
    assert "permission denied" in err and "hint:" in err and "Traceback" not in err
