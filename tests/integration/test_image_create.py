"""`vmtool image create` makes an installer-style disk from a recipe in images/ (the busybox default here;
the Debian recipes are made by tests/vm/test_distros.py), and refuses bad recipes up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmtool.cli.main import main

pytestmark = pytest.mark.integration


def test_create_default_and_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "default.raw"
    capsys.readouterr()
    rc = main(
        [
            "image",
            "create",
            "default",
            "-o",
            str(disk),
            "--build",
            str(tmp_path / "out"),
            "--agent",
            "--json",
        ]
    )
    out = capsys.readouterr()
    if rc != 0 and "loop device" in out.err:
        pytest.skip(f"cannot make LVM test images here: {out.err.strip()}")
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert d["recipe"] == "default" and d["facts"]["table"] == "gpt" and d["facts"]["vg"] == "vg0"
    assert d["facts"]["init"] == "vmtool"
    assert d["build"]["guest"]["init"]["kind"] == "vmtool" and d["build"]["agent"]["mode"] == "relay"
    assert d["build"]["guest"]["initrd"]["buses"][0] == "virtio"
    assert (tmp_path / "out/manifest.json").is_file()
    assert main(["inspect", str(disk), "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert ins["init"]["kind"] == "vmtool" and ins["root"] == "/dev/vg0/lv_root"


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ('name = "x"\n[tree]\nkind = "nix"\n', "tree.kind = 'nix'"),
        ('name = "x"\n[disk]\nfstype = "zfs"\n', "disk.fstype = 'zfs'"),
        ('name = "x"\n[tree]\nkind = "mmdebstrap"\n', "tree.suite is needed"),
        ('name = "x"\n[disk]\nsize = 3\n', "unknown key(s) in [disk]: size"),
        ('name = "x"\n[tree]\npackages = "vim"\n', "tree.packages must be a list of strings"),
        ("name = [", "is not valid TOML"),
    ],
    ids=["kind", "fstype", "suite", "unknown-key", "packages", "toml"],
)
def test_bad_recipes_are_refused_before_anything_is_made(
    recipe: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = tmp_path / "bad.toml"
    r.write_text(recipe)
    capsys.readouterr()
    assert main(["image", "create", str(r), "-o", str(tmp_path / "d.raw")]) == 1
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_unknown_recipe_name_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["image", "create", "fedora-99", "-o", str(tmp_path / "d.raw")]) == 1
    err = capsys.readouterr().err
    assert "no recipe named 'fedora-99'" in err and "debian-12" in err and "default" in err
