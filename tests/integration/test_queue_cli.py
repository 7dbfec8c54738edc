"""`vmtool queue put | results | stats` against a real beanstalkd (with binlog), in-process CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer, free_port
from vmtool.cli.main import main
from vmtool.queue.beanstalk import Beanstalk
from vmtool.queue.items import MAX_ITEM_BYTES, ItemResult

pytestmark = pytest.mark.queue


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> dict:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    return json.loads(out) if code == 0 else {"stderr": err}


def test_put_file_and_single_command(
    beanstalkd: BeanstalkServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "items.jsonl"
    f.write_text('{"id": "a", "cmd": ["echo", "a"]}\n{"cmd": ["true"], "limits": {"timeout_s": 5}}\n')
    d = _json(
        capsys, ["queue", "put", "--server", beanstalkd.server, "--tube", "t1", "--file", str(f), "--json"]
    )
    assert [x["id"] for x in d["items"]][0] == "a" and len(d["items"]) == 2
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"hello")
    d2 = _json(
        capsys,
        [
            "queue",
            "put",
            "--server",
            beanstalkd.server,
            "--tube",
            "t1",
            "--id",
            "c",
            "--input",
            f"in.txt={inp}",
            "--ttr",
            "30",
            "--json",
            "--",
            "cat",
            "in.txt",
        ],
    )
    assert d2["items"] == [{"id": "c", "job": d2["items"][0]["job"]}]
    with Beanstalk(beanstalkd.address, watch="t1") as bs:
        bodies = [json.loads(bs.reserve(0).body) for _ in range(3)]  # type: ignore[union-attr]
        assert bs.reserve(0) is None
        st = bs.stats_tube("t1")
    assert bodies[0]["cmd"] == ["echo", "a"] and bodies[1]["limits"]["timeout_s"] == 5
    assert bodies[2]["inputs"] == {"in.txt": {"data": "aGVsbG8="}}
    assert st is not None and st["current-jobs-reserved"] == 3


def test_put_refuses_bad_input_and_puts_nothing(
    beanstalkd: BeanstalkServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "items.jsonl"
    f.write_text('{"cmd": ["true"]}\n{"cmd": "not a list"}\n')
    r = _json(
        capsys, ["queue", "put", "--server", beanstalkd.server, "--tube", "t2", "--file", str(f)], code=1
    )
    assert "items.jsonl:2" in r["stderr"] and "Traceback" not in r["stderr"]
    big = tmp_path / "big"
    big.write_bytes(b"x" * MAX_ITEM_BYTES)
    r = _json(
        capsys,
        ["queue", "put", "--server", beanstalkd.server, "--tube", "t2", "--input", f"b={big}", "--", "true"],
        code=1,
    )
    assert "more than" in r["stderr"] and "hint: pass large inputs by URL" in r["stderr"]
    with Beanstalk(beanstalkd.address) as bs:
        assert bs.stats_tube("t2") is None  # nothing was put
    r = _json(
        capsys,
        ["queue", "put", "--server", f"127.0.0.1:{free_port()}", "--tube", "t2", "--", "true"],
        code=1,
    )
    assert "cannot connect to beanstalkd" in r["stderr"]
    r = _json(capsys, ["queue", "put", "--server", beanstalkd.server, "--tube", "a b", "--", "true"], code=1)
    assert "bad tube name" in r["stderr"]
    assert main(["queue", "put", "--server", beanstalkd.server, "--tube", "t2"]) == 1
    assert "either --file" in capsys.readouterr().err


def test_results_dedup_wait_and_keep(
    beanstalkd: BeanstalkServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with Beanstalk(beanstalkd.address) as bs:
        for rid, out in (("x", "first"), ("y", "y"), ("x", "retry duplicate")):
            bs.put(ItemResult(rid, "ok", 0, stdout=out, vm="vm0").encode(), tube="t3.results")
        bs.put(b"garbage", tube="t3.results")
    d = _json(
        capsys, ["queue", "results", "--server", beanstalkd.server, "--tube", "t3", "--keep", "--json"]
    )
    assert sorted(r["id"] for r in d["results"]) == ["x", "y"] and d["duplicates_dropped"] == 1
    assert d["invalid"] == 1  # buried, not crashed on
    d = _json(
        capsys, ["queue", "results", "--server", beanstalkd.server, "--tube", "t3", "--wait", "1", "--json"]
    )
    assert [(r["id"], r["stdout"]) for r in d["results"]] == [("x", "first")]
    # The duplicate of x was swept away with it; y is left for the next reader.
    assert d["duplicates_dropped"] == 1
    d = _json(
        capsys, ["queue", "results", "--server", beanstalkd.server, "--tube", "t3", "--wait", "1", "--json"]
    )
    assert [(r["id"], r["stdout"]) for r in d["results"]] == [("y", "y")]
    # Consumed now; waiting for more than there are ends with a clear message.
    rc = main(
        ["queue", "results", "--server", beanstalkd.server, "--tube", "t3", "--wait", "1", "--timeout", "1"]
    )
    assert rc == 1 and "only 0 of 1 results" in capsys.readouterr().err
    assert main(["queue", "results", "--server", beanstalkd.server, "--tube", "t3"]) == 0
    assert "no results" in capsys.readouterr().out


def test_stats_shows_buried_reasons(beanstalkd: BeanstalkServer, capsys: pytest.CaptureFixture[str]) -> None:
    with Beanstalk(beanstalkd.address, watch="t4") as bs:
        jid = bs.put(b'{"v":1,"id":"p","cmd":["x"]}', tube="t4")
        assert bs.reserve(0) is not None
        bs.put(
            json.dumps({"job": jid, "item_id": "p", "reason": "failed 3 times", "attempts": 3}).encode(),
            tube="t4.buried-reasons",
        )
        bs.bury(jid)
    d = _json(capsys, ["queue", "stats", "--server", beanstalkd.server, "--tube", "t4", "--json"])
    assert d["tubes"]["t4"]["buried"] == 1
    assert d["buried"][0]["reason"] == "failed 3 times" and d["buried"][0]["state"] == "buried"
    # Reading the notes does not consume them.
    rc = main(["queue", "stats", "--server", beanstalkd.server, "--tube", "t4"])
    out = capsys.readouterr().out
    assert rc == 0 and "buried job" in out and "failed 3 times" in out


def test_work_refuses_images_without_an_agent(
    beanstalkd: BeanstalkServer, default_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["queue", "work", "--server", beanstalkd.server, "--tube", "w"]
    assert main([*base, "--image", str(tmp_path / "nope.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--image", str(default_build / "manifest.json")]) == 1
    err = capsys.readouterr().err
    assert "has no vmtool guest agent" in err and "--agent relay" in err
    assert (
        main([*base, "--image", str(default_build / "rootfs.img")]) == 1
    )  # an overlay: manifest found beside
    assert "has no vmtool guest agent" in capsys.readouterr().err
    assert main(["queue"]) == 2
    assert "put" in capsys.readouterr().err


def test_put_url_inputs_and_output_url_and_stats_totals(
    beanstalkd: BeanstalkServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = "ab" * 32
    argv = ["queue", "put", "--server", beanstalkd.server, "--tube", "dp", "--id", "x1", "--json"]
    argv += ["--input-url", f"in.bin=https://example.invalid/in.bin#sha256={sha}"]
    argv += [
        "--output-url",
        "s3://bucket/out/{id}/",
        "--max-input-bytes",
        "1000",
        "--scratch-bytes",
        "2000000",
    ]
    _json(capsys, [*argv, "--", "wc", "-c", "in.bin"])
    with Beanstalk(beanstalkd.address, watch="dp") as bs:
        job = bs.reserve(timeout=1)
        assert job is not None
        item = json.loads(job.body)
        bs.release(job.id)
        for i, (bin_, bout, s) in enumerate([(10, 20, 0.5), (1, 2, 0.25)]):
            r = ItemResult(f"r{i}", "ok", 0, bytes_in=bin_, bytes_out=bout, transfer_s=s)
            bs.put(r.encode(), tube="dp.results")
    assert item["inputs"] == {"in.bin": {"url": "https://example.invalid/in.bin", "sha256": sha}}
    assert item["output_url"] == "s3://bucket/out/{id}/"
    assert item["limits"]["max_input_bytes"] == 1000 and item["limits"]["scratch_bytes"] == 2000000
    st = _json(capsys, ["queue", "stats", "--server", beanstalkd.server, "--tube", "dp", "--json"])
    assert st["transfer"] == {"results": 2, "bytes_in": 11, "bytes_out": 22, "transfer_s": 0.75}
    # The results are still there for `queue results`.
    assert st["tubes"]["dp.results"]["ready"] == 2
    # An output_url without {id} is refused before anything is put.
    bad = _json(capsys, [*argv, "--output-url", "s3://bucket/out/", "--", "true"], code=1)
    assert "{id}" in bad["stderr"]
