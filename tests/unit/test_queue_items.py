"""Item/result schema, validation and size bounds; address and tube parsing."""

from __future__ import annotations

import base64
import json

import pytest

from vmtool.errors import QueueError
from vmtool.queue.beanstalk import check_tube, parse_server, reasons_tube, results_tube
from vmtool.queue.items import (
    MAX_ITEM_BYTES,
    MAX_RESULT_BYTES,
    Item,
    ItemError,
    ItemResult,
    item_from_dict,
    job_script,
    parse_item,
    parse_result,
    read_items_jsonl,
)
from vmtool.queue.tunnel import parse_via

pytestmark = pytest.mark.unit


def test_item_roundtrip() -> None:
    it = Item(
        "a1", ["sh", "-c", "echo 'hi there'"], {"x.txt": {"data": "aGk="}}, timeout_s=5, max_output=100
    )
    back = parse_item(it.encode())
    assert back == it
    assert json.loads(it.encode())["v"] == 1


@pytest.mark.parametrize(
    "body, words",
    [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"v":2,"id":"a","cmd":["x"]}', "version"),
        (b'{"v":1,"id":"a b","cmd":["x"]}', "item id"),
        (b'{"v":1,"id":"a","cmd":[]}', "cmd"),
        (b'{"v":1,"id":"a","cmd":["x", 3]}', "cmd argument"),
        (b'{"v":1,"id":"a","cmd":["x"],"bogus":1}', "unknown item field"),
        (b'{"v":1,"id":"a","cmd":["x"],"inputs":{"../etc/passwd":{"data":""}}}', "input name"),
        (b'{"v":1,"id":"a","cmd":["x"],"inputs":{"f":{"data":"@@@"}}}', "base64"),
        (b'{"v":1,"id":"a","cmd":["x"],"inputs":{"f":{"url":"ftp://h/x"}}}', "s3://"),
        (b'{"v":1,"id":"a","cmd":["x"],"limits":{"timeout_s":0}}', "timeout_s"),
        (b'{"v":1,"id":"a","cmd":["x"],"limits":{"timeout_s":true}}', "timeout_s"),
        (b'{"v":1,"id":"a","cmd":["x"],"limits":{"max_output":99999999}}', "max_output"),
    ],
)
def test_bad_items_rejected_with_reason(body: bytes, words: str) -> None:
    with pytest.raises(ItemError) as e:
        parse_item(body)
    assert words in e.value.message


def test_oversized_item_refused_before_queueing() -> None:
    big = base64.b64encode(b"x" * MAX_ITEM_BYTES).decode()
    it = Item("big", ["true"], {"f": {"data": big}})
    with pytest.raises(ItemError, match="more than"):
        it.encode()
    with pytest.raises(ItemError, match="more than"):
        parse_item(b" " * (MAX_ITEM_BYTES + 5000))


def test_jsonl_defaults_ids_and_reports_line_numbers() -> None:
    items = read_items_jsonl('# comment\n{"cmd":["true"]}\n\n{"id":"b","cmd":["false"]}\n')
    assert len(items) == 2 and items[1].id == "b" and len(items[0].id) == 16
    with pytest.raises(ItemError, match=r"items:2: .*cmd"):
        read_items_jsonl('{"cmd":["true"]}\n{"cmd":"true"}\n')
    with pytest.raises(ItemError, match="duplicate item id"):
        read_items_jsonl('{"id":"a","cmd":["true"]}\n{"id":"a","cmd":["true"]}\n')
    with pytest.raises(ItemError, match="no items"):
        read_items_jsonl("\n# nothing\n")
    with pytest.raises(ItemError, match="version"):
        item_from_dict({"v": 7, "cmd": ["x"]}, default_id=True)


def test_job_script_quotes_hostile_arguments() -> None:
    it = Item("q", ["echo", "$(reboot)", "a'b", "; rm -rf /"])
    s = job_script(it, {"in.bin": b"\x00\x01binary"})
    assert "exec echo '$(reboot)' 'a'\"'\"'b' '; rm -rf /'" in s
    assert base64.b64encode(b"\x00\x01binary").decode() in s
    with pytest.raises(ItemError):
        job_script(it, {"../x": b""})


def test_result_encode_trims_to_fit() -> None:
    r = ItemResult("a", "ok", 0, stdout="o" * 20000, stderr="e" * 20000, outputs={"f": "A" * 40000})
    body = r.encode()
    assert len(body) <= MAX_RESULT_BYTES
    d = parse_result(body)
    assert d["truncated"] is True and d["outputs"] == {} and d["stdout"] == "o" * 4096
    with pytest.raises(QueueError):
        parse_result(b'{"id": 3}')


def test_addresses_tubes_and_via() -> None:
    assert parse_server("10.0.0.1:1234") == ("10.0.0.1", 1234)
    assert parse_server("queue.example.org") == ("queue.example.org", 11300)
    assert parse_server("[::1]:5") == ("::1", 5)
    for bad in ("a:b", "host:70000", "h;rm:1"):
        with pytest.raises(QueueError):
            parse_server(bad)
    assert check_tube("jobs-1.a") == "jobs-1.a"
    assert results_tube("t") == "t.results" and reasons_tube("t") == "t.buried-reasons"
    for bad in ("-x", "a b", "", "x" * 300):
        with pytest.raises(QueueError):
            check_tube(bad)
    assert parse_via("ssh://alice@submit.example.org:2222") == ("alice", "submit.example.org", 2222)
    assert parse_via("ssh://bob@10.0.0.1") == ("bob", "10.0.0.1", 22)
    for bad in ("alice@host", "ssh://host", "ssh://a@h:0", "ssh://a@h;x"):
        with pytest.raises(QueueError):
            parse_via(bad)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"output_url": "s3://b/p/"}, "{id}"),
        ({"output_url": "s3://b/p/{id}"}, "end with '/'"),
        ({"output_url": "ftp://h/{id}/"}, "s3://"),
        ({"output_url": "s3://b/{id}/{x}/"}, "braces"),
        ({"inputs": {"f": {"url": "https://h/f", "sha256": "XYZ"}}}, "sha256"),
        ({"inputs": {"f": {"url": "https://h/f", "size": 3}}}, "only url and sha256"),
        ({"inputs": {"f": {"url": "https://h/f#frag"}}}, "fragment"),
        ({"inputs": {"f": {"data": "", "sha256": "0" * 64}}}, "no other field"),
        ({"limits": {"scratch_bytes": 10}}, "scratch_bytes"),
        ({"limits": {"max_input_bytes": -1}}, "max_input_bytes"),
    ],
)
def test_bad_data_fields_rejected(extra: dict, words: str) -> None:
    with pytest.raises(ItemError) as e:
        item_from_dict({"v": 1, "id": "a", "cmd": ["x"], **extra})
    assert words in e.value.message + (e.value.hint or "")


def test_data_fields_roundtrip_and_output_prefix() -> None:
    from vmtool.queue.items import output_prefix

    d = {
        "v": 1,
        "id": "a.1",
        "cmd": ["x"],
        "inputs": {"f": {"url": "sftp://u@h:2222/p/f", "sha256": "a" * 64}, "g": {"url": "file:///d/g"}},
        "output_url": "s3://b/run/{id}/",
        "limits": {"max_input_bytes": 5, "max_output_bytes": 6, "scratch_bytes": 1 << 21},
    }
    it = item_from_dict(d)
    assert parse_item(it.encode()) == it
    assert output_prefix(it) == "s3://b/run/a.1/"
    assert (it.max_input_bytes, it.max_output_bytes, it.scratch_bytes) == (5, 6, 1 << 21)
    r = ItemResult("a.1", "ok", 0, outputs={"o": {"url": "s3://b/run/a.1/o", "size": 1, "sha256": "b" * 64}})
    r.stdout = "x" * 70000
    back = json.loads(r.encode())
    # Trimmed to fit one job: uploaded outputs (only their URLs) stay.
    assert back["truncated"] is True and back["outputs"]["o"]["size"] == 1
