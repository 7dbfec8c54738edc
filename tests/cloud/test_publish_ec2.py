"""vmtool publish ec2: S3 and AMI bookkeeping against moto's server, the import calls with Stubber."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cloud import MotoServer, assemble, free_port
from vmtool import manifest as manifest_mod
from vmtool.cli.main import main
from vmtool.errors import PublishError
from vmtool.image.assemble import assemble_disk
from vmtool.publish.common import digest_file
from vmtool.publish.ec2 import SnapshotImporter, make_clients, publish_ec2, upload_multipart

pytestmark = pytest.mark.cloud

boto3 = pytest.importorskip("boto3")
Stubber = pytest.importorskip("botocore.stub").Stubber


@pytest.fixture
def clients(aws_env: MotoServer) -> tuple[Any, Any]:
    return make_clients(aws_env.region, aws_env.url)


@pytest.fixture
def bucket(clients: tuple[Any, Any], request: pytest.FixtureRequest) -> Iterator[str]:
    s3, _ = clients
    name = f"vmtool-{request.node.name.lower().replace('_', '-')[:40]}"
    s3.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def disk_build(build_copy: Path) -> Path:
    assemble(build_copy, build_copy.parent / "disk.raw", "raw")
    return build_copy


def _real_snapshot(ec2: Any) -> str:
    vol = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)
    return str(ec2.create_snapshot(VolumeId=vol["VolumeId"])["SnapshotId"])


def test_publish_uploads_imports_and_registers(
    clients: tuple[Any, Any],
    bucket: str,
    disk_build: Path,
    aws_env: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VMTOOL_PROGRESS", "1")  # the bars a terminal would show
    s3, ec2 = clients
    m = manifest_mod.load(disk_build)
    assert m.disk is not None
    d = digest_file(m.resolve(m.disk.path))
    snapshot = _real_snapshot(ec2)

    # The import calls (which moto lacks) go to a stubbed client that checks exactly what we send.
    import_client = boto3.client("ec2", region_name=aws_env.region, endpoint_url=aws_env.url)
    stub = Stubber(import_client)
    name = "vmtool-test-ami"
    tags = [
        {"Key": "Name", "Value": name},
        {"Key": "vmtool:sha256", "Value": d.sha256},
        {"Key": "vmtool:kernel", "Value": m.kernel.version},
    ]
    key = f"vmtool/{name}-{d.sha256[:16]}.raw"
    description = f"vmtool {name} (kernel {m.kernel.version})"
    stub.add_response(
        "import_snapshot",
        {"ImportTaskId": "import-snap-0123456789abcdef0"},
        {
            "Description": description,
            "DiskContainer": {
                "Description": description,
                "Format": "RAW",
                "UserBucket": {"S3Bucket": bucket, "S3Key": key},
            },
            "ClientToken": f"vmtool-{d.sha256[:56]}",
            "TagSpecifications": [{"ResourceType": "import-snapshot-task", "Tags": tags}],
            "RoleName": "vmimport-test",
        },
    )
    for status, progress in (("active", "19"), ("active", "62")):
        stub.add_response(
            "describe_import_snapshot_tasks",
            {
                "ImportSnapshotTasks": [
                    {
                        "ImportTaskId": "import-snap-0123456789abcdef0",
                        "SnapshotTaskDetail": {
                            "Status": status,
                            "Progress": progress,
                            "StatusMessage": "converting",
                        },
                    }
                ]
            },
            {"ImportTaskIds": ["import-snap-0123456789abcdef0"]},
        )
    stub.add_response(
        "describe_import_snapshot_tasks",
        {
            "ImportSnapshotTasks": [
                {
                    "ImportTaskId": "import-snap-0123456789abcdef0",
                    "SnapshotTaskDetail": {"Status": "completed", "SnapshotId": snapshot},
                }
            ]
        },
        {"ImportTaskIds": ["import-snap-0123456789abcdef0"]},
    )

    # register_image goes to moto, which ignores most parameters: record what we sent instead.
    sent: dict[str, Any] = {}
    ec2.meta.events.register(
        "provide-client-params.ec2.RegisterImage", lambda params, **kw: sent.update(params)
    )
    sleeps: list[float] = []
    importer = SnapshotImporter(import_client, role="vmimport-test", poll_interval=7, sleep=sleeps.append)
    with stub:
        out = publish_ec2(m, s3, ec2, bucket=bucket, name=name, importer=importer)
        stub.assert_no_pending_responses()
    assert sleeps == [7, 7]
    err = capsys.readouterr().err
    assert f"uploading disk.raw to s3://{bucket}/{key}: " in err and "(100%)" in err
    assert "importing snapshot (import-snap-0123456789abcdef0): 19 % / 100 % (19%) converting" in err
    assert "importing snapshot (import-snap-0123456789abcdef0): done" in err
    assert out["created"] and out["snapshot_id"] == snapshot and out["image_id"].startswith("ami-")
    assert sent["BootMode"] == "uefi" and sent["EnaSupport"] is True and sent["VirtualizationType"] == "hvm"
    assert sent["RootDeviceName"] == "/dev/xvda" and sent["Architecture"] == "x86_64"
    assert sent["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/xvda",
            "Ebs": {"SnapshotId": snapshot, "VolumeType": "gp3", "DeleteOnTermination": True},
        }
    ]
    # The object in S3 is the disk, byte for byte, with its checksum in the metadata.
    body = s3.get_object(Bucket=bucket, Key=key)
    assert hashlib.sha256(body["Body"].read()).hexdigest() == d.sha256
    assert body["Metadata"]["vmtool-sha256"] == d.sha256
    snap_tags = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["Tags"]
    assert {"Key": "vmtool:sha256", "Value": d.sha256} in snap_tags
    img = ec2.describe_images(ImageIds=[out["image_id"]])["Images"][0]
    assert {"Key": "vmtool:sha256", "Value": d.sha256} in img["Tags"]

    # Publishing again finds the AMI by name and checksum: no upload, no import (the stub has nothing).
    with Stubber(import_client) as empty:
        again = publish_ec2(m, s3, ec2, bucket=bucket, name=name, importer=importer)
        empty.assert_no_pending_responses()
    assert again["image_id"] == out["image_id"] and again["created"] is False


def test_failed_import_is_reported_with_its_reason(clients: tuple[Any, Any]) -> None:
    _, ec2 = clients
    stub = Stubber(ec2)
    stub.add_response(
        "describe_import_snapshot_tasks",
        {
            "ImportSnapshotTasks": [
                {
                    "ImportTaskId": "import-snap-1",
                    "SnapshotTaskDetail": {
                        "Status": "deleted",
                        "StatusMessage": "ClientError: Disk validation failed [Unsupported OVA format]",
                    },
                }
            ]
        },
        {"ImportTaskIds": ["import-snap-1"]},
    )
    with stub, pytest.raises(PublishError, match="Disk validation failed"):
        SnapshotImporter(ec2, sleep=lambda s: None).wait("import-snap-1")


def test_failed_multipart_upload_is_aborted(clients: tuple[Any, Any], bucket: str, tmp_path: Path) -> None:
    s3, _ = clients
    data = tmp_path / "disk.raw"
    data.write_bytes(os.urandom(11 << 20))
    d = digest_file(data)
    calls = {"n": 0}

    def fail_second_part(**kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionResetError("connection reset by peer (injected)")

    s3.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    with pytest.raises(ConnectionResetError):
        upload_multipart(s3, data, bucket, "disk.raw", d, part_size=5 << 20)
    assert calls["n"] == 2
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def _ec2(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["publish", "ec2", *args])
    return rc, capsys.readouterr().err


def test_split_build_is_refused_with_a_hint(
    aws_env: MotoServer, build_copy: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = _ec2([os.fspath(build_copy), "--bucket", bucket, "--endpoint-url", aws_env.url], capsys)
    assert rc == 1 and "EC2 boots whole disks" in err and "--disk" in err and "Traceback" not in err


def test_missing_bucket_missing_credentials_and_network_errors(
    aws_env: MotoServer,
    disk_build: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = os.fspath(disk_build)
    rc, err = _ec2([manifest, "--bucket", "no-such-bucket-here", "--endpoint-url", aws_env.url], capsys)
    assert rc == 1 and "bucket 'no-such-bucket-here' does not exist" in err and "Traceback" not in err

    rc, err = _ec2([manifest, "--bucket", "b", "--endpoint-url", f"http://127.0.0.1:{free_port()}"], capsys)
    assert rc == 1 and "network error" in err and "Traceback" not in err

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    rc, err = _ec2([manifest, "--bucket", "b", "--endpoint-url", aws_env.url], capsys)
    assert rc == 1 and "no AWS credentials found" in err and "AWS_ACCESS_KEY_ID" in err


def test_rejected_credentials_are_one_clear_error(
    aws_env: MotoServer, moto_server_auth: MotoServer, disk_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A second moto server that checks signatures against its (empty) IAM: the key is unknown to it.
    rc = main(
        ["publish", "ec2", os.fspath(disk_build), "--bucket", "b", "--endpoint-url", moto_server_auth.url]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "AWS rejected the credentials (AuthFailure)" in err and "AWS_SECRET_ACCESS_KEY" in err


def test_json_output_of_a_second_publish(
    clients: tuple[Any, Any],
    aws_env: MotoServer,
    bucket: str,
    disk_build: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An AMI registered earlier with the tags vmtool sets is found by the CLI without any import call.
    s3, ec2 = clients
    m = manifest_mod.load(disk_build)
    assert m.disk is not None
    d = digest_file(m.resolve(m.disk.path))
    ami = ec2.register_image(Name="prior")["ImageId"]
    ec2.create_tags(Resources=[ami], Tags=[{"Key": "vmtool:sha256", "Value": d.sha256}])
    rc = main(
        [
            "publish",
            "ec2",
            os.fspath(disk_build),
            "--bucket",
            bucket,
            "--endpoint-url",
            aws_env.url,
            "--name",
            "prior",
            "--json",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = json.loads(cap.out)
    assert out["image_id"] == ami and out["created"] is False


def test_qcow2_disk_is_uploaded_as_raw(build_copy: Path) -> None:
    from vmtool.publish.ec2 import raw_disk

    raw = assemble_disk(manifest_mod.load(build_copy), build_copy.parent / "disk.raw", "raw")
    assemble(build_copy, build_copy.parent / "disk.qcow2", "qcow2")
    m = manifest_mod.load(build_copy)
    with raw_disk(m) as p:
        assert p.name.endswith(".raw") and p.parent != build_copy.parent
        assert digest_file(p).sha256 == raw.sha256  # assembly is reproducible: same bytes as the raw disk
    assert not p.exists() and not p.parent.exists()
