"""The queue's host-side data plane against real servers on loopback (no VM): URL inputs into the node
cache (fetched once, sha256 checked, limits), uploads to moto's S3 (whole or nothing), the sshd fixture
(sftp) and file:// roots."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from tests.fixtures.cloud import MotoServer
from tests.fixtures.stage import HttpServer, S3Server, SshServer
from vmtool.queue.data import DataError, Inputs, Outputs
from vmtool.stage.cache import Cache

pytestmark = [pytest.mark.integration, pytest.mark.cloud]


@pytest.fixture
def s3_env(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.fspath(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.fspath(tmp_path / "none"))
    return moto_s3


def _s3(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_shared_input_is_fetched_once_by_eight_at_once(http_server: HttpServer, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (http_server.root / "in.bin").write_bytes(data)
    inputs = Inputs(Cache.open(tmp_path / "cache"))
    got: list[object] = []

    def one() -> None:
        try:
            got.append(inputs.get("i", "in.bin", {"url": http_server.url("in.bin")}, max_bytes=10 << 20))
        except BaseException as e:
            got.append(e)

    ts = [threading.Thread(target=one) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert http_server.gets["/in.bin"] == 1 and inputs.fetches == 1
    shas = {getattr(g, "sha256", None) for g in got}
    assert shas == {hashlib.sha256(data).hexdigest()}
    path = got[0].path  # type: ignore[attr-defined]
    assert path.read_bytes() == data and path.stat().st_mode & 0o222 == 0
    # By sha256 alone: no request at all.
    again = inputs.get(
        "j",
        "x",
        {"url": http_server.url("in.bin"), "sha256": hashlib.sha256(data).hexdigest()},
        max_bytes=10 << 20,
    )
    assert again.fetched_bytes == 0 and http_server.heads["/in.bin"] <= 8


def test_input_errors_leave_nothing_in_the_cache(http_server: HttpServer, tmp_path: Path) -> None:
    (http_server.root / "in.bin").write_bytes(b"x" * 5000)
    cache = Cache.open(tmp_path / "cache")
    inputs = Inputs(cache, input_roots=(tmp_path / "ok",))
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "f.txt").write_text("fine")
    (tmp_path / "secret").write_text("no")
    (tmp_path / "ok" / "link").symlink_to(tmp_path / "secret")
    cases = [
        ({"url": http_server.url("in.bin"), "sha256": "0" * 64}, "checksum mismatch"),
        ({"url": http_server.url("in.bin")}, "input limit"),
        ({"url": http_server.url("missing.bin")}, "not found"),
        ({"url": f"file://{tmp_path}/secret"}, "input root"),
        ({"url": f"file://{tmp_path}/ok/link"}, "input root"),
    ]
    for spec, words in cases:
        with pytest.raises(DataError) as e:
            inputs.get("i", "in.bin", spec, max_bytes=4000 if "limit" in words else 1 << 20)
        assert words in e.value.message, e.value.message
    assert not list((cache.root / "bases").glob("*.raw")) and not list((cache.root / "tmp").iterdir())
    ok = inputs.get("i", "f.txt", {"url": f"file://{tmp_path}/ok/f.txt"}, max_bytes=100)
    assert ok.path.read_text() == "fine"


def test_s3_and_sftp_inputs(
    s3_env: S3Server, sshd: SshServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VMTOOL_SSH_KEY", os.fspath(sshd.key))
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(sshd.known_hosts))
    s3 = _s3(s3_env.endpoint)
    s3.create_bucket(Bucket="qin")
    s3.put_object(Bucket="qin", Key="d/a.bin", Body=b"from s3")
    (sshd.root / "b.bin").write_bytes(b"from sftp")
    inputs = Inputs(Cache.open(tmp_path / "cache"), endpoint_url=s3_env.endpoint)
    a = inputs.get("i", "a", {"url": "s3://qin/d/a.bin"}, max_bytes=100)
    b = inputs.get(
        "i", "b", {"url": f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/b.bin"}, max_bytes=100
    )
    assert a.path.read_bytes() == b"from s3" and b.path.read_bytes() == b"from sftp"


def test_uploads_are_whole_or_absent(
    s3_env: S3Server, sshd: SshServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VMTOOL_SSH_KEY", os.fspath(sshd.key))
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(sshd.known_hosts))
    s3 = _s3(s3_env.endpoint)
    s3.create_bucket(Bucket="qout")
    local = tmp_path / "o.bin"
    data = os.urandom(12 << 20)  # large enough for a multipart upload
    local.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    outs = Outputs("s3://qout/r/x1/", endpoint_url=s3_env.endpoint)
    up = outs.upload("o.bin", local, len(data), sha)
    assert up.url == "s3://qout/r/x1/o.bin"
    assert s3.get_object(Bucket="qout", Key="r/x1/o.bin")["Body"].read() == data
    # A retry writes the same key again: still one whole object.
    Outputs("s3://qout/r/x1/", endpoint_url=s3_env.endpoint).upload("o.bin", local, len(data), sha)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="qout")["Contents"]] == ["r/x1/o.bin"]
    assert not s3.list_multipart_uploads(Bucket="qout").get("Uploads")
    outs.rollback()
    assert "Contents" not in s3.list_objects_v2(Bucket="qout")

    with pytest.raises(DataError, match="does not exist"):
        Outputs("s3://no-such-bucket-q/{x}/".replace("{x}", "x1"), endpoint_url=s3_env.endpoint).upload(
            "o.bin", local, len(data), sha
        )
    sftp = Outputs(f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/deep/x1/")
    sftp.upload("o.bin", local, len(data), sha)
    assert (sshd.root / "deep" / "x1" / "o.bin").read_bytes() == data
    assert [p.name for p in (sshd.root / "deep" / "x1").iterdir()] == ["o.bin"]
    with pytest.raises(DataError, match="output root"):
        Outputs(f"file://{tmp_path}/elsewhere/x1/").upload("o.bin", local, len(data), sha)
    with pytest.raises(DataError, match="plain file name"):
        Outputs("s3://qout/r/x1/", endpoint_url=s3_env.endpoint).dest("../x")


def test_denied_s3_upload(
    moto_server_auth: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """moto checking credentials (none are valid): the upload is refused, one clear error."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    local = tmp_path / "o.txt"
    local.write_text("x")
    with pytest.raises(DataError) as e:
        Outputs("s3://any/x1/", endpoint_url=moto_server_auth.url).upload("o.txt", local, 1, "0" * 64)
    assert "denied" in e.value.message or "InvalidAccessKeyId" in e.value.message
