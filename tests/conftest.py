"""Test tiers and capability probes.

Markers: unit, integration, libvirt, vm, queue, cloud (see pyproject.toml). `make test` runs them all;
a tier skips only where this host really lacks what it needs, and the skip reason says what.
Fixtures live in tests/fixtures/, one module per area, so each part of vmtool owns its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.stage",
    "tests.fixtures.libvirtd",
    "tests.fixtures.beanstalk",
    "tests.fixtures.cloud",
    "tests.fixtures.squid",
    "tests.fixtures.slotuser",
    "tests.fixtures.distros",
]

os.environ.setdefault("PATH", "/usr/bin:/bin")
if "/usr/sbin" not in os.environ["PATH"].split(":"):
    os.environ["PATH"] += ":/usr/sbin:/sbin"


def _missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


# What each tier needs from the host; checked once per session.
TIER_TOOLS = {
    "integration": ("qemu-img", "mke2fs", "debugfs", "tune2fs", "sfdisk"),
    "vm": ("qemu-system-x86_64", "qemu-img", "mke2fs"),
    "libvirt": ("libvirtd", "virtlogd", "qemu-system-x86_64"),
    "queue": ("beanstalkd",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for tier, tools in TIER_TOOLS.items():
        miss = _missing(*tools)
        reasons[tier] = f"host lacks {', '.join(miss)} (run 'make deps' as root)" if miss else None
    if reasons.get("vm") is None and not any(n.startswith("vmlinuz-") for n in os.listdir("/boot")):
        reasons["vm"] = "no kernel in /boot (install linux-image-amd64)"
    tiers = set(config.getini("markers") and [m.split(":")[0] for m in config.getini("markers")])
    for item in items:
        # the folder is the tier (tests/<tier>/test_*.py): `-m vm` selects tests/vm/ whatever a file marks
        folder = Path(str(item.fspath)).parent.name
        if folder in tiers and not item.get_closest_marker(folder):
            item.add_marker(getattr(pytest.mark, folder))
        for tier, reason in reasons.items():
            if reason and item.get_closest_marker(tier):
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier: {reason}"))
