"""`vmtool build --agent` and `--disk`: the hooks other areas plug into the build."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmtool.cli.main import main
from vmtool.run import run

pytestmark = pytest.mark.integration


def test_agent_files_written_into_the_rootfs(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmtool.queue.agent import AGENT_VERSION, agent_files

    capsys.readouterr()
    assert main(["build", str(default_disk), "-o", str(tmp_path / "out"), "--agent", "relay", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["agent"] == {
        "mode": "relay",
        "version": AGENT_VERSION,
        "init": "vmtool",
        "hook": "started by vmtool's own init from /etc/vmtool/rc.d",
    }
    assert m["guest"]["init"]["kind"] == "vmtool"
    rootfs = tmp_path / "out/rootfs.img"
    for path, (content, mode) in agent_files("relay").items():
        assert run(["debugfs", "-R", f"cat {path}", str(rootfs)]).stdout == content
        parent, name = os.path.split(path)
        ls = run(["debugfs", "-R", f"ls -p {parent}", str(rootfs)]).stdout.decode()
        assert f"/{0o100000 | mode:o}/0/0/{name}/{len(content)}/" in ls
    run(["e2fsck", "-fn", str(rootfs)])


def test_disk_is_assembled_and_recorded(
    default_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    rc = main(
        [
            "build",
            str(default_disk),
            "-o",
            str(tmp_path / "out"),
            "--disk",
            "--disk-format",
            "qcow2",
            "--json",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    m = json.loads(cap.out)
    assert m["disk"] is not None and m["disk"]["format"] == "qcow2"
    assert (tmp_path / "out" / m["disk"]["path"]).is_file()
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk["disk"] == m["disk"]
