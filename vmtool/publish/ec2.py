"""Publish a build's whole-disk image to EC2: S3 multipart upload, import_snapshot, register_image.

EC2 boots whole disks (HVM); the split kernel/initrd/root form needs PV AKIs that current instance
types cannot run, so a build without a disk image is refused with a hint to assemble one.
boto3 is imported lazily (vmtool --help works without it). Errors from botocore become one
PublishError each: missing or rejected credentials, a missing bucket, a network failure.

Idempotency: the AMI carries the tag `vmtool:sha256` (the raw disk's sha256); publishing the same
disk under the same name again finds it and does nothing. The upload is skipped when the object is
already in the bucket with that checksum, and import_snapshot gets a ClientToken derived from it.
A failed multipart upload is aborted, so no invisible parts are left in the bucket.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmtool.errors import PublishError
from vmtool.log import Progress
from vmtool.manifest import Manifest
from vmtool.publish.common import Digests, default_name, digest_file, require_file
from vmtool.run import run

MIB = 1 << 20
PART_SIZE = 64 * MIB
MAX_PARTS = 10000
ROOT_DEVICE = "/dev/xvda"
AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
}
DENIED_CODES = {"AccessDenied", "UnauthorizedOperation", "AccessDeniedException", "AllAccessDisabled"}


def make_clients(
    region: str | None, endpoint_url: str | None = None, profile: str | None = None
) -> tuple[Any, Any]:
    """(s3, ec2) boto3 clients; refuses early when there are no credentials or no region."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise PublishError(
            "publishing to EC2 needs boto3, which is not installed", hint="pip install boto3"
        ) from None
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as e:
        raise PublishError(str(e), hint="check the profile name in ~/.aws/config") from None
    if session.get_credentials() is None:
        raise PublishError(
            "no AWS credentials found",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure a profile (aws configure)",
        )
    if not session.region_name:
        raise PublishError("no AWS region given", hint="pass --region, or set AWS_DEFAULT_REGION")
    config = botocore.config.Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=300,
    )
    s3 = session.client("s3", endpoint_url=endpoint_url, config=config)
    ec2 = session.client("ec2", endpoint_url=endpoint_url, config=config)
    return s3, ec2


@contextlib.contextmanager
def aws_errors(what: str, *, bucket: str | None = None) -> Iterator[None]:
    """Turn botocore's exceptions into one clear PublishError each."""
    import botocore.exceptions as bx
    import botocore.parsers

    try:
        yield
    except bx.NoCredentialsError:
        raise PublishError(
            f"cannot {what}: no AWS credentials found",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure a profile (aws configure)",
        ) from None
    except (
        bx.EndpointConnectionError,
        bx.ConnectTimeoutError,
        bx.ReadTimeoutError,
        bx.ConnectionClosedError,
    ) as e:
        raise PublishError(
            f"cannot {what}: network error: {e}",
            hint="check --endpoint-url / --region and the network connection",
        ) from None
    except bx.ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = str(err.get("Message", "")) or code
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in AUTH_CODES:
            raise PublishError(
                f"cannot {what}: AWS rejected the credentials ({code})",
                hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile; they may be wrong or expired",
            ) from None
        if bucket and (code in ("NoSuchBucket", "404") or (status == 404 and "Bucket" in what)):
            raise PublishError(
                f"cannot {what}: the S3 bucket {bucket!r} does not exist",
                hint=f"create it first (aws s3 mb s3://{bucket}) or name another with --bucket",
            ) from None
        if code in DENIED_CODES or status == 403:
            raise PublishError(
                f"cannot {what}: access denied ({code}: {msg})",
                hint="the credentials lack a permission this step needs (see the README, 'Publishing images')",
            ) from None
        raise PublishError(f"cannot {what}: {code}: {msg}") from None
    except botocore.parsers.ResponseParserError:
        raise PublishError(
            f"cannot {what}: the endpoint's answer is not an AWS response (an error page?)",
            hint="check --endpoint-url; the service may not implement this call",
        ) from None
    except bx.BotoCoreError as e:
        raise PublishError(f"cannot {what}: {e}") from None
    except OSError as e:
        raise PublishError(f"cannot {what}: {e.strerror or e}") from None


def object_matches(s3: Any, bucket: str, key: str, d: Digests) -> bool:
    import botocore.exceptions as bx

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except bx.ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
    meta = head.get("Metadata") or {}
    return bool(meta.get("vmtool-sha256") == d.sha256 and head.get("ContentLength") == d.size)


def upload_multipart(
    s3: Any, path: Path, bucket: str, key: str, d: Digests, part_size: int = PART_SIZE
) -> None:
    """A multipart upload with progress; aborted (parts deleted) if anything fails or is interrupted."""
    part_size = max(part_size, 5 * MIB, math.ceil(d.size / MAX_PARTS))
    mpu = s3.create_multipart_upload(
        Bucket=bucket,
        Key=key,
        Metadata={"vmtool-sha256": d.sha256},
        ContentType="application/octet-stream",
    )
    upload_id = mpu["UploadId"]
    progress = Progress(f"uploading {path.name} to s3://{bucket}/{key}", d.size)
    try:
        parts = []
        with open(path, "rb") as f:
            number = 1
            while chunk := f.read(part_size):
                resp = s3.upload_part(
                    Bucket=bucket, Key=key, PartNumber=number, UploadId=upload_id, Body=chunk
                )
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
                progress.update(len(chunk))
                number += 1
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        progress.close("failed")
        with contextlib.suppress(Exception):
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    progress.close()


class SnapshotImporter:
    """import_snapshot and its polling, apart so tests can drive it with botocore's Stubber."""

    def __init__(
        self,
        ec2: Any,
        *,
        role: str | None = None,
        poll_interval: float = 15.0,
        timeout: float = 6 * 3600,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ec2 = ec2
        self.role = role
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.sleep = sleep

    def start(self, bucket: str, key: str, description: str, token: str, tags: list[dict[str, str]]) -> str:
        kwargs: dict[str, Any] = {
            "Description": description,
            "DiskContainer": {
                "Description": description,
                "Format": "RAW",
                "UserBucket": {"S3Bucket": bucket, "S3Key": key},
            },
            "ClientToken": token,
            "TagSpecifications": [{"ResourceType": "import-snapshot-task", "Tags": tags}],
        }
        if self.role:
            kwargs["RoleName"] = self.role
        with aws_errors("start the snapshot import", bucket=bucket):
            resp = self.ec2.import_snapshot(**kwargs)
        task = resp.get("ImportTaskId")
        if not task:
            raise PublishError("EC2 started no import task (no ImportTaskId in its answer)")
        return str(task)

    def wait(self, task_id: str) -> str:
        """Poll until the snapshot exists; returns its id. A deleted task raises with EC2's reason."""
        progress = Progress(f"importing snapshot ({task_id})", 100, unit="%")
        deadline = time.monotonic() + self.timeout
        while True:
            with aws_errors("follow the snapshot import"):
                resp = self.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])
            tasks = resp.get("ImportSnapshotTasks") or []
            if not tasks:
                raise PublishError(f"EC2 does not know the import task {task_id}")
            detail = tasks[0].get("SnapshotTaskDetail") or {}
            status = detail.get("Status", "")
            message = detail.get("StatusMessage", "")
            if status == "completed" and detail.get("SnapshotId"):
                progress.update(done=100)
                progress.close()
                return str(detail["SnapshotId"])
            if status in ("deleting", "deleted") or status.startswith("error"):
                progress.close("failed")
                raise PublishError(
                    f"the snapshot import {task_id} failed: {message or status}",
                    hint="the vmimport service role needs read access to the bucket (see the README, 'Publishing images')",
                )
            try:
                pct = int(str(detail.get("Progress") or "0"))
            except ValueError:
                pct = 0
            progress.update(done=pct, note=message)
            if time.monotonic() > deadline:
                progress.close("timed out")
                raise PublishError(f"the snapshot import {task_id} did not finish in {self.timeout:.0f} s")
            self.sleep(self.poll_interval)


def _tags(name: str, d: Digests, m: Manifest) -> list[dict[str, str]]:
    return [
        {"Key": "Name", "Value": name},
        {"Key": "vmtool:sha256", "Value": d.sha256},
        {"Key": "vmtool:kernel", "Value": m.kernel.version},
    ]


def find_image(ec2: Any, name: str, sha256: str) -> dict[str, Any] | None:
    with aws_errors("look for an earlier publication of this image"):
        resp = ec2.describe_images(
            Owners=["self"],
            Filters=[{"Name": "name", "Values": [name]}, {"Name": "tag:vmtool:sha256", "Values": [sha256]}],
        )
    for img in resp.get("Images") or []:
        if img.get("State") in ("available", "pending"):
            return dict(img)
    return None


@contextlib.contextmanager
def raw_disk(m: Manifest) -> Iterator[Path]:
    """The build's disk as a raw file (import_snapshot takes RAW, VMDK or VHD, not qcow2)."""
    if m.disk is None:
        raise PublishError(
            "EC2 boots whole disks, and this build has only a kernel, an initrd and a root filesystem",
            hint="build with --disk (or run 'vmtool disk assemble MANIFEST') and publish again",
        )
    disk = require_file(m, m.disk.path, "disk image")
    if m.disk.format == "raw":
        yield disk
        return
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=disk.parent))
    try:
        raw = tmp / (disk.stem + ".raw")
        run(["qemu-img", "convert", "-f", m.disk.format, "-O", "raw", os.fspath(disk), os.fspath(raw)])
        yield raw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_ec2(
    m: Manifest,
    s3: Any,
    ec2: Any,
    *,
    bucket: str,
    name: str | None = None,
    prefix: str = "vmtool/",
    importer: SnapshotImporter | None = None,
) -> dict[str, Any]:
    """Upload the whole disk, import it as a snapshot, register a UEFI/ENA AMI. Returns what was done."""
    name = name or default_name(m)
    importer = importer or SnapshotImporter(ec2)
    with raw_disk(m) as disk:
        d = digest_file(disk, f"checksumming {disk.name}")
        found = find_image(ec2, name, d.sha256)
        if found is not None:
            return {
                "cloud": "ec2",
                "image_id": found["ImageId"],
                "name": name,
                "created": False,
                "snapshot_id": None,
                "s3": None,
            }
        key = f"{prefix}{name}-{d.sha256[:16]}.raw"
        with aws_errors(f"use the S3 bucket {bucket!r}", bucket=bucket):
            s3.head_bucket(Bucket=bucket)
        with aws_errors(f"upload {disk.name} to the S3 bucket {bucket!r}", bucket=bucket):
            uploaded = not object_matches(s3, bucket, key, d)
            if uploaded:
                upload_multipart(s3, disk, bucket, key, d)
    tags = _tags(name, d, m)
    description = f"vmtool {name} (kernel {m.kernel.version})"
    task = importer.start(bucket, key, description, f"vmtool-{d.sha256[:56]}", tags)
    snapshot = importer.wait(task)
    with aws_errors("tag the imported snapshot"):
        ec2.create_tags(Resources=[snapshot], Tags=tags)
    with aws_errors("register the image"):
        resp = ec2.register_image(
            Name=name,
            Description=description,
            Architecture="x86_64",
            RootDeviceName=ROOT_DEVICE,
            VirtualizationType="hvm",
            BlockDeviceMappings=[
                {
                    "DeviceName": ROOT_DEVICE,
                    "Ebs": {"SnapshotId": snapshot, "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ],
            EnaSupport=True,
            BootMode="uefi",
            ImdsSupport="v2.0",
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
        )
    # Tagged again: some EC2-compatible services (and moto) ignore TagSpecifications, and the tag is
    # how a second publish finds this AMI.
    with aws_errors("tag the registered image"):
        ec2.create_tags(Resources=[resp["ImageId"]], Tags=tags)
    return {
        "cloud": "ec2",
        "image_id": resp["ImageId"],
        "name": name,
        "created": True,
        "snapshot_id": snapshot,
        "import_task_id": task,
        "s3": {"bucket": bucket, "key": key, "uploaded": uploaded},
    }
