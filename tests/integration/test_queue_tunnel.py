"""`--via ssh://...`: a real sshd on a loopback port (own host key) forwarding to a real beanstalkd;
the beanstalkd layer's deferred deletes and reconnect across a beanstalkd restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer
from tests.fixtures.stage import SshServer
from vmtool.cli.main import main
from vmtool.errors import QueueError
from vmtool.queue.beanstalk import Beanstalk
from vmtool.queue.items import ItemResult
from vmtool.run import run

pytestmark = pytest.mark.queue


def via_url(sshd: SshServer) -> str:
    return f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"


def test_put_results_stats_through_an_ssh_tunnel(
    beanstalkd: BeanstalkServer, sshd: SshServer, capsys: pytest.CaptureFixture[str]
) -> None:
    via = [
        "--via",
        via_url(sshd),
        "--known-hosts",
        os.fspath(sshd.known_hosts),
        "--identity",
        os.fspath(sshd.key),
        "--server",
        beanstalkd.server,
    ]
    assert main(["queue", "put", *via, "--tube", "tun", "--id", "t1", "--json", "--", "echo", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["id"] == "t1"
    with Beanstalk(beanstalkd.address, watch="tun") as bs:
        job = bs.reserve(0)
        assert job is not None and json.loads(job.body)["cmd"] == ["echo", "hi"]
        bs.release(job.id)
        bs.put(ItemResult("t1", "ok", 0, stdout="hi\n").encode(), tube="tun.results")
    assert main(["queue", "stats", *via, "--tube", "tun", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tubes"]["tun"]["ready"] == 1
    assert main(["queue", "results", *via, "--tube", "tun", "--wait", "1", "--timeout", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["stdout"] == "hi\n"


def test_tunnel_refuses_unknown_and_changed_host_keys(
    beanstalkd: BeanstalkServer, sshd: SshServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "queue",
        "put",
        "--via",
        via_url(sshd),
        "--identity",
        os.fspath(sshd.key),
        "--server",
        beanstalkd.server,
        "--tube",
        "tun",
        "--known-hosts",
    ]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    assert main([*base, os.fspath(empty), "--", "true"]) == 1
    err = capsys.readouterr().err
    assert "not found in known_hosts" in err and "ssh-keyscan" in err
    other = tmp_path / "other"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.fspath(other)])
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(
        f"[127.0.0.1]:{sshd.port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n"
    )
    assert main([*base, os.fspath(wrong), "--", "true"]) == 1
    assert "does not match known_hosts" in capsys.readouterr().err
    with Beanstalk(beanstalkd.address) as bs:
        assert bs.stats_tube("tun") is None  # nothing got through


def test_deferred_delete_and_reconnect_after_restart(beanstalkd: BeanstalkServer) -> None:
    with Beanstalk(beanstalkd.address, watch="w") as bs:
        ids = [bs.put(f"job{i}".encode(), tube="w", ttr=30) for i in range(3)]
        j1 = bs.reserve(0)
        assert j1 is not None and j1.id == ids[0]
        bs.defer_delete(j1.id)
        j2 = bs.reserve(0)  # the delete of j1 goes out with this reserve
        assert j2 is not None and j2.id == ids[1] and bs.stats_job(ids[0]) is None
        assert bs.job_counts(j2.id) == {"reserves": 1, "releases": 0, "timeouts": 0, "ttr": 30}
        bs.release(j2.id)
        j2 = bs.reserve(0)
        assert j2 is not None and bs.job_counts(j2.id) == {
            "reserves": 2,
            "releases": 1,
            "timeouts": 0,
            "ttr": 30,
        }
        bs.defer_delete(j2.id)
        beanstalkd.restart()  # kill -9; the binlog brings j2 (was reserved) and j3 back as ready
        with pytest.raises(QueueError, match="lost connection"):
            bs.reserve(0)
        bs.reconnect(deadline=10)
        bs.flush()  # the deferred delete survives the reconnect
        assert bs.stats_job(ids[1]) is None
        j3 = bs.reserve(0)
        assert j3 is not None and j3.body == b"job2"
        assert bs.reserve(0) is None
