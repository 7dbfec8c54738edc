"""A wheel carries what runs at run time: the recipes (images/) and templates/ (one wheel build, one venv)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from vmtool.run import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_wheel_in_fresh_venv_has_recipes_and_templates(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # Built the way `pip install .` builds it (isolated, current setuptools), outside the checkout.
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", os.fspath(wheels), os.fspath(REPO)],
        timeout=600,
        cwd=tmp_path,
    )
    (whl,) = wheels.glob("vmtool-*.whl")
    venv = tmp_path / "venv"
    run(["python3", "-m", "venv", os.fspath(venv)], timeout=300)
    run([os.fspath(venv / "bin/pip"), "install", "-q", "--no-deps", os.fspath(whl)], timeout=300)
    py = os.fspath(venv / "bin/python")
    # Run from / so the checkout is not on sys.path: everything must come from site-packages.
    out = run([py, "-m", "vmtool", "image", "list", "--json"], cwd="/", timeout=120).stdout
    recipes = {r["name"]: r for r in json.loads(out)["recipes"]}
    assert {"default", "debian-12", "debian-12-sysvinit", "debian-12-dracut-xfs"} <= set(recipes)
    assert "/site-packages/vmtool/_data/images/" in recipes["debian-12"]["path"]
    probe = (
        "from vmtool.datafiles import data_file\n"
        "from vmtool.queue.agent import agent_files\n"
        "for rel in ('domain/domain.xml', 'init/vmtool-agent.service', 'init/agent-boot', "
        "'init/vmtool-agent.openrc', 'init/inittab.line'):\n"
        "    p = data_file('templates', rel)\n"
        "    assert '/site-packages/vmtool/_data/templates/' in str(p), p\n"
        "    assert p.read_bytes()\n"
        "assert b'vmtool guest agent' in agent_files('relay')['/usr/lib/vmtool/agent.sh'][0]\n"
        "print('ok')\n"
    )
    assert run([py, "-c", probe], cwd="/", timeout=120).stdout.strip() == b"ok"
