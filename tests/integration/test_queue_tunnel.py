"""`--via ssh://...`: a real sshd on a loopback port (own host key) forwarding to a real beanstalkd;
the beanstalkd layer's deferred deletes and reconnect across a beanstalkd restart."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer, free_port
from vmtool.cli.main import main
from vmtool.errors import QueueError
from vmtool.queue.beanstalk import Beanstalk
from vmtool.queue.items import Result
from vmtool.run import DEVNULL, PIPE, Popen, run, spawn

pytestmark = pytest.mark.queue


class SSHD:
    def __init__(self, d: Path) -> None:
        d.mkdir(mode=0o700)
        self.dir = d
        self.port = free_port()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.fspath(d / "host_key")])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.fspath(d / "user_key")])
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        host_pub = (d / "host_key.pub").read_text().split()
        self.known_hosts = d / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\n"
            f"PidFile {d / 'sshd.pid'}\nStrictModes no\nLogLevel ERROR\n"
        )
        self.proc: Popen[bytes] = spawn(
            ["/usr/sbin/sshd", "-D", "-e", "-f", os.fspath(d / "sshd_config")], stdout=DEVNULL, stderr=PIPE
        )
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"sshd did not start: {err}") from None
                time.sleep(0.05)

    @property
    def via(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHD]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("needs root and openssh-server to run a private sshd")
    s = SSHD(tmp_path / "sshd")
    try:
        yield s
    finally:
        s.stop()


def test_put_results_stats_through_an_ssh_tunnel(
    beanstalkd: BeanstalkServer, sshd: SSHD, capsys: pytest.CaptureFixture[str]
) -> None:
    via = [
        "--via",
        sshd.via,
        "--known-hosts",
        os.fspath(sshd.known_hosts),
        "--identity",
        os.fspath(sshd.dir / "user_key"),
        "--server",
        beanstalkd.server,
    ]
    assert main(["queue", "put", *via, "--tube", "tun", "--id", "t1", "--json", "--", "echo", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["id"] == "t1"
    with Beanstalk(beanstalkd.address, watch="tun") as bs:
        job = bs.reserve(0)
        assert job is not None and json.loads(job.body)["cmd"] == ["echo", "hi"]
        bs.release(job.id)
        bs.put(Result("t1", "ok", 0, stdout="hi\n").encode(), tube="tun.results")
    assert main(["queue", "stats", *via, "--tube", "tun", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tubes"]["tun"]["ready"] == 1
    assert main(["queue", "results", *via, "--tube", "tun", "--wait", "1", "--timeout", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["stdout"] == "hi\n"


def test_tunnel_refuses_unknown_and_changed_host_keys(
    beanstalkd: BeanstalkServer, sshd: SSHD, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "queue",
        "put",
        "--via",
        sshd.via,
        "--identity",
        os.fspath(sshd.dir / "user_key"),
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
