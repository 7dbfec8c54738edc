"""The queue's data plane end to end: a relay-mode worker with one real VM (no guest network) takes URL
inputs from a real HTTP server, file:// roots and the node cache, and uploads outputs to moto's S3
server, the sshd fixture (sftp), an http PUT server and a file:// root. Every bad input gives one
`error` result, nothing half-uploaded is left, and the same VM goes on serving the next items.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.beanstalk import BeanstalkServer, destroy_domains
from tests.fixtures.servers import free_port
from tests.fixtures.stage import HttpServer, S3Server, SshServer
from vmtool.queue.beanstalk import Beanstalk, results_tube
from vmtool.queue.client import collect_results, put_items
from vmtool.queue.items import Item
from vmtool.queue.vms import VMFactory, resolve_image
from vmtool.queue.worker import Worker, WorkerOptions

pytestmark = [pytest.mark.vm, pytest.mark.queue, pytest.mark.libvirt, pytest.mark.cloud]

MiB = 1 << 20


@contextlib.contextmanager
def _denying_server() -> Iterator[int]:
    """An http server that refuses every PUT with 403 (a denied upload)."""

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_PUT(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_inputs_and_outputs_of_any_size_and_every_bad_input(
    beanstalkd: BeanstalkServer,
    agent_build: Path,
    libvirt_uri: str,
    http_server: HttpServer,
    moto_s3: S3Server,
    sshd: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VMTOOL_SSH_KEY", os.fspath(sshd.key))
    monkeypatch.setenv("VMTOOL_KNOWN_HOSTS", os.fspath(sshd.known_hosts))
    s3 = _s3(moto_s3.endpoint)
    bucket = f"q-data-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)

    big = os.urandom(8 * MiB)
    (http_server.root / "big.bin").write_bytes(big)
    big_sha = hashlib.sha256(big).hexdigest()
    inroot = tmp_path / "in"
    inroot.mkdir()
    (inroot / "local.txt").write_text("from a file:// root\n")
    outroot = tmp_path / "out"
    outroot.mkdir()
    dead = f"http://127.0.0.1:{free_port()}/nothing.bin"
    big_url = http_server.url("big.bin")
    double = "cat in.bin in.bin > $VMTOOL_OUTDIR/double.bin; sha256sum in.bin > $VMTOOL_OUTDIR/sum.txt"
    s3_out = f"s3://{bucket}/r/{{id}}/"

    with _denying_server() as deny_port:
        items = [
            # The seed's flow: download, process, upload (to S3); twice on one input: fetched once.
            Item(
                "big1",
                ["sh", "-c", double],
                {"in.bin": {"url": big_url, "sha256": big_sha}},
                output_url=s3_out,
            ),
            Item("big2", ["sh", "-c", double], {"in.bin": {"url": big_url}}, output_url=s3_out),
            Item("unreachable", ["true"], {"x": {"url": dead}}),
            Item("badsum", ["true"], {"x": {"url": big_url, "sha256": "0" * 64}}),
            Item(
                "nobucket",
                ["sh", "-c", "echo hi > $VMTOOL_OUTDIR/a.txt"],
                output_url="s3://no-such-bucket-x/{id}/",
            ),
            Item(
                "denied",
                ["sh", "-c", "echo hi > $VMTOOL_OUTDIR/a.txt"],
                output_url=f"http://127.0.0.1:{deny_port}/up/{{id}}/",
            ),
            Item(
                "symlink",
                ["sh", "-c", "echo ok > $VMTOOL_OUTDIR/a.txt; ln -s /etc/passwd $VMTOOL_OUTDIR/pw"],
                output_url=s3_out,
            ),
            Item(
                "subdir",
                ["sh", "-c", "mkdir -p $VMTOOL_OUTDIR/d; echo x > $VMTOOL_OUTDIR/d/f"],
                output_url=s3_out,
            ),
            Item(
                "dotdot",
                ["sh", "-c", 'echo y > "$VMTOOL_OUTDIR/..evil"'],
                output_url=s3_out,
            ),
            Item(
                "scratch",
                ["sh", "-c", "dd if=/dev/zero of=fill bs=1M count=64 2>&1; echo written"],
                scratch_bytes=8 * MiB,
            ),
            Item(
                "outlimit",
                ["sh", "-c", "dd if=/dev/zero of=$VMTOOL_OUTDIR/z bs=1M count=3 2>/dev/null"],
                output_url=s3_out,
                max_output_bytes=2 * MiB,
            ),
            Item("inlimit", ["true"], {"in.bin": {"url": big_url}}, max_input_bytes=MiB),
            Item("outside", ["true"], {"p": {"url": "file:///etc/passwd"}}),
            Item(
                "sftp-out",
                ["sh", "-c", "cat local.txt > $VMTOOL_OUTDIR/copy.txt"],
                {"local.txt": {"url": f"file://{inroot}/local.txt"}},
                output_url=f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/{{id}}/",
            ),
            Item(
                "file-out",
                ["sh", "-c", "echo file > $VMTOOL_OUTDIR/f.txt"],
                output_url=f"file://{outroot}/{{id}}/",
            ),
            Item(
                "http-out",
                ["sh", "-c", "echo put > $VMTOOL_OUTDIR/p.txt"],
                output_url=http_server.url("up/{id}/"),
            ),
            Item("inline", ["sh", "-c", "echo small > $VMTOOL_OUTDIR/s.txt"]),
        ]
        with Beanstalk(beanstalkd.address) as bs:
            put_items(bs, "data", items, ttr=30)
        prefix = f"vmtool-qd{os.getpid()}-"
        factory = VMFactory(
            resolve_image(agent_build),
            tmp_path / "work",
            memory_mib=512,
            uri=libvirt_uri,
            name_prefix=prefix,
        )
        opts = WorkerOptions(
            beanstalkd.address,
            "data",
            vms=1,
            idle_timeout=8,
            cache_dir=tmp_path / "cache",
            input_roots=(inroot,),
            output_roots=(outroot,),
            spool_dir=tmp_path / "spool",
            s3_endpoint_url=moto_s3.endpoint,
        )
        worker = Worker(opts, factory)
        try:
            report = worker.run()
        finally:
            destroy_domains(libvirt_uri, prefix)
    assert not report.errors, report.errors
    assert report.retried == 0 and report.buried == 0
    # One VM served them all: no bad input cost a VM.
    assert len(report.vms) == 1 and report.vms[0].items == len(items)

    with Beanstalk(beanstalkd.address, watch=results_tube("data")) as bs:
        got = collect_results(bs, want=len(items), timeout=10).results
    assert set(got) == {it.id for it in items}
    st = {k: v["status"] for k, v in got.items()}
    err = {k: v["error"] or "" for k, v in got.items()}

    # The seed's flow, twice; the shared input crossed the network once.
    for iid in ("big1", "big2"):
        r = got[iid]
        assert st[iid] == "ok", r
        out = r["outputs"]
        assert set(out) == {"double.bin", "sum.txt"}
        assert out["double.bin"]["size"] == 2 * len(big)
        assert out["double.bin"]["sha256"] == hashlib.sha256(big + big).hexdigest()
        assert out["double.bin"]["url"] == f"s3://{bucket}/r/{iid}/double.bin"
        body = s3.get_object(Bucket=bucket, Key=f"r/{iid}/double.bin")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == out["double.bin"]["sha256"]
        assert r["bytes_in"] == len(big) and r["bytes_out"] == 2 * len(big) + out["sum.txt"]["size"]
        assert r["transfer_s"] > 0
    assert http_server.gets["/big.bin"] == 1
    sums = s3.get_object(Bucket=bucket, Key="r/big1/sum.txt")["Body"].read().decode()
    assert sums.split()[0] == big_sha

    assert st["unreachable"] == "error" and "cannot reach" in err["unreachable"]
    assert st["badsum"] == "error" and "checksum mismatch" in err["badsum"]
    assert st["nobucket"] == "error" and "does not exist" in err["nobucket"]
    assert st["denied"] == "error" and "403" in err["denied"]
    assert st["symlink"] == "error" and "symbolic link" in err["symlink"]
    assert st["subdir"] == "error" and "directory" in err["subdir"]
    assert st["dotdot"] == "error" and "not a plain file name" in err["dotdot"]
    assert st["scratch"] == "error" and "scratch space" in err["scratch"]
    assert st["outlimit"] == "error" and "max_output_bytes" in err["outlimit"]
    assert st["inlimit"] == "error" and "input limit" in err["inlimit"]
    assert st["outside"] == "error" and "input root" in err["outside"]
    for iid in ("symlink", "subdir", "dotdot", "outlimit"):
        assert got[iid]["outputs"] == {}
        assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=f"r/{iid}/")

    # Only whole objects under their final keys: no temporary keys, no unfinished multipart uploads.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == sorted(f"r/{i}/{n}" for i in ("big1", "big2") for n in ("double.bin", "sum.txt"))
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")

    assert st["sftp-out"] == "ok", got["sftp-out"]
    assert (sshd.root / "sftp-out" / "copy.txt").read_text() == "from a file:// root\n"
    assert [p.name for p in (sshd.root / "sftp-out").iterdir()] == ["copy.txt"]
    assert st["file-out"] == "ok" and (outroot / "file-out" / "f.txt").read_text() == "file\n"
    assert got["file-out"]["outputs"]["f.txt"]["url"] == f"file://{outroot}/file-out/f.txt"
    assert st["http-out"] == "ok" and http_server.uploads["/up/http-out/p.txt"] == b"put\n"
    assert st["inline"] == "ok" and got["inline"]["outputs"] == {"s.txt": "c21hbGwK"}
    assert not list((tmp_path / "spool").iterdir())
