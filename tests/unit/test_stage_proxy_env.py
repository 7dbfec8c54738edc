"""Which proxy a fetch uses: OSG_SQUID_LOCATION, then http_proxy/https_proxy, with no_proxy (no network)."""

from __future__ import annotations

import logging

import pytest

from vmtool.stage.fetch import route_for, squid_location
from vmtool.stage.sources import parse_source

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "proxy"),
    [
        (None, None),
        ("", None),
        ("UNAVAILABLE", None),
        ("unavailable", None),
        ("squid.site.edu:3128", "http://squid.site.edu:3128"),
        ("http://squid.site.edu:3128/", "http://squid.site.edu:3128"),
        ("10.0.0.5:3128", "http://10.0.0.5:3128"),
        ("[2001:db8::1]:3128", "http://[2001:db8::1]:3128"),
        (" squid:08080 ", "http://squid:8080"),
    ],
)
def test_squid_location_values(value: str | None, proxy: str | None) -> None:
    assert squid_location(value) == proxy


@pytest.mark.parametrize(
    "value", ["squid", "squid:", "squid:0", "squid:70000", "https://squid:3128", "a b:1"]
)
def test_squid_location_garbage_warns_and_is_ignored(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmtool"):
        assert squid_location(value) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"OSG_SQUID_LOCATION={value!r} is not host:port or UNAVAILABLE; ignoring it "
        "(images are fetched without the site squid)"
    ]


def _env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for k in (
        "OSG_SQUID_LOCATION",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_osg_squid_location_comes_first_for_http(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, OSG_SQUID_LOCATION="squid:3128", http_proxy="http://other:8080")
    r = route_for(parse_source("http://images.example.org/base.qcow2"))
    assert (r.proxy, r.setting, r.label) == (
        "http://squid:3128",
        "OSG_SQUID_LOCATION",
        "proxy http://squid:3128 (OSG_SQUID_LOCATION)",
    )


def test_https_uses_https_proxy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, OSG_SQUID_LOCATION="squid:3128")
    assert route_for(parse_source("https://images.example.org/b.qcow2")).proxy is None
    _env(monkeypatch, OSG_SQUID_LOCATION="squid:3128", https_proxy="http://tunnel:3129")
    r = route_for(parse_source("https://images.example.org/b.qcow2"))
    assert (r.proxy, r.setting) == ("http://tunnel:3129", "https_proxy")


def test_http_proxy_without_osg(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, OSG_SQUID_LOCATION="UNAVAILABLE", http_proxy="http://other:8080")
    r = route_for(parse_source("http://images.example.org/b.qcow2"))
    assert (r.proxy, r.setting) == ("http://other:8080", "http_proxy")


@pytest.mark.parametrize(
    ("no_proxy", "bypass"),
    [
        ("example.org", True),
        (".example.org", True),
        ("images.example.org:80", False),
        ("images.example.org", True),
        ("other.org, *", True),
        ("ample.org", False),
        ("", False),
    ],
)
def test_no_proxy(monkeypatch: pytest.MonkeyPatch, no_proxy: str, bypass: bool) -> None:
    _env(monkeypatch, OSG_SQUID_LOCATION="squid:3128", no_proxy=no_proxy)
    r = route_for(parse_source("http://images.example.org/b.qcow2"))
    assert (r.proxy is None) == bypass
