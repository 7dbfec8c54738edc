"""--legacy-bundle: the euca2ools bundle format, checked with plain openssl and tar, uploaded to moto."""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cloud import MotoServer
from tests.fixtures.servers import self_signed_cert
from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.errors import PublishError
from vmtool.publish.bundle import BundleKeys, make_bundle
from vmtool.publish.ec2 import make_clients
from vmtool.run import run

pytestmark = pytest.mark.cloud


def _keypair(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    self_signed_cert(key, crt, name)
    return key, crt


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    cloud_key, cloud_crt = _keypair(d, "cloud")
    user_key, user_crt = _keypair(d, "user")
    return {"cloud_key": cloud_key, "cloud_crt": cloud_crt, "user_key": user_key, "user_crt": user_crt}


def _decrypt_hex(key: Path, hex_text: str, work: Path) -> str:
    enc = work / "wrapped.bin"
    enc.write_bytes(bytes.fromhex(hex_text))
    return run(
        ["openssl", "pkeyutl", "-decrypt", "-inkey", os.fspath(key), "-in", os.fspath(enc)]
    ).stdout.decode()


def test_bundle_unpacks_with_openssl_and_tar(certs: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    # Random bytes do not compress: the bundle needs three 10 MiB parts; zeros test the sparse tail.
    image.write_bytes(os.urandom(21 << 20) + bytes(3 << 20))
    keys = BundleKeys.load(certs["cloud_crt"], certs["user_crt"], certs["user_key"], "1234-5678-9012")
    out = tmp_path / "bundle"
    out.mkdir()
    bundle = make_bundle(image, out, keys, prefix="img", kernel_id="aki-12345678", ramdisk_id="ari-12345678")
    assert [p.name for p in bundle.parts] == ["img.part.00", "img.part.01", "img.part.02"]
    assert all(p.stat().st_size == 10 << 20 for p in bundle.parts[:-1])

    text = bundle.manifest.read_text()
    doc = ET.fromstring(text)
    img = doc.find("image")
    assert img is not None
    assert [c.tag for c in img][:3] == ["name", "user", "type"]  # <type> right after <user>
    assert img.findtext("user") == "123456789012" and img.findtext("type") == "machine"
    assert doc.findtext("machine_configuration/kernel_id") == "aki-12345678"
    assert int(img.findtext("size") or 0) == image.stat().st_size
    assert int(img.findtext("bundled_size") or 0) == sum(p.stat().st_size for p in bundle.parts)
    for part in img.iter("part"):
        data = (out / (part.findtext("filename") or "")).read_bytes()
        assert hashlib.sha1(data).hexdigest() == part.findtext("digest")

    # The key and IV are 32-char hex strings, wrapped for both the user's and the cloud's certificate.
    key = _decrypt_hex(certs["user_key"], img.findtext("user_encrypted_key") or "", tmp_path)
    iv = _decrypt_hex(certs["user_key"], img.findtext("user_encrypted_iv") or "", tmp_path)
    assert re.fullmatch(r"[0-9a-f]{32}", key) and re.fullmatch(r"[0-9a-f]{32}", iv)
    assert _decrypt_hex(certs["cloud_key"], img.findtext("ec2_encrypted_key") or "", tmp_path) == key
    assert _decrypt_hex(certs["cloud_key"], img.findtext("ec2_encrypted_iv") or "", tmp_path) == iv

    joined = tmp_path / "joined.enc"
    with open(joined, "wb") as f:
        for p in bundle.parts:
            f.write(p.read_bytes())
    tgz = tmp_path / "image.tar.gz"
    run(
        [
            "openssl",
            "enc",
            "-d",
            "-aes-128-cbc",
            "-K",
            key,
            "-iv",
            iv,
            "-in",
            os.fspath(joined),
            "-out",
            os.fspath(tgz),
        ]
    )
    run(["gzip", "-t", os.fspath(tgz)])
    tar = tmp_path / "image.tar"
    with open(tar, "wb") as f:
        run(["gzip", "-dc", os.fspath(tgz)], stdout=f)
    assert hashlib.sha1(tar.read_bytes()).hexdigest() == img.findtext("digest")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    run(["tar", "-xf", os.fspath(tar), "-C", os.fspath(unpacked)])
    assert [p.name for p in unpacked.iterdir()] == ["image.raw"]
    assert (unpacked / "image.raw").read_bytes() == image.read_bytes()

    # The signature: RSA-SHA1 by the user's key over <machine_configuration> then <image>, as written.
    m = re.search(r"<machine_configuration>.*</machine_configuration>", text)
    i = re.search(r"<image>.*</image>", text)
    assert m and i
    signed = tmp_path / "signed.txt"
    signed.write_text(m.group(0) + i.group(0))
    sig = tmp_path / "sig.bin"
    sig.write_bytes(bytes.fromhex(doc.findtext("signature") or ""))
    pub = tmp_path / "user.pub"
    run(
        ["openssl", "x509", "-in", os.fspath(certs["user_crt"]), "-pubkey", "-noout", "-out", os.fspath(pub)]
    )
    verified = run(
        [
            "openssl",
            "dgst",
            "-sha1",
            "-verify",
            os.fspath(pub),
            "-signature",
            os.fspath(sig),
            os.fspath(signed),
        ]
    )
    assert b"Verified OK" in verified.stdout


def test_bad_key_files_are_clear_errors(certs: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(PublishError, match="not a PEM X.509 certificate"):
        BundleKeys.load(junk, certs["user_crt"], certs["user_key"])
    with pytest.raises(PublishError, match="not an unencrypted PEM private key"):
        BundleKeys.load(certs["cloud_crt"], certs["user_crt"], junk)


def test_legacy_bundle_publish_uploads_and_registers_three_images(
    aws_env: MotoServer,
    build_copy: Path,
    certs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3, ec2 = make_clients(aws_env.region, aws_env.url)
    s3.create_bucket(Bucket="legacy-bundles")
    args = [
        "publish",
        "ec2",
        os.fspath(build_copy),
        "--legacy-bundle",
        "--bucket",
        "legacy-bundles",
        "--endpoint-url",
        aws_env.url,
        "--ec2-cert",
        os.fspath(certs["cloud_crt"]),
        "--cert",
        os.fspath(certs["user_crt"]),
        "--private-key",
        os.fspath(certs["user_key"]),
        "--name",
        "legacy",
        "--json",
    ]
    import json

    assert main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert [i["type"] for i in out["images"]] == ["kernel", "ramdisk", "machine"]
    assert all(i["created"] == "true" for i in out["images"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="legacy-bundles")["Contents"]}
    for name in ("legacy-kernel", "legacy-initrd", "legacy"):
        assert f"vmtool/{name}.manifest.xml" in keys and f"vmtool/{name}.part.00" in keys
    m = manifest_mod.load(build_copy)
    # The root filesystem's bundle names the kernel and ramdisk AMIs registered just before it.
    xml = s3.get_object(Bucket="legacy-bundles", Key="vmtool/legacy.manifest.xml")["Body"].read()
    doc = ET.fromstring(xml)
    assert doc.findtext("machine_configuration/kernel_id") == out["images"][0]["image_id"]
    assert doc.findtext("machine_configuration/ramdisk_id") == out["images"][1]["image_id"]
    assert int(doc.findtext("image/size") or 0) == m.rootfs_path.stat().st_size
    acl: Any = s3.get_object_acl(Bucket="legacy-bundles", Key="vmtool/legacy.manifest.xml")
    assert acl["Grants"]

    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert [i["image_id"] for i in again["images"]] == [i["image_id"] for i in out["images"]]
    assert all(i["created"] == "false" for i in again["images"])


def test_legacy_bundle_needs_the_certificates(
    aws_env: MotoServer,
    build_copy: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("EUCALYPTUS_CERT", "EC2_CERT", "EC2_PRIVATE_KEY"):
        monkeypatch.delenv(var, raising=False)
    rc = main(
        [
            "publish",
            "ec2",
            os.fspath(build_copy),
            "--legacy-bundle",
            "--bucket",
            "x",
            "--endpoint-url",
            aws_env.url,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--ec2-cert" in err and "--private-key" in err and "Traceback" not in err
