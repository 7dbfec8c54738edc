"""vmtool publish openstack against a real Glance API (tests/fixtures/cloud.py starts it from PyPI)."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cloud import Glance, assemble, free_port, record_disk
from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.errors import PublishError
from vmtool.image.assemble import assemble_disk
from vmtool.publish.glance import GlanceClient, _check_boot_image

pytestmark = pytest.mark.cloud


def _images(glance: Glance) -> list[dict[str, Any]]:
    with urllib.request.urlopen(glance.url + "/v2/images?limit=1000") as r:
        return list(json.loads(r.read())["images"])


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()


def _publish(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    rc = main(["publish", "openstack", *args, "--json"])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if rc == 0 else None, cap.err


def test_split_publish_is_idempotent_and_verified(
    glance: Glance, build_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {i["id"] for i in _images(glance)}
    rc, out, err = _publish([os.fspath(build_copy), "--endpoint", glance.url, "--name", "split"], capsys)
    assert rc == 0, err
    roles = {i["role"]: i for i in out["images"]}
    assert set(roles) == {"kernel", "ramdisk", "image"} and all(i["created"] for i in out["images"])
    m = manifest_mod.load(build_copy)
    by_id = {i["id"]: i for i in _images(glance)}
    k, r, root = by_id[roles["kernel"]["id"]], by_id[roles["ramdisk"]["id"]], by_id[roles["image"]["id"]]
    assert (k["disk_format"], k["container_format"]) == ("aki", "aki")
    assert (r["disk_format"], r["container_format"]) == ("ari", "ari")
    assert (root["disk_format"], root["container_format"]) == ("ami", "ami")
    assert root["kernel_id"] == k["id"] and root["ramdisk_id"] == r["id"]
    assert root["visibility"] == "private" and root["status"] == "active"
    assert out["image_id"] == root["id"]
    # What Glance stored is what we have: its md5 and sha512, and the bytes in its file store.
    assert k["checksum"] == _md5(m.kernel_path) and r["checksum"] == _md5(m.initrd_path)
    assert root["os_hash_value"] == hashlib.sha512(m.rootfs_path.read_bytes()).hexdigest()
    assert (glance.store / root["id"]).read_bytes() == m.rootfs_path.read_bytes()

    # Again: everything is found by checksum, nothing new is created.
    rc, again, err = _publish(
        [os.fspath(build_copy), "--endpoint", glance.url + "/v2/", "--name", "split"], capsys
    )
    assert rc == 0, err
    assert [i["id"] for i in again["images"]] == [i["id"] for i in out["images"]]
    assert not any(i["created"] for i in again["images"])
    assert {i["id"] for i in _images(glance)} - before == {k["id"], r["id"], root["id"]}

    # A visibility change is applied to the existing image, still without a new one.
    rc, shared, err = _publish(
        [os.fspath(build_copy), "--endpoint", glance.url, "--name", "split", "--visibility", "shared"],
        capsys,
    )
    assert rc == 0, err
    assert shared["image_id"] == root["id"]
    assert {i["id"]: i for i in _images(glance)}[root["id"]]["visibility"] == "shared"


def test_whole_disk_publish_sets_uefi(
    glance: Glance, build_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, _, err = _publish([os.fspath(build_copy), "--endpoint", glance.url, "--whole-disk"], capsys)
    assert rc == 1 and "no whole-disk image" in err and "vmtool disk assemble" in err
    disk = build_copy.parent / "disk.qcow2"
    assemble(build_copy, disk, "qcow2")
    monkeypatch.setenv("VMTOOL_PROGRESS", "1")  # the bar a terminal would show
    rc, out, err = _publish(
        [os.fspath(build_copy), "--endpoint", glance.url, "--whole-disk", "--name", "wd"], capsys
    )
    assert rc == 0, err
    assert "uploading disk image disk.qcow2: " in err and "(100%)" in err
    img = {i["id"]: i for i in _images(glance)}[out["image_id"]]
    assert (img["disk_format"], img["container_format"]) == ("qcow2", "bare")
    assert img["hw_firmware_type"] == "uefi" and img["checksum"] == _md5(disk)


def test_failed_upload_leaves_no_image(
    glance: Glance, build_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The manifest lies: it calls a raw disk qcow2. Glance inspects the upload and refuses it after the
    # image record exists; vmtool must delete that record again.
    disk = build_copy.parent / "disk.raw"
    info = assemble_disk(manifest_mod.load(build_copy), disk, "raw")
    record_disk(build_copy, replace(info, format="qcow2"))
    before = {i["id"] for i in _images(glance)}
    rc, _, err = _publish(
        [os.fspath(build_copy), "--endpoint", glance.url, "--whole-disk", "--name", "liar"], capsys
    )
    assert rc == 1 and "Traceback" not in err
    assert "Glance answered 415" in err and "does not match" in err
    after = _images(glance)
    assert {i["id"] for i in after} == before
    assert not [i for i in after if i["name"] == "liar"]


def test_os_cloud_from_clouds_yaml(
    glance: Glance,
    build_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("openstack")
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  testcloud:\n    auth_type: none\n"
        f"    image_endpoint_override: {glance.url}\n    region_name: RegionOne\n"
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", os.fspath(clouds))
    rc, out, err = _publish([os.fspath(build_copy), "--os-cloud", "testcloud", "--name", "viacloud"], capsys)
    assert rc == 0, err
    assert {i["name"] for i in out["images"]} == {"viacloud-kernel", "viacloud-initrd", "viacloud"}
    rc, _, err = _publish([os.fspath(build_copy), "--os-cloud", "no-such-cloud"], capsys)
    assert rc == 1 and "no-such-cloud" in err and "Traceback" not in err


def test_kernel_and_ramdisk_ids_are_checked(glance: Glance) -> None:
    client = GlanceClient(glance.url)
    with pytest.raises(PublishError, match="does not exist"):
        _check_boot_image(client, str(uuid.uuid4()), "aki", "kernel")


def test_unreachable_glance_is_one_clear_error(build_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rc, _, err = _publish([os.fspath(build_copy), "--endpoint", url], capsys)
    assert rc == 1
    assert f"cannot reach Glance at {url}" in err and "hint:" in err and "Traceback" not in err
    rc, _, err = _publish([os.fspath(build_copy)], capsys)
    assert rc == 1 and "--os-cloud" in err
    rc, _, err = _publish(
        [os.fspath(build_copy), "--endpoint", url, "--token-file", os.fspath(build_copy.parent / "nope")],
        capsys,
    )
    assert rc == 1 and "cannot read the token file" in err


@pytest.mark.unit
def test_endpoint_must_be_a_url() -> None:
    with pytest.raises(PublishError, match="not a Glance endpoint URL"):
        GlanceClient("file:///etc/passwd")


@pytest.mark.unit
def test_error_bodies_are_shortened_and_sanitised() -> None:
    from vmtool.publish.glance import _excerpt

    html = (
        b"<html><body><h1>413 Request Entity Too Large</h1>\x1b[31mred\x07" + b"x" * 5000 + b"</body></html>"
    )
    text = _excerpt(html)
    assert text.startswith("413 Request Entity Too Large") and "\x1b" not in text and "\x07" not in text
    assert len(text) <= 300
    assert _excerpt(b'{"message": "Image storage media is full"}') == "Image storage media is full"
