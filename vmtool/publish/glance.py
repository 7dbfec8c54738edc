"""Publish a build to OpenStack through the Glance v2 REST API, over plain HTTP.

Why not openstacksdk's create_image: its re-publish check finds images by name and its own
`owner_specified.openstack.*` properties (a second call without them makes a duplicate), the image
it returns after an upload is stale (`queued`), it leaves a queued image behind when the upload
fails, and it offers no upload progress. The v2 calls vmtool needs are five (list with a filter,
create, upload, get, delete), so they are made here directly with http.client, streaming the file
with a progress bar. openstacksdk is used only to read clouds.yaml and authenticate (--os-cloud),
where keystoneauth does what no small client should redo.

Idempotency: each image is looked up by its sha512 (`os_hash_value`), name, formats and the
properties vmtool sets (for the root filesystem, `kernel_id` and `ramdisk_id`); a match is reused.
After an upload the stored size, md5 `checksum` and sha512 are compared with the local file; any
failure after the image record was created deletes that record again.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtool.errors import PublishError
from vmtool.log import Progress
from vmtool.manifest import Manifest
from vmtool.publish.common import CHUNK, Digests, default_name, digest_file, require_file

VISIBILITIES = ("private", "shared", "community", "public")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_JSON = 16 << 20


def _excerpt(body: bytes) -> str:
    """A short, printable rendering of an error body (JSON message, or text without HTML tags)."""
    text = body[:4096].decode(errors="replace")
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            for key in ("message", "title", "detail"):
                if isinstance(doc.get(key), str):
                    text = doc[key]
                    break
    except ValueError:
        pass
    text = re.sub(r"<[^>]*>", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = "".join(c for c in text if c.isprintable())
    return text[:300]


@dataclass
class GlanceClient:
    """Glance v2 at `endpoint` (its root URL; a trailing /v2 is accepted) with auth headers."""

    endpoint: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 120.0

    def __post_init__(self) -> None:
        u = urllib.parse.urlsplit(self.endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise PublishError(
                f"not a Glance endpoint URL: {self.endpoint!r}",
                hint="give the image service's root URL, e.g. https://cloud.example.org:9292",
            )
        self._scheme = u.scheme
        self._host = u.hostname
        self._port = u.port
        path = u.path.rstrip("/")
        if path.endswith("/v2"):
            path = path[: -len("/v2")]
        self._base = path + "/v2"

    # ------------------------------------------------------------------ transport

    def _connect(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _network_error(self, e: BaseException) -> PublishError:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return PublishError(
            f"cannot reach Glance at {self.endpoint}: {reason}",
            hint="check the endpoint URL (--endpoint, or the image endpoint of --os-cloud) and the network",
        )

    def _http_error(self, status: int, body: bytes, what: str) -> PublishError:
        msg = _excerpt(body)
        detail = f": {msg}" if msg else ""
        if status == 401:
            return PublishError(
                f"Glance refused the credentials while trying to {what} (401 Unauthorized){detail}",
                hint="get a fresh token ('openstack token issue'), or check the cloud in clouds.yaml",
            )
        if status == 403:
            return PublishError(
                f"Glance does not allow you to {what} (403 Forbidden){detail}",
                hint="public images usually need the admin role: try --visibility private or shared",
            )
        if status == 413:
            return PublishError(
                f"Glance refused to {what}: the image is over a size limit or quota (413){detail}",
                hint="ask the cloud's operators about image_size_cap and user_storage_quota",
            )
        return PublishError(f"Glance answered {status} when asked to {what}{detail}")

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        doc: Any = None,
        ok: tuple[int, ...] = (200,),
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """One JSON request; returns (status, parsed body or None). Statuses outside `ok` raise."""
        body = None if doc is None else json.dumps(doc).encode()
        headers = {"Accept": "application/json", **self.headers}
        if body is not None:
            headers["Content-Type"] = content_type
        conn = self._connect()
        try:
            conn.request(method, self._base + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_JSON)
        except (OSError, http.client.HTTPException) as e:
            raise self._network_error(e) from None
        finally:
            conn.close()
        if resp.status not in ok:
            raise self._http_error(resp.status, data, what)
        if not data:
            return resp.status, None
        try:
            return resp.status, json.loads(data)
        except ValueError:
            raise PublishError(
                f"{self.endpoint} did not answer with JSON when asked to {what}",
                hint="is this the Glance (image service) endpoint?",
            ) from None

    # ------------------------------------------------------------------ images

    def get(self, image_id: str) -> dict[str, Any] | None:
        if not UUID_RE.match(image_id):
            return None
        status, doc = self.request("GET", f"/images/{image_id}", f"look up image {image_id}", ok=(200, 404))
        return doc if status == 200 and isinstance(doc, dict) else None

    def list(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({**filters, "limit": "100"})
        _, doc = self.request("GET", f"/images?{query}", "list images")
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list):
            raise PublishError(f"{self.endpoint} answered an image list without images")
        return [i for i in images if isinstance(i, dict)]

    def create(self, record: dict[str, Any]) -> dict[str, Any]:
        _, doc = self.request(
            "POST", "/images", f"create image {record.get('name')!r}", doc=record, ok=(201,)
        )
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise PublishError(f"{self.endpoint} created an image but returned no id")
        return doc

    def delete(self, image_id: str) -> None:
        self.request("DELETE", f"/images/{image_id}", f"delete image {image_id}", ok=(204, 404))

    def set_visibility(self, image_id: str, visibility: str) -> None:
        self.request(
            "PATCH",
            f"/images/{image_id}",
            f"make image {image_id} {visibility}",
            doc=[{"op": "replace", "path": "/visibility", "value": visibility}],
            content_type="application/openstack-images-v2.1-json-patch",
        )

    def upload(self, image_id: str, path: Path, size: int, label: str) -> None:
        """PUT the file's bytes, streamed, with a progress bar on a terminal."""
        conn = self._connect()
        progress = Progress(label, size)
        try:
            conn.putrequest("PUT", f"{self._base}/images/{image_id}/file")
            for k, v in {
                **self.headers,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            }.items():
                conn.putheader(k, v)
            conn.endheaders()
            sent_error: OSError | None = None
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        conn.send(chunk)
                        progress.update(len(chunk))
            except OSError as e:
                # The server may have answered early (413, 401) and closed: read its answer if any.
                sent_error = e
            try:
                resp = conn.getresponse()
                data = resp.read(MAX_JSON)
            except (OSError, http.client.HTTPException) as e:
                raise self._network_error(sent_error or e) from None
        except (OSError, http.client.HTTPException) as e:
            raise self._network_error(e) from None
        finally:
            conn.close()
        if resp.status not in (201, 204):
            progress.close("failed")
            raise self._http_error(resp.status, data, f"upload {path.name}")
        if sent_error is not None:
            raise self._network_error(sent_error)
        progress.close()


@dataclass
class Published:
    role: str
    id: str
    name: str
    disk_format: str
    container_format: str
    size: int
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _matches(img: dict[str, Any], want: dict[str, Any], d: Digests) -> bool:
    if img.get("status") != "active" or img.get("size") != d.size or img.get("checksum") != d.md5:
        return False
    if img.get("os_hash_algo") == "sha512" and img.get("os_hash_value") != d.sha512:
        return False
    return all(img.get(k) == v for k, v in want.items() if k != "visibility")


def publish_one(
    client: GlanceClient, role: str, path: Path, record: dict[str, Any], label: str
) -> Published:
    """Find an image with these bytes and this record, or create and upload it (deleted on failure)."""
    d = digest_file(path, f"checksumming {label}")
    for img in client.list(os_hash_value=d.sha512, name=str(record["name"])):
        if _matches(img, record, d):
            if record.get("visibility") and img.get("visibility") != record["visibility"]:
                client.set_visibility(img["id"], record["visibility"])
            return Published(
                role,
                img["id"],
                img.get("name", ""),
                record["disk_format"],
                record["container_format"],
                d.size,
                created=False,
            )
    img = client.create(record)
    image_id = img["id"]
    try:
        client.upload(image_id, path, d.size, f"uploading {label}")
        stored = client.get(image_id)
        if stored is None:
            raise PublishError(f"image {image_id} vanished from Glance right after its upload")
        if stored.get("status") != "active":
            raise PublishError(
                f"Glance left image {image_id} in status {stored.get('status')!r} after the upload"
            )
        if not _matches(stored, {}, d):
            raise PublishError(
                f"Glance stored different bytes for {label}: size {stored.get('size')} md5 {stored.get('checksum')}"
                f" (expected {d.size} {d.md5})",
                hint="the upload was corrupted on the way; publish again",
            )
    except BaseException:
        try:
            client.delete(image_id)
        except PublishError:
            pass
        raise
    return Published(
        role,
        image_id,
        str(record["name"]),
        record["disk_format"],
        record["container_format"],
        d.size,
        created=True,
    )


def _check_boot_image(client: GlanceClient, image_id: str, disk_format: str, role: str) -> None:
    """Glance does not check kernel_id/ramdisk_id: make sure they name active images of the right kind."""
    img = client.get(image_id)
    if img is None:
        raise PublishError(f"the {role} image {image_id} does not exist in Glance")
    if img.get("status") != "active" or img.get("disk_format") != disk_format:
        raise PublishError(
            f"the {role} image {image_id} is not an active {disk_format} image "
            f"(status {img.get('status')!r}, disk_format {img.get('disk_format')!r})"
        )


def publish_openstack(
    m: Manifest,
    client: GlanceClient,
    *,
    name: str | None = None,
    visibility: str = "private",
    whole_disk: bool = False,
) -> dict[str, Any]:
    """Publish a build: split (aki + ari + ami with kernel_id/ramdisk_id) or the whole UEFI disk."""
    if visibility not in VISIBILITIES:
        raise PublishError(
            f"unknown visibility {visibility!r}", hint=f"use one of {', '.join(VISIBILITIES)}"
        )
    name = name or default_name(m)
    common: dict[str, Any] = {
        "visibility": visibility,
        "architecture": "x86_64",
        "os_type": "linux",
        "vmtool_kernel_version": m.kernel.version,
    }
    images: list[Published] = []
    if whole_disk:
        if m.disk is None:
            raise PublishError(
                "this build has no whole-disk image",
                hint="assemble one with 'vmtool disk assemble MANIFEST' or build with --disk",
            )
        disk = require_file(m, m.disk.path, "disk image")
        record = {
            **common,
            "name": name,
            "disk_format": m.disk.format,
            "container_format": "bare",
            "hw_firmware_type": "uefi",
            "hw_machine_type": "q35",
        }
        images.append(publish_one(client, "disk", disk, record, f"disk image {disk.name}"))
    else:
        kernel = require_file(m, m.kernel.path, "kernel")
        initrd = require_file(m, m.initrd.path, "initrd")
        rootfs = require_file(m, m.rootfs.path, "root filesystem")
        k = publish_one(
            client,
            "kernel",
            kernel,
            {**common, "name": f"{name}-kernel", "disk_format": "aki", "container_format": "aki"},
            f"kernel {kernel.name}",
        )
        images.append(k)
        r = publish_one(
            client,
            "ramdisk",
            initrd,
            {**common, "name": f"{name}-initrd", "disk_format": "ari", "container_format": "ari"},
            f"initrd {initrd.name}",
        )
        images.append(r)
        _check_boot_image(client, k.id, "aki", "kernel")
        _check_boot_image(client, r.id, "ari", "ramdisk")
        fmt = ("ami", "ami") if m.rootfs.format == "raw" else (m.rootfs.format, "bare")
        record = {
            **common,
            "name": name,
            "disk_format": fmt[0],
            "container_format": fmt[1],
            "kernel_id": k.id,
            "ramdisk_id": r.id,
            "os_command_line": m.cmdline,
        }
        images.append(publish_one(client, "image", rootfs, record, f"root filesystem {rootfs.name}"))
    return {
        "cloud": "openstack",
        "endpoint": client.endpoint,
        "image_id": images[-1].id,
        "name": name,
        "images": [i.to_dict() for i in images],
    }


def client_from_cloud(cloud: str, timeout: float = 120.0) -> GlanceClient:
    """A client for a cloud named in clouds.yaml: openstacksdk reads it and authenticates."""
    try:
        import openstack
        import openstack.exceptions
    except ImportError:
        raise PublishError(
            "--os-cloud needs openstacksdk, which is not installed",
            hint="pip install openstacksdk, or give --endpoint and a token (OS_TOKEN)",
        ) from None
    try:
        conn = openstack.connect(cloud=cloud)
        endpoint = conn.image.get_endpoint()
        headers = conn.session.get_auth_headers() or {}
    except openstack.exceptions.ConfigException as e:
        raise PublishError(
            f"cannot use cloud {cloud!r}: {e}", hint="check its entry in clouds.yaml"
        ) from None
    except Exception as e:  # keystoneauth raises its own hierarchy: connection, auth, catalog errors
        raise PublishError(
            f"cannot authenticate to cloud {cloud!r}: {type(e).__name__}: {e}",
            hint="check the credentials and auth_url of the cloud in clouds.yaml",
        ) from None
    if not endpoint:
        raise PublishError(f"cloud {cloud!r} has no image (Glance) endpoint in its catalog")
    return GlanceClient(str(endpoint), {str(k): str(v) for k, v in headers.items()}, timeout=timeout)
