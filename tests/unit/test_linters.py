"""ruff and mypy are part of the test suite, so `make test` fails on a lint or type error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmtool.run import run

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.unit


def test_ruff() -> None:
    proc = run([os.fspath(BIN / "ruff"), "check", "vmtool", "tests", "bench"], cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_mypy() -> None:
    proc = run([os.fspath(BIN / "mypy")], cwd=ROOT, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_only_run_py_imports_subprocess() -> None:
    offenders = []
    for p in (ROOT / "vmtool").rglob("*.py"):
        if p.name == "run.py" and p.parent.name == "vmtool":
            continue
        text = p.read_text()
        if "import subprocess" in text or "from subprocess" in text:
            offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []


def test_library_never_prints_or_exits() -> None:
    offenders = []
    for p in (ROOT / "vmtool").rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[1] in ("cli",) or rel.name in ("__main__.py", "plugin.py"):
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("#"):
                continue
            if s.startswith("print(") or "sys.exit(" in s:
                offenders.append(f"{rel}:{n}: {s}")
    assert offenders == []


# Tiers from lightest to heaviest: a test file lives in the folder of the heaviest tier it is marked with.
TIERS = ("unit", "integration", "queue", "cloud", "libvirt", "vm", "condor")


def test_test_folders_are_the_pytest_tiers() -> None:
    import re
    import tomllib

    declared = {m.split(":")[0] for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    assert declared == set(TIERS)
    misplaced = []
    for f in sorted((ROOT / "tests").glob("*/test_*.py")):
        folder = f.parent.name
        marks = set(re.findall(r"pytest\.mark\.(\w+)", f.read_text())) & set(TIERS)
        heaviest = max(marks | {folder}, key=lambda t: TIERS.index(t) if t in TIERS else len(TIERS))
        if folder not in TIERS or heaviest != folder:
            misplaced.append(f"{f.relative_to(ROOT)}: marked {sorted(marks)}")
    assert misplaced == [], "move each file to tests/<its heaviest tier>/"
