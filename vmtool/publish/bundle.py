"""The euca2ools / ec2-ami-tools S3-backed bundle format, for clouds that still register bundles.

Format (eucalyptus/euca2ools `bundle/pipes/core.py`, `bundle/manifest.py`; cloud-queue.md 1.1):
the image goes into a one-member tar stream, whose SHA-1 is the manifest's `image/digest`; the tar
is gzipped, encrypted with AES-128-CBC (PKCS#7 padding, as `openssl enc`) under a random key and
IV, and cut into 10 MiB parts `PREFIX.part.NN`, each with its own SHA-1. The key and IV, as 32-char
hex strings, are RSA-encrypted (PKCS#1 v1.5) for the cloud's certificate (`ec2_encrypted_*`) and
the user's (`user_encrypted_*`). The signature is RSA-SHA1, by the user's key, over the serialized
`<machine_configuration>` followed by the serialized `<image>`, exactly as they appear in the file.

The crypto is done in-process with `cryptography` (streaming, no key on a command line); the
tests check the result with plain `openssl` and `tar`.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool import __version__
from vmtool.errors import PublishError
from vmtool.log import Progress
from vmtool.manifest import Manifest
from vmtool.publish.common import CHUNK, default_name, digest_file, require_file

PART_SIZE = 10 * 1024 * 1024
EC2_BUNDLE_SIZE_LIMIT = 10 << 30
IMAGE_TYPES = ("machine", "kernel", "ramdisk")
FIXED_MTIME = 946684800


@dataclass
class BundleKeys:
    """The cloud's certificate, the user's certificate and private key (all PEM), the user's account id."""

    ec2_public: Any
    user_public: Any
    user_private: Any
    user_id: str = ""

    @classmethod
    def load(cls, ec2_cert: Path, user_cert: Path, user_key: Path, user_id: str = "") -> BundleKeys:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        def cert(p: Path, what: str) -> Any:
            try:
                c = x509.load_pem_x509_certificate(p.read_bytes())
            except OSError as e:
                raise PublishError(f"cannot read {what} {p}: {e.strerror}") from None
            except ValueError:
                raise PublishError(f"{what} {p} is not a PEM X.509 certificate") from None
            key = c.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                raise PublishError(
                    f"{what} {p} does not hold an RSA key", hint="bundles need RSA certificates"
                )
            return key

        try:
            priv = serialization.load_pem_private_key(user_key.read_bytes(), password=None)
        except OSError as e:
            raise PublishError(f"cannot read the private key {user_key}: {e.strerror}") from None
        except (ValueError, TypeError):
            raise PublishError(
                f"{user_key} is not an unencrypted PEM private key",
                hint="decrypt it first: openssl pkey -in KEY -out KEY.plain",
            ) from None
        if not isinstance(priv, rsa.RSAPrivateKey):
            raise PublishError(f"{user_key} is not an RSA private key")
        return cls(
            cert(ec2_cert, "the cloud's certificate"),
            cert(user_cert, "your certificate"),
            priv,
            user_id.replace("-", ""),
        )


@dataclass
class Bundle:
    manifest: Path
    parts: list[Path] = field(default_factory=list)


class _PartWriter:
    """Encrypted bytes in, 10 MiB part files out, each part's SHA-1 kept."""

    def __init__(self, outdir: Path, prefix: str, part_size: int) -> None:
        self.outdir, self.prefix, self.part_size = outdir, prefix, part_size
        self.parts: list[tuple[Path, str]] = []
        self._f: Any = None
        self._h: Any = None
        self._n = 0
        self.total = 0

    def _open(self) -> None:
        path = self.outdir / f"{self.prefix}.part.{len(self.parts):02}"
        self._f, self._h, self._n = open(path, "wb"), hashlib.sha1(usedforsecurity=False), 0
        self.parts.append((path, ""))

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            path, _ = self.parts[-1]
            self.parts[-1] = (path, self._h.hexdigest())
            self._f = None

    def write(self, data: bytes) -> None:
        while data:
            if self._f is None or self._n >= self.part_size:
                self._close()
                self._open()
            take = data[: self.part_size - self._n]
            self._f.write(take)
            self._h.update(take)
            self._n += len(take)
            self.total += len(take)
            data = data[len(take) :]

    def close(self) -> None:
        self._close()


class _Pipeline:
    """tar bytes in: SHA-1 of the tar stream, then gzip, then AES-128-CBC, then parts."""

    def __init__(self, key: bytes, iv: bytes, parts: _PartWriter) -> None:
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self._gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip member, like `gzip -c`
        self._pad = padding.PKCS7(128).padder()
        self._enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._parts = parts

    def _emit(self, compressed: bytes) -> None:
        if compressed:
            self._parts.write(self._enc.update(self._pad.update(compressed)))

    def write(self, data: bytes) -> int:
        self.sha1.update(data)
        self._emit(self._gz.compress(data))
        return len(data)

    def close(self) -> None:
        self._emit(self._gz.flush())
        self._parts.write(self._enc.update(self._pad.finalize()) + self._enc.finalize())
        self._parts.close()


def _wrap(public_key: Any, text: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import padding

    return bytes(public_key.encrypt(text.encode(), padding.PKCS1v15())).hex()


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


def make_bundle(
    image: Path,
    outdir: Path,
    keys: BundleKeys,
    *,
    prefix: str | None = None,
    image_type: str = "machine",
    arch: str = "x86_64",
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    part_size: int = PART_SIZE,
) -> Bundle:
    """Bundle `image` into `outdir`: PREFIX.part.NN files and PREFIX.manifest.xml."""
    if image_type not in IMAGE_TYPES:
        raise PublishError(f"unknown bundle image type {image_type!r}")
    prefix = prefix or image.name
    key_hex, iv_hex = secrets.token_hex(16), secrets.token_hex(16)
    parts = _PartWriter(outdir, prefix, part_size)
    pipe = _Pipeline(bytes.fromhex(key_hex), bytes.fromhex(iv_hex), parts)
    try:
        size = image.stat().st_size
        progress = Progress(f"bundling {image.name}", size)
        sink: Any = pipe
        with (
            open(image, "rb") as src,
            tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            info = tarfile.TarInfo(image.name)
            info.size, info.mode, info.mtime = size, 0o644, FIXED_MTIME

            class _Counting:
                def read(self, n: int = CHUNK) -> bytes:
                    b = src.read(n)
                    progress.update(len(b))
                    return b

            reader: Any = _Counting()
            tar.addfile(info, reader)
        pipe.close()
        progress.close()
    except OSError as e:
        raise PublishError(f"cannot bundle {image}: {e.strerror or e}") from None

    root = ET.Element("manifest")
    _sub(root, "version", "2007-10-10")
    bundler = _sub(root, "bundler")
    _sub(bundler, "name", "vmtool")
    _sub(bundler, "version", __version__)
    _sub(bundler, "release", "0")
    mc = _sub(root, "machine_configuration")
    _sub(mc, "architecture", arch)
    if kernel_id:
        _sub(mc, "kernel_id", kernel_id)
    if ramdisk_id:
        _sub(mc, "ramdisk_id", ramdisk_id)
    img = _sub(root, "image")
    _sub(img, "name", prefix)
    _sub(img, "user", keys.user_id)
    _sub(img, "type", image_type)  # right after <user>, "for EC2 compatibility" (euca2ools)
    _sub(img, "digest", pipe.sha1.hexdigest(), algorithm="SHA1")
    _sub(img, "size", str(size))
    _sub(img, "bundled_size", str(parts.total))
    _sub(img, "ec2_encrypted_key", _wrap(keys.ec2_public, key_hex), algorithm="AES-128-CBC")
    _sub(img, "user_encrypted_key", _wrap(keys.user_public, key_hex), algorithm="AES-128-CBC")
    _sub(img, "ec2_encrypted_iv", _wrap(keys.ec2_public, iv_hex))
    _sub(img, "user_encrypted_iv", _wrap(keys.user_public, iv_hex))
    plist = _sub(img, "parts", count=str(len(parts.parts)))
    for i, (path, sha1) in enumerate(parts.parts):
        part = _sub(plist, "part", index=str(i))
        _sub(part, "filename", path.name)
        _sub(part, "digest", sha1, algorithm="SHA1")

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signed = ET.tostring(mc, encoding="unicode") + ET.tostring(img, encoding="unicode")
    sig = keys.user_private.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA1())
    _sub(root, "signature", bytes(sig).hex())
    manifest = outdir / f"{prefix}.manifest.xml"
    manifest.write_text('<?xml version="1.0" ?>' + ET.tostring(root, encoding="unicode"))
    return Bundle(manifest=manifest, parts=[p for p, _ in parts.parts])


def upload_bundle(s3: Any, bundle: Bundle, bucket: str, prefix: str) -> str:
    """Parts, then the manifest, with the `aws-exec-read` ACL EC2 needs; returns the ImageLocation."""
    from vmtool.publish.ec2 import aws_errors

    files = [*bundle.parts, bundle.manifest]
    total = sum(p.stat().st_size for p in files)
    progress = Progress(f"uploading bundle {bundle.manifest.name}", total)
    for p in files:
        with aws_errors(f"upload {p.name} to the S3 bucket {bucket!r}", bucket=bucket), open(p, "rb") as f:
            s3.put_object(Bucket=bucket, Key=f"{prefix}{p.name}", Body=f, ACL="aws-exec-read")
        progress.update(p.stat().st_size)
    progress.close()
    return f"{bucket}/{prefix}{bundle.manifest.name}"


def publish_bundle(
    m: Manifest,
    s3: Any,
    ec2: Any,
    keys: BundleKeys,
    *,
    bucket: str,
    prefix: str = "vmtool/",
    name: str | None = None,
) -> dict[str, Any]:
    """Bundle, upload and register: the whole disk (HVM) if the build has one, else kernel + ramdisk + root."""
    from vmtool.publish.ec2 import aws_errors, find_image, raw_disk

    name = name or default_name(m)
    with aws_errors(f"use the S3 bucket {bucket!r}", bucket=bucket):
        s3.head_bucket(Bucket=bucket)
    registered: list[dict[str, str]] = []

    def one(path: Path, image_name: str, image_type: str, **register: Any) -> str:
        d = digest_file(path, f"checksumming {path.name}")
        tags = [{"Key": "Name", "Value": image_name}, {"Key": "vmtool:sha256", "Value": d.sha256}]
        found = find_image(ec2, image_name, d.sha256)
        if found is not None:
            registered.append({"type": image_type, "image_id": found["ImageId"], "created": "false"})
            return str(found["ImageId"])
        if d.size > EC2_BUNDLE_SIZE_LIMIT:
            raise PublishError(f"{path.name} is over the 10 GiB limit of S3-backed bundles")
        work = Path(tempfile.mkdtemp(prefix=".bundle-", dir=path.parent))
        try:
            bundle = make_bundle(
                path,
                work,
                keys,
                prefix=f"{image_name}",
                image_type=image_type,
                kernel_id=register.get("KernelId"),
                ramdisk_id=register.get("RamdiskId"),
            )
            location = upload_bundle(s3, bundle, bucket, prefix)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with aws_errors(f"register the {image_type} bundle {location}"):
            resp = ec2.register_image(
                ImageLocation=location,
                Name=image_name,
                Architecture="x86_64",
                TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
                **register,
            )
            # Tagged again for services (and moto) that ignore TagSpecifications: the tag finds it next time.
            ec2.create_tags(Resources=[resp["ImageId"]], Tags=tags)
        registered.append(
            {"type": image_type, "image_id": resp["ImageId"], "created": "true", "location": location}
        )
        return str(resp["ImageId"])

    if m.disk is not None:
        with raw_disk(m) as disk:
            image_id = one(disk, name, "machine", VirtualizationType="hvm")
    else:
        kernel = require_file(m, m.kernel.path, "kernel")
        initrd = require_file(m, m.initrd.path, "initrd")
        rootfs = require_file(m, m.rootfs.path, "root filesystem")
        if m.rootfs.format != "raw":
            raise PublishError(
                "bundles hold raw root filesystems", hint="rebuild with a raw root filesystem"
            )
        aki = one(kernel, f"{name}-kernel", "kernel")
        ari = one(initrd, f"{name}-initrd", "ramdisk")
        image_id = one(
            rootfs, name, "machine", KernelId=aki, RamdiskId=ari, VirtualizationType="paravirtual"
        )
    return {
        "cloud": "ec2",
        "mode": "legacy-bundle",
        "image_id": image_id,
        "name": name,
        "images": registered,
    }
