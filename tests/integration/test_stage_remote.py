"""Remote sources against real servers on loopback: http.server, moto's S3 server, a private sshd."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures.stage import HttpServer, S3Server, SshServer, StageImages, free_port
from vmtool.cli.main import main

pytestmark = pytest.mark.integration


def vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def nothing_left(cache: Path, into: Path) -> None:
    assert not (cache / "bases").exists() or list((cache / "bases").iterdir()) == []
    assert not (cache / "tmp").exists() or list((cache / "tmp").iterdir()) == []
    assert not into.exists() or list(into.iterdir()) == []


def test_http_fetch_once_then_warm(
    tmp_path: Path, stage_images: StageImages, http_server: HttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(stage_images.qcow2, http_server.root / "base.qcow2")
    cache, into = tmp_path / "cache", tmp_path / "job"
    url = http_server.url("base.qcow2")
    rc, out, err = vm(capsys, "stage", url, "--into", os.fspath(into), "--cache", os.fspath(cache), "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert first["fetched_bytes"] == stage_images.qcow2.stat().st_size
    rc, out, err = vm(
        capsys,
        "stage",
        url,
        "--into",
        os.fspath(into),
        "--name",
        "two.qcow2",
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["cache_hit"]
    assert http_server.gets["/base.qcow2"] == 1
    # With the checksum given, a warm stage needs no request at all.
    heads = http_server.heads["/base.qcow2"]
    rc, out, err = vm(
        capsys,
        "stage",
        url,
        "--sha256",
        first["sha256"],
        "--into",
        os.fspath(into),
        "--name",
        "three.qcow2",
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    assert http_server.heads["/base.qcow2"] == heads and http_server.gets["/base.qcow2"] == 1


def test_http_404_and_unreachable(
    tmp_path: Path, http_server: HttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, _, err = vm(
        capsys,
        "stage",
        http_server.url("missing.qcow2"),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
    )
    assert rc == 1 and "not found (HTTP 404)" in err and "hint:" in err and "Traceback" not in err
    nothing_left(cache, into)
    port = free_port()  # nothing listens there
    rc, _, err = vm(
        capsys,
        "stage",
        f"http://127.0.0.1:{port}/base.qcow2",
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
    )
    assert rc == 1 and "cannot reach 127.0.0.1" in err and "hint:" in err
    nothing_left(cache, into)


def test_http_html_page_is_not_an_image(
    tmp_path: Path, http_server: HttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    (http_server.root / "index.html").write_text("<html><body>Welcome</body></html>\n")
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, _, err = vm(
        capsys,
        "stage",
        http_server.url("index.html"),
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
    )
    assert rc == 1 and "not a disk image" in err
    nothing_left(cache, into)


@pytest.fixture
def s3_env(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    return moto_s3


def test_s3_source(
    tmp_path: Path, stage_images: StageImages, s3_env: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint)
    s3.create_bucket(Bucket="images")
    s3.upload_file(os.fspath(stage_images.qcow2), "images", "v1/base.qcow2")
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(
        capsys,
        "stage",
        "s3://images/v1/base.qcow2",
        "--into",
        os.fspath(into),
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0, err
    res = json.loads(out)
    assert res["format"] == "qcow2" and Path(res["overlay"]).name == "base.qcow2"
    rc, out, _ = vm(
        capsys,
        "stage",
        "s3://images/v1/base.qcow2",
        "--into",
        os.fspath(into),
        "--name",
        "b.qcow2",
        "--endpoint-url",
        s3_env.endpoint,
        "--cache",
        os.fspath(cache),
        "--json",
    )
    assert rc == 0 and json.loads(out)["cache_hit"]
    rc, _, err = vm(
        capsys,
        "stage",
        "s3://images/v1/missing.qcow2",
        "--into",
        os.fspath(tmp_path / "j2"),
        "--cache",
        os.fspath(tmp_path / "c2"),
    )
    assert rc == 1 and "not found" in err and "Traceback" not in err
    nothing_left(tmp_path / "c2", tmp_path / "j2")


@pytest.fixture
def ssh_env(sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> SshServer:
    monkeypatch.setenv("VMTOOL_SSH_KEY", os.fspath(sshd.key))
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(sshd.known_hosts))
    return sshd


def test_sftp_source_checks_host_keys(
    tmp_path: Path,
    stage_images: StageImages,
    ssh_env: SshServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copy(stage_images.qcow2, ssh_env.root / "base.qcow2")
    url = f"sftp://{ssh_env.user}@127.0.0.1:{ssh_env.port}{ssh_env.root}/base.qcow2"
    cache, into = tmp_path / "cache", tmp_path / "job"
    rc, out, err = vm(capsys, "stage", url, "--into", os.fspath(into), "--cache", os.fspath(cache), "--json")
    assert rc == 0, err
    assert json.loads(out)["fetched_bytes"] == stage_images.qcow2.stat().st_size
    # An unknown host key is refused, not trusted on first use ...
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(empty))
    monkeypatch.setenv("HOME", os.fspath(tmp_path))  # no ~/.ssh/known_hosts either
    c2, j2 = tmp_path / "c2", tmp_path / "j2"
    rc, _, err = vm(capsys, "stage", url, "--into", os.fspath(j2), "--cache", os.fspath(c2))
    assert rc == 1 and "not in known_hosts" in err and "--accept-new-host-key" in err
    nothing_left(c2, j2)
    # ... unless asked, and then it is recorded.
    rc, _, err = vm(
        capsys, "stage", url, "--accept-new-host-key", "--into", os.fspath(j2), "--cache", os.fspath(c2)
    )
    assert rc == 0, err
    assert "127.0.0.1" in empty.read_text()
    # A key that does not match known_hosts is an error even with --accept-new-host-key.
    parts = ssh_env.known_hosts.read_text().split()
    fake = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    empty.write_text(f"{parts[0]} ssh-ed25519 {fake}\n")
    rc, _, err = vm(
        capsys,
        "stage",
        url,
        "--accept-new-host-key",
        "--into",
        os.fspath(j2),
        "--name",
        "x.qcow2",
        "--cache",
        os.fspath(tmp_path / "c3"),
    )
    assert rc == 1 and "does not match" in err
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(ssh_env.known_hosts))
    rc, _, err = vm(
        capsys,
        "stage",
        url.replace("base.qcow2", "missing.qcow2"),
        "--into",
        os.fspath(tmp_path / "j4"),
        "--cache",
        os.fspath(tmp_path / "c4"),
    )
    assert rc == 1 and "no such file" in err
    nothing_left(tmp_path / "c4", tmp_path / "j4")


def test_progress_on_a_terminal_only(
    tmp_path: Path,
    stage_images: StageImages,
    http_server: HttpServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copy(stage_images.qcow2, http_server.root / "base.qcow2")
    rc, _, err = vm(
        capsys,
        "stage",
        http_server.url("base.qcow2"),
        "--into",
        os.fspath(tmp_path / "a"),
        "--cache",
        os.fspath(tmp_path / "c1"),
    )
    assert rc == 0 and err == ""  # not a TTY: quiet
    monkeypatch.setenv("VMTOOL_PROGRESS", "1")  # as if stderr were a terminal
    rc, _, err = vm(
        capsys,
        "stage",
        http_server.url("base.qcow2"),
        "--into",
        os.fspath(tmp_path / "b"),
        "--cache",
        os.fspath(tmp_path / "c2"),
    )
    assert rc == 0 and "fetching base.qcow2" in err and "done" in err
