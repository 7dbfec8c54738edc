"""Caches one job user cannot poison for another (docs/stage.md, "Who may write a cache"), with two real
non-root users and the HTCondor plugin's environment (HOME=/root, no XDG_*)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.slotuser import ensure_user, run_as, shared_dir
from vmtool.run import run

pytestmark = [pytest.mark.integration]


@pytest.fixture
def area() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("making the job users needs root")
    d = shared_dir("vmtool-cache-users-")
    d.chmod(0o1777)
    img = d / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"])
    img.chmod(0o644)
    yield d
    run(["rm", "-rf", str(d)])


def _stage(user: object, area: Path, into: str, *extra: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    rc, out, err = run_as(user, [sys.executable, "-m", "vmtool", "stage", str(area / "base.qcow2"),  # type: ignore[arg-type]
                                 "--into", str(area / into), "--json", *extra], cwd=area)
    return rc, (json.loads(out) if out.strip().startswith("{") else {}), err


def _backing(overlay: str) -> str:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", overlay]).stdout)
    return str(info["full-backing-filename"])


def test_another_users_rewritten_base_is_never_used(area: Path) -> None:
    a, b = ensure_user("vmtooljob"), ensure_user("vmtooljob2")
    for layout in ("made by A", "made by root"):
        shared = area / "shared"
        run(["rm", "-rf", str(shared), str(area / "ja")])
        shared.mkdir()
        shared.chmod(0o1777)  # sticky: users add files but cannot replace each other's
        if layout == "made by root":
            for sub in ("bases", "used", "index", "refs", "locks", "tmp"):
                (shared / sub).mkdir()
                (shared / sub).chmod(0o1777)
        rc, res, err = _stage(a, area, "ja", "--cache", str(shared))
        assert rc == 0, err
        base = Path(res["base"])
        assert base.stat().st_uid == a.pw_uid
        # A owns the cached bytes: make them writable again and rewrite them in place
        rc, _o, err = run_as(a, ["sh", "-c", f"chmod u+w {base} && printf PLANTED | dd of={base} bs=1 "
                                             "seek=1048576 conv=notrunc 2>/dev/null"], cwd=area)
        assert rc == 0, err
        rc, res_b, err = _stage(b, area, "jb", "--cache", str(shared))
        assert rc == 1 and res_b == {}, err
        assert "Traceback" not in err and "hint:" in err and "leave --cache" in err, err
        if layout == "made by A":  # A owns bases/ itself, so could swap any file in it: refused whole
            assert f"{shared}/bases has unsafe permissions: it belongs to {a.pw_name}" in err, err
        else:
            assert f"belongs to {a.pw_name}" in err and "not used" in err, err
        assert not (area / "jb").exists()
    # B's default cache (HOME=/root is not B's: a 0700 per-uid directory) gives B its own verified base
    rc, res_b, err = _stage(b, area, "jb")
    assert rc == 0, err
    own = Path(f"/var/tmp/vmtool-{b.pw_uid}")
    assert Path(res_b["base"]).parent == own / "bases" and _backing(res_b["overlay"]) == res_b["base"]
    st = own.stat()
    assert st.st_uid == b.pw_uid and st.st_mode & 0o777 == 0o700
    assert res_b["sha256"] == res["sha256"] and not res_b["cache_hit"]
    run(["rm", "-rf", str(own), f"/var/tmp/vmtool-{a.pw_uid}"])


def test_unsafe_cache_directories_are_refused(area: Path) -> None:
    a, b = ensure_user("vmtooljob"), ensure_user("vmtooljob2")
    loose = area / "loose"
    loose.mkdir()
    loose.chmod(0o2777)  # the old shared layout: group/other-writable, no sticky bit
    rc, _r, err = _stage(a, area, "ja", "--cache", str(loose))
    assert rc == 1 and "unsafe permissions" in err and "chmod +t" in err, err
    theirs = area / "theirs"
    theirs.mkdir()
    os.chown(theirs, a.pw_uid, a.pw_gid)
    theirs.chmod(0o755)
    rc, _r, err = _stage(b, area, "jb", "--cache", str(theirs))
    assert rc == 1 and f"belongs to {a.pw_name}" in err and "leave --cache" in err, err
    assert list(loose.iterdir()) == [] and list(theirs.iterdir()) == []


def test_root_filled_read_only_cache_serves_users(area: Path) -> None:
    b = ensure_user("vmtooljob2")
    ro = area / "ro"
    ro.mkdir()
    ro.chmod(0o755)
    r = run([sys.executable, "-m", "vmtool", "cache", "add", str(area / "base.qcow2"), "--cache", str(ro), "--json"])
    added = json.loads(r.stdout)
    rc, res, err = _stage(b, area, "jb", "--cache", str(ro))
    assert rc == 0, err
    assert res["base"] == added["base"] and res["cache_hit"] and _backing(res["overlay"]) == added["base"]
    assert Path(added["base"]).stat().st_uid == 0
    run(["rm", "-rf", f"/var/tmp/vmtool-{b.pw_uid}"])


def test_plugin_as_job_user_with_the_starters_home(area: Path) -> None:
    """The starter runs the plugin as the job user with HOME=/root: the default cache needs no setup."""
    b = ensure_user("vmtooljob2")
    own = Path(f"/var/tmp/vmtool-{b.pw_uid}")
    run(["rm", "-rf", str(own)])
    sandbox = area / "dir_1" / "scratch"
    sandbox.mkdir(parents=True)
    os.chown(sandbox, b.pw_uid, b.pw_gid)
    sandbox.chmod(0o700)
    url = f"vmimage://{area}/base.qcow2"
    infile = area / "plugin.in"
    infile.write_text(f'[ LocalFileName = "{sandbox}/rootfs.qcow2"; Url = "{url}" ]')
    infile.chmod(0o644)
    plugin = Path(sys.executable).parent / "vmtool_plugin"
    rc, _out, err = run_as(b, [str(plugin), "-infile", str(infile), "-outfile", f"{sandbox}/.out"], cwd=sandbox,
                           env={"_CONDOR_SCRATCH_DIR": str(sandbox)})
    ad = (sandbox / ".out").read_text()
    assert rc == 0 and "TransferSuccess = true" in ad, (err, ad)
    assert _backing(str(sandbox / "rootfs.qcow2")).startswith(f"{own}/bases/")
    assert own.stat().st_uid == b.pw_uid and own.stat().st_mode & 0o777 == 0o700
    run(["rm", "-rf", str(own)])
