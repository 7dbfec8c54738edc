"""CLI: `vmtool publish openstack|ec2 MANIFEST` and `vmtool disk assemble MANIFEST`."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vmtool.cli.output import add_json_flag, emit
from vmtool.errors import PublishError, VmtoolError
from vmtool.image.formats import FORMATS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # ---- vmtool disk assemble
    disk = sub.add_parser("disk", help="whole-disk images made from a build")
    dsub = disk.add_subparsers(dest="disk_command", metavar="COMMAND")
    asm = dsub.add_parser(
        "assemble",
        help="write a bootable UEFI whole-disk image (GPT, ESP with a unified kernel image, root)",
        description="Assemble a bootable UEFI whole-disk image from an existing build and record it in "
        "its manifest.json. No root privileges or mounts are needed.",
    )
    asm.add_argument("manifest", type=Path, help="manifest.json written by 'vmtool build'")
    asm.add_argument(
        "-o", "--output", type=Path, help="disk image path, beside the manifest (default disk.FORMAT)"
    )
    asm.add_argument(
        "--format", choices=FORMATS, default="raw", help="disk image format (default raw)"
    )
    add_json_flag(asm)
    asm.set_defaults(func=cmd_disk_assemble)
    disk.set_defaults(func=lambda a: _usage(disk))

    # ---- vmtool publish
    pub = sub.add_parser("publish", help="bundle and register a build's images on OpenStack or EC2")
    psub = pub.add_subparsers(dest="publish_command", metavar="CLOUD")
    pub.set_defaults(func=lambda a: _usage(pub))

    os_p = psub.add_parser(
        "openstack",
        help="upload to Glance v2: kernel (aki) + initrd (ari) + root (ami), or the whole UEFI disk",
        description="Publish a build to OpenStack's image service. Re-publishing the same build finds the "
        "images by checksum and creates nothing new.",
    )
    os_p.add_argument("manifest", type=Path, help="manifest.json written by 'vmtool build'")
    os_p.add_argument("--name", help="image name (default vmtool-KERNEL-ROOTFSHASH)")
    os_p.add_argument(
        "--visibility", choices=("private", "shared", "community", "public"), default="private"
    )
    os_p.add_argument(
        "--whole-disk", action="store_true", help="publish the UEFI whole-disk image (build --disk)"
    )
    auth = os_p.add_mutually_exclusive_group()
    auth.add_argument(
        "--os-cloud", default=os.environ.get("OS_CLOUD"), help="cloud name in clouds.yaml (OS_CLOUD)"
    )
    auth.add_argument(
        "--endpoint",
        default=os.environ.get("OS_IMAGE_URL"),
        help="Glance endpoint URL (OS_IMAGE_URL); the token comes from OS_TOKEN or --token-file",
    )
    os_p.add_argument(
        "--token-file", type=Path, help="file holding a Keystone token (safer than the environment)"
    )
    os_p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each HTTP answer")
    add_json_flag(os_p)
    os_p.set_defaults(func=cmd_openstack)

    ec2 = psub.add_parser(
        "ec2",
        help="upload the whole disk to S3, import it as a snapshot and register a UEFI AMI",
        description="Publish a build's whole-disk image (build --disk) to EC2: S3 multipart upload, "
        "import_snapshot, register_image (UEFI, ENA). --legacy-bundle makes an S3-backed "
        "euca2ools-style bundle instead.",
    )
    ec2.add_argument("manifest", type=Path, help="manifest.json written by 'vmtool build'")
    ec2.add_argument("--bucket", required=True, help="S3 bucket for the upload (must exist)")
    ec2.add_argument("--prefix", default="vmtool/", help="key prefix in the bucket (default vmtool/)")
    ec2.add_argument("--region", help="AWS region (default from AWS_DEFAULT_REGION / the profile)")
    ec2.add_argument("--endpoint-url", help="S3/EC2 endpoint URL (for EC2-compatible clouds)")
    ec2.add_argument("--profile", help="AWS profile from ~/.aws/config")
    ec2.add_argument("--name", help="AMI name (default vmtool-KERNEL-ROOTFSHASH)")
    ec2.add_argument("--role", help="VM Import service role (default: EC2's default, vmimport)")
    ec2.add_argument(
        "--poll-interval", type=float, default=15.0, help="seconds between import status checks"
    )
    ec2.add_argument(
        "--legacy-bundle",
        action="store_true",
        help="euca2ools bundle format (AES-128-CBC, 10 MiB parts, signed manifest.xml)",
    )
    ec2.add_argument(
        "--ec2-cert",
        type=Path,
        default=os.environ.get("EUCALYPTUS_CERT"),
        help="the cloud's certificate for --legacy-bundle (EUCALYPTUS_CERT)",
    )
    ec2.add_argument(
        "--cert",
        type=Path,
        default=os.environ.get("EC2_CERT"),
        help="your X.509 certificate for --legacy-bundle (EC2_CERT)",
    )
    ec2.add_argument(
        "--private-key",
        type=Path,
        default=os.environ.get("EC2_PRIVATE_KEY"),
        help="your private key for --legacy-bundle (EC2_PRIVATE_KEY)",
    )
    ec2.add_argument(
        "--user",
        default=os.environ.get("EC2_USER_ID", ""),
        help="your account id for --legacy-bundle (EC2_USER_ID)",
    )
    add_json_flag(ec2)
    ec2.set_defaults(func=cmd_ec2)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def cmd_disk_assemble(args: argparse.Namespace) -> int:
    from vmtool import manifest as manifest_mod
    from vmtool.image.assemble import assemble_disk

    m = manifest_mod.load(args.manifest)  # once: a clear error before any work if it is not a manifest
    out = args.output or args.manifest.parent / f"disk.{args.format}"
    info = assemble_disk(m, out, args.format)
    replace(m, disk=info).save(args.manifest)
    data = {"manifest": str(args.manifest), "disk": asdict(info)}
    emit(args, data, f"{args.manifest.parent / info.path} ({info.format}, UEFI, {info.virtual_size} bytes)")
    return 0


def _token(args: argparse.Namespace) -> dict[str, str]:
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise PublishError(f"cannot read the token file {args.token_file}: {e.strerror}") from None
    else:
        token = os.environ.get("OS_TOKEN") or os.environ.get("OS_AUTH_TOKEN") or ""
    return {"X-Auth-Token": token} if token else {}


def cmd_openstack(args: argparse.Namespace) -> int:
    from vmtool import manifest as manifest_mod
    from vmtool.publish.glance import GlanceClient, client_from_cloud, publish_openstack

    m = manifest_mod.load(args.manifest)
    if args.endpoint:
        client = GlanceClient(args.endpoint, _token(args), timeout=args.timeout)
    elif args.os_cloud:
        client = client_from_cloud(args.os_cloud, timeout=args.timeout)
    else:
        raise PublishError(
            "no OpenStack cloud given",
            hint="pass --os-cloud NAME (clouds.yaml) or --endpoint URL with a token in OS_TOKEN",
        )
    result = publish_openstack(
        m, client, name=args.name, visibility=args.visibility, whole_disk=args.whole_disk
    )
    lines = [
        f"{i['role']}: {i['id']} {i['name']} ({i['disk_format']}, {'uploaded' if i['created'] else 'already there'})"
        for i in result["images"]
    ]
    emit(args, result, "\n".join(lines + [result["image_id"]]))
    return 0


def cmd_ec2(args: argparse.Namespace) -> int:
    from vmtool import manifest as manifest_mod
    from vmtool.publish.ec2 import SnapshotImporter, make_clients, publish_ec2

    m = manifest_mod.load(args.manifest)
    s3, ec2 = make_clients(args.region, args.endpoint_url, args.profile)
    result: dict[str, Any]
    if args.legacy_bundle:
        from vmtool.publish.bundle import BundleKeys, publish_bundle

        missing = [
            flag
            for flag, v in (
                ("--ec2-cert", args.ec2_cert),
                ("--cert", args.cert),
                ("--private-key", args.private_key),
            )
            if not v
        ]
        if missing:
            raise VmtoolError(
                f"--legacy-bundle needs {', '.join(missing)}",
                hint="give the cloud's certificate and your certificate and key (EUCALYPTUS_CERT, EC2_CERT, "
                "EC2_PRIVATE_KEY)",
            )
        keys = BundleKeys.load(Path(args.ec2_cert), Path(args.cert), Path(args.private_key), args.user)
        result = publish_bundle(m, s3, ec2, keys, bucket=args.bucket, prefix=args.prefix, name=args.name)
    else:
        importer = SnapshotImporter(ec2, role=args.role, poll_interval=args.poll_interval)
        result = publish_ec2(
            m, s3, ec2, bucket=args.bucket, name=args.name, prefix=args.prefix, importer=importer
        )
    emit(args, result, result["image_id"])
    return 0
