"""Bad input for an unprivileged launch: one clear error each (what, why, the fix), exit 1, no traceback,
and nothing left behind (no daemon, no session directory)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from tests.fixtures.libvirtd import make_guest
from tests.fixtures.slotuser import JobSlot, ensure_user, shared_dir, world_readable
from vmtool.run import run

pytestmark = [pytest.mark.libvirt]


@pytest.fixture(scope="module")
def guest() -> tuple[Path, Path]:
    d = shared_dir("vmtool-unpriv-err-")
    out = make_guest(d, "g", {"10-hi": "#!/bin/sh\necho hi\n"})
    world_readable(d, *d.iterdir())
    yield out
    run(["rm", "-rf", str(d)])


def _fails(proc_args: tuple[int, bytes, bytes], *needles: str) -> str:
    rc, out, err = proc_args
    text = err.decode()
    assert rc == 1, (rc, out, text)
    assert "Traceback" not in text and text.count("vmtool: error:") == 1 and "hint:" in text, text
    for n in needles:
        assert n in text, (n, text)
    return text


def _run(slot: JobSlot, *args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    p = slot.vmtool(*args, env=env)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _clean(slot: JobSlot) -> None:
    assert slot.procs_of_user() == []
    assert [p for p in Path("/tmp").glob("vmtool-session-*") if p.lstat().st_uid == slot.user.pw_uid] == []


def test_system_uri_without_the_libvirt_group(libvirt_uri: str, guest: tuple[Path, Path],
                                              job_user: object) -> None:
    outsider = ensure_user("vmtooljob2")
    run(["gpasswd", "-d", outsider.pw_name, "libvirt"], check=False)
    slot = JobSlot(outsider, memory_mib=1536)
    try:
        manifest, _img = guest
        text = _fails(_run(slot, "launch", "--manifest", str(manifest), "--uri", libvirt_uri),
                      f"cannot connect to libvirt at {libvirt_uri}", "usermod -aG libvirt vmtooljob2",
                      "qemu:///session")
        assert "ermission denied" in text or "system bus" in text
        _clean(slot)
    finally:
        slot.remove()
        run(["usermod", "-aG", "libvirt", outsider.pw_name])


def test_kvm_demanded_without_the_kvm_group(guest: tuple[Path, Path], job_user: object) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("this host has no /dev/kvm")
    outsider = ensure_user("vmtooljob2")
    run(["gpasswd", "-d", outsider.pw_name, "kvm"], check=False)
    slot = JobSlot(outsider, memory_mib=1536)
    try:
        manifest, img = guest
        _fails(_run(slot, "launch", "--manifest", str(manifest), env={"VMTOOL_KVM": "1"}),
               "VMTOOL_KVM=1 demands KVM", "usermod -aG kvm vmtooljob2")
        _clean(slot)
    finally:
        slot.remove()
        run(["usermod", "-aG", "kvm", outsider.pw_name])


def test_no_session_daemon_binary(guest: tuple[Path, Path], job_slot: JobSlot) -> None:
    manifest, _img = guest
    empty = job_slot.base / "not-a-daemon"
    empty.write_bytes(b"")
    empty.chmod(0o644)
    hide = " && ".join(f"mount --bind {empty} {p}" for p in ("/usr/sbin/libvirtd", "/usr/sbin/virtqemud")
                       if os.path.exists(p))
    drop = ["setpriv", f"--reuid={job_slot.user.pw_uid}", f"--regid={job_slot.user.pw_gid}", "--init-groups",
            "--", "env", "-i", *(f"{k}={v}" for k, v in job_slot.env().items()),
            sys.executable, "-m", "vmtool", "launch", "--manifest", str(manifest)]
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"{hide} && cd {job_slot.sandbox} && exec {shlex.join(drop)}"], check=False, timeout=120)
    _fails((r.returncode, r.stdout, r.stderr), "no libvirt daemon for qemu:///session is installed",
           "libvirt-daemon")
    _clean(job_slot)


def test_slot_cgroup_not_writable(guest: tuple[Path, Path], job_slot: JobSlot) -> None:
    manifest, _img = guest
    _fails(_run(job_slot, "launch", "--manifest", str(manifest), "--cgroup-parent", job_slot.rel),
           "the slot cgroup /sys/fs/cgroup/", f"{job_slot.rel} (--cgroup-parent) is not writable by vmtooljob",
           "delegate")
    _clean(job_slot)


def test_sandbox_of_another_user(guest: tuple[Path, Path], job_slot: JobSlot) -> None:
    manifest, _img = guest
    theirs = job_slot.base / "theirs"
    theirs.mkdir(mode=0o777)
    theirs.chmod(0o777)
    text = _fails(_run(job_slot, "launch", "--manifest", str(manifest), "--sandbox", str(theirs),
                       "--report", "r.json"),
                  f"the sandbox {theirs} belongs to root, not to vmtooljob", "--sandbox")
    assert "console log" in text
    assert json.loads((job_slot.sandbox / "r.json").read_text())["exit_reason"] == "error"
    assert list(theirs.iterdir()) == []
    _clean(job_slot)
