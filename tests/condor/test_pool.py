"""templates/condor/ in a real HTCondor 23.9 pool (tests/fixtures/condor.py), submitted by a non-root user.

The submit files are the examples with only paths changed (images under /nfs/images/<guest>/, the
host kernel's file names); the memory test also gives the guest a VM memory limit it will pass.
- the startd runs vmtool_plugin -classad and the VMIMAGE_TEST_URL check: vmimage is advertised, and a
  test URL that fails moves it to OfflineFileTransferPluginMethods (and back after the fix);
- launch-vanilla.sub: the real starter runs the vmimage:// plugin (default cache, no set-up), the
  wrapper runs `vmtool launch`, the guest powers off, the job exits 0 with vm-report.json and console.log;
- a vmimage:// URL that fails: held with the transfer hold code 13 and vmtool's error in HoldReason;
- a guest that exceeds its VM's memory limit: held by the example's on_exit_hold (vmtool exit 5);
- condor_rm while the guest boots: nothing of the job's user is left (no qemu, no session libvirtd);
- the VM universe (condor_vm-gahp, type='kvm') only where the KVM probe passes.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from tests.fixtures.condor import EXAMPLES, TIMINGS, UID, Job, Pool
from tests.fixtures.libvirtd import make_guest

pytestmark = [pytest.mark.condor]

HELLO = {"10-hello": "#!/bin/sh\necho 'vmtool-test: hello from a condor job'\n"}
SLEEPER = {"10-sleep": "#!/bin/sh\necho 'vmtool-test: sleeping'\nsleep 600\n"}
HOG = {"20-hog": "#!/bin/sh\n"
                 "mkdir -p /mnt/hog && mount -t tmpfs -o size=1000m tmpfs /mnt/hog\n"
                 "echo 'vmtool-test: hogging'\n"
                 "dd if=/dev/zero of=/mnt/hog/fill bs=1M count=950 2>/dev/null\n"
                 "echo 'vmtool-test: survived the hog'\n"}


@pytest.fixture(autouse=True)
def _timed(request: pytest.FixtureRequest) -> object:
    t0 = time.monotonic()
    yield
    TIMINGS[f"test:{request.node.name}"] = time.monotonic() - t0


@pytest.fixture(scope="module")
def guests(condor_pool: Pool) -> dict[str, str]:
    """Busybox guests booting this host's kernel, laid out as a `vmtool build` output directory
    (manifest.json, rootfs.img, vmlinuz-V, initrd.img-V) under /nfs/images/<name>/ in the root."""
    t0 = time.monotonic()
    kernels: dict[str, str] = {}
    for name, scripts in (("hello", HELLO), ("sleeper", SLEEPER), ("hog", HOG)):
        d = condor_pool.host(f"/nfs/images/{name}")
        manifest, _img = make_guest(d, "rootfs", scripts)
        manifest.rename(d / "manifest.json")
        kernels[name] = json.loads((d / "manifest.json").read_text())["kernel"]["version"]
    TIMINGS["guest_images_s"] = time.monotonic() - t0
    return kernels


def launch_sub(guest: str, version: str) -> str:
    """launch-vanilla.sub with its paths pointed at the guest `guest`."""
    text = (EXAMPLES / "launch-vanilla.sub").read_text()
    text = text.replace("/nfs/images/debian-12/", f"/nfs/images/{guest}/")
    text = re.sub(r"vmlinuz-[0-9][^,\s]*", f"vmlinuz-{version}", text)
    text = re.sub(r"initrd\.img-[0-9][^,\s]*", f"initrd.img-{version}", text)
    assert f"/nfs/images/{guest}/rootfs.img" in text, "the example's image path changed: update this test"
    return text


def submit_launch(pool: Pool, name: str, text: str) -> Job:
    return pool.submit(name, text, {"launch-vm.sh": EXAMPLES / "launch-vm.sh"})


def _read(job: Job, name: str) -> str:
    p = job.sandbox / name
    return p.read_text(errors="replace") if p.exists() else f"({name} did not come back)"


def test_startd_advertises_vmimage(condor_pool: Pool) -> None:
    ad = condor_pool.startd_ad()
    assert "vmimage" in ad["HasFileTransferPluginMethods"].split(","), ad
    assert "vmimage" not in str(ad.get("OfflineFileTransferPluginMethods", "")).split(",")


def test_vanilla_launch_job(condor_pool: Pool, guests: dict[str, str]) -> None:
    assert not condor_pool.host("/var/cache/vmtool").exists(), "the site set-up made no shared cache"
    job = submit_launch(condor_pool, "hello", launch_sub("hello", guests["hello"]))
    condor_pool.wait(job)
    ad = job.ad
    assert ad["JobStatus"] == 4, (ad.get("HoldReason"), _read(job, "launch.err"), condor_pool.log_tail("StarterLog"))
    assert ad["ExitCode"] == 0, _read(job, "launch.err")
    assert ad.get("NumJobStarts", 1) == 1
    report = json.loads(_read(job, "vm-report.json"))
    assert report["exit_reason"] == "poweroff" and report["exit_code"] == 0, report
    console = _read(job, "console.log")
    assert "vmtool-test: hello from a condor job" in console and "vmtool-guest: powering off" in console
    # the plugin, run by the real starter as the job's user, staged into a cache it chose by itself
    bases = [p for top in ("var/tmp", "home", "tmp") for p in (condor_pool.root / top).glob("**/bases/*")
             if p.is_file() and p.stat().st_uid == UID]
    assert bases, "no cached base owned by the job user"


def test_failing_vmimage_url_is_held_with_vmtool_error(condor_pool: Pool, guests: dict[str, str]) -> None:
    text = launch_sub("hello", guests["hello"]).replace("/nfs/images/hello/rootfs.img",
                                                        "/nfs/images/hello/missing.img")
    job = submit_launch(condor_pool, "missing", text)
    condor_pool.wait(job, (5, 4, 3))
    ad = job.ad
    assert ad["JobStatus"] == 5, ad
    assert ad["HoldReasonCode"] == 13 and ad["HoldReasonSubCode"] == 1 << 8, ad
    reason = ad["HoldReason"]
    assert "vmtool_plugin" in reason and "/nfs/images/hello/missing.img" in reason, reason
    condor_pool.run(["condor_rm", str(job.cluster)], user="jobu")


def test_guest_over_its_memory_is_held(condor_pool: Pool, guests: dict[str, str]) -> None:
    text = launch_sub("hog", guests["hog"])
    # the scenario: a 512 MiB guest that fills its memory, under a VM limit of 400 MiB (vmtool sizes a
    # guest to fit its slot by itself, so the job asks for the small limit)
    text = re.sub(r"(?m)^(arguments\s*=.*)$", r"\1 --memory 512 --memory-limit 400", text)
    job = submit_launch(condor_pool, "hog", text)
    condor_pool.wait(job, (5, 4, 3))
    ad = job.ad
    assert ad["JobStatus"] == 5, (ad.get("ExitCode"), _read(job, "vm-report.json"), _read(job, "launch.err"))
    assert ad["HoldReasonCode"] == 3 and ad["HoldReasonSubCode"] == 5, ad  # JobPolicy: the submit file's on_exit_hold, not HTCondor's OOM
    assert "exceeded the slot's memory" in ad["HoldReason"], ad
    report = json.loads(_read(job, "vm-report.json"))
    assert report["exit_reason"] == "memory" and report["exit_code"] == 5, report
    assert (job.sandbox / "console.log").exists()
    condor_pool.run(["condor_rm", str(job.cluster)], user="jobu")


def test_condor_rm_mid_boot_leaves_nothing(condor_pool: Pool, guests: dict[str, str]) -> None:
    job = submit_launch(condor_pool, "sleeper", launch_sub("sleeper", guests["sleeper"]))
    end = time.monotonic() + 300
    qemu: list[tuple[int, int, str]] = []
    while time.monotonic() < end and not qemu:
        qemu = [p for p in condor_pool.processes(UID) if "qemu-system" in p[2]]
        if not qemu:
            assert condor_pool.ad(job).get("JobStatus") in (1, 2), job.ad
            time.sleep(0.5)
    assert qemu, "the job's qemu never started"
    condor_pool.run(["condor_rm", str(job.cluster)], user="jobu")
    condor_pool.wait(job, (3,), timeout=180)
    end = time.monotonic() + 120
    left = condor_pool.processes(UID)
    while left and time.monotonic() < end:
        time.sleep(1.0)
        left = condor_pool.processes(UID)
    assert left == [], f"left behind by the removed job: {left}"


def test_vm_universe_where_kvm_works(condor_pool: Pool) -> None:
    import os

    from vmtool.launch.host import probe_kvm
    from vmtool.run import run

    qemu = shutil.which("qemu-system-x86_64")
    assert qemu
    probe = probe_kvm(qemu)
    if not probe.usable:
        pytest.skip(f"VM universe needs KVM, which is unusable here: {probe.reason}")
    # the example's base at /nfs/images/debian-12.qcow2 (the hello guest's root; booting it is not
    # what this checks): the gahp must start a kvm domain on the plugin's overlay.
    hello = condor_pool.host("/nfs/images/hello/rootfs.img")
    base = condor_pool.host("/nfs/images/debian-12.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", str(hello), str(base)])
    os.chmod(base, 0o644)
    ad = condor_pool.wait_startd(lambda a: a.get("HasVM") is True, "HasVM")
    assert ad["VM_Type"] == "kvm"
    job = condor_pool.submit("vmuniverse", (EXAMPLES / "vm-universe-vmimage.sub").read_text())
    condor_pool.wait(job, (2, 3, 4, 5))
    assert job.ad["JobStatus"] == 2, job.ad
    condor_pool.run(["condor_rm", str(job.cluster)], user="jobu")
    condor_pool.wait(job, (3,))


def test_bad_test_url_takes_vmimage_offline(condor_pool: Pool) -> None:
    """Last: it reconfigures the startd (and puts it back)."""
    bad = condor_pool.host("/etc/condor/config.d/95-bad-test-url.config")
    bad.write_text("VMIMAGE_TEST_URL = vmimage:///var/lib/vmtool/missing.qcow2\n")
    try:
        condor_pool.reconfig()
        ad = condor_pool.wait_startd(
            lambda a: "vmimage" in str(a.get("OfflineFileTransferPluginMethods", "")).split(","),
            "vmimage as offline after a failing VMIMAGE_TEST_URL", timeout=90)
        assert "vmimage" not in ad["HasFileTransferPluginMethods"].split(",")
    finally:
        bad.unlink()
        condor_pool.reconfig()
    condor_pool.wait_startd(lambda a: "vmimage" in a.get("HasFileTransferPluginMethods", "").split(","),
                            "vmimage again after the fix", timeout=90)
