"""SOURCE strings and vmimage URL encodings (docs/stage.md), parsed without touching the network."""

from __future__ import annotations

import pytest

from vmtool.errors import StageError
from vmtool.stage.cache import parse_age, parse_size
from vmtool.stage.sources import parse_source
from vmtool.stage.stage import check_name, default_name

pytestmark = pytest.mark.unit

SHA = "a" * 64


@pytest.mark.parametrize(
    ("text", "kind", "path", "extra"),
    [
        ("vmimage:///nfs/images/base.qcow2", "file", "/nfs/images/base.qcow2", {}),
        ("file+vmimage:///nfs/b.img", "file", "/nfs/b.img", {}),
        (
            "vmimage://store.example.org/images/base.qcow2",
            "http",
            "/images/base.qcow2",
            {"url": "https://store.example.org/images/base.qcow2", "host": "store.example.org"},
        ),
        (
            "http+vmimage://127.0.0.1:8080/i/b.qcow2",
            "http",
            "/i/b.qcow2",
            {"url": "http://127.0.0.1:8080/i/b.qcow2", "port": 8080},
        ),
        ("HTTPS+VMIMAGE://h/x.qcow2", "http", "/x.qcow2", {"url": "https://h/x.qcow2"}),
        ("s3+vmimage://bucket/dir/base.qcow2", "s3", "dir/base.qcow2", {"host": "bucket"}),
        ("sftp+vmimage://me@h:2222/srv/b.qcow2", "sftp", "/srv/b.qcow2", {"user": "me", "port": 2222}),
        (
            f"vmimage://h/b.qcow2#sha256={SHA}&format=qcow2",
            "http",
            "/b.qcow2",
            {"sha256": SHA, "format": "qcow2", "url": "https://h/b.qcow2"},
        ),
        ("s3://b/k.img", "s3", "k.img", {}),
        ("file:///x/y.img", "file", "/x/y.img", {}),
        ("https://h/p%20q.img", "http", "/p q.img", {}),
    ],
)
def test_parse(text: str, kind: str, path: str, extra: dict[str, object]) -> None:
    src = parse_source(text)
    assert src.kind == kind and src.path == path and src.text == text
    for k, v in extra.items():
        assert getattr(src, k) == v


@pytest.mark.parametrize(
    ("text", "kwargs", "needle"),
    [
        ("gopher://h/x", {}, "unknown source scheme"),
        ("ftp+vmimage://h/x", {}, "unknown source scheme"),
        ("vmimage://h/x#colour=red", {}, "unknown URL fragment"),
        ("vmimage://h/x#format=vmdk", {}, "unknown format"),
        ("s3://bucket", {}, "bucket and a key"),
        ("sftp://u:pw@h/x", {}, "passwords"),
        ("file://otherhost/x", {}, "remote host"),
        ("http:///nohost", {}, "no host"),
        ("x.img", {"sha256": "123"}, "not a sha256"),
        (f"vmimage:///x#sha256={SHA}", {"sha256": "b" * 64}, "contradicts"),
        ("vmimage:///x#format=raw", {"fmt": "qcow2"}, "contradicts"),
        ("", {}, "empty"),
    ],
)
def test_bad(text: str, kwargs: dict[str, str], needle: str) -> None:
    with pytest.raises(StageError) as ei:
        parse_source(text, **kwargs)  # type: ignore[arg-type]
    assert needle in ei.value.message


def test_names_sizes_ages() -> None:
    assert default_name(parse_source("/x/debian-12.img")) == "debian-12.qcow2"
    assert default_name(parse_source("/x/base.qcow2")) == "base.qcow2"
    assert default_name(parse_source("s3://b/k/image")) == "image.qcow2"
    for bad in ("", ".", "..", "a/b", "x\ny"):
        with pytest.raises(StageError):
            check_name(bad)
    assert parse_size("20G") == 20 << 30 and parse_size("1.5MiB") == 3 << 19 and parse_size("123") == 123
    assert parse_age("90s") == 90 and parse_age("2h") == 7200 and parse_age("7d") == 7 * 86400
