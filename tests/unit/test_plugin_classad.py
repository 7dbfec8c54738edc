"""The plugin's stdlib ClassAd reader/writer, checked against HTCondor's own parser (classad2)."""

from __future__ import annotations

import classad2
import pytest

from vmtool.condor.classad import (
    UNDEFINED,
    ClassAdError,
    Expr,
    parse_ads,
    parse_old,
    quote,
    unparse,
    unparse_old,
)
from vmtool.condor.plugin import Escape, confine, parse_nfs

pytestmark = pytest.mark.unit


def test_v6_escape() -> None:
    value = 'a"b\\c\nd'
    assert quote(value) == '"a\\"b\\\\c\\nd"'
    assert dict(classad2.parseOne(f"[ TransferError = {quote(value)} ]"))["TransferError"] == value


@pytest.mark.parametrize(
    "value", ["plain", "tab\there", "ctl\x01\x7f", "ünïcødé ✓", 'quote " and \\ end\\', ""]
)
def test_strings_round_trip_through_classad2(value: str) -> None:
    text = unparse({"S": value, "N": -3, "R": 2.5, "B": True, "L": [1, "x"], "A": {"x": 1}})
    ad = dict(classad2.parseOne(text))
    assert ad["S"] == value and ad["N"] == -3 and ad["R"] == 2.5 and ad["B"] is True
    (mine,) = parse_ads(text)
    assert mine["s"] == value and mine["l"] == [1, "x"] and mine["a"] == {"x": 1}


def test_starter_input_back_to_back_any_case_and_expressions() -> None:
    text = (
        '[ LocalFileName = "/s/a"; Url = "vmimage:///a" ][url="b";LOCALFILENAME="/s/b";'
        "PluginData = [ foo = strcat(\"x\", MY.y) ]; Odd = (1 + 2) * 3; 'quoted name' = undefined; ]"
        "\n  [ PluginData = [ a = 1 ] ]   "
    )
    ads = parse_ads(text)
    assert len(ads) == 3 == len(list(classad2.parseAds(text)))
    assert ads[0]["url"] == "vmimage:///a" and ads[0]["localfilename"] == "/s/a"
    assert ads[1]["url"] == "b" and ads[1]["localfilename"] == "/s/b"
    assert ads[1]["plugindata"] == {"foo": Expr('strcat("x", MY.y)')}
    assert ads[1]["odd"] == Expr("(1 + 2) * 3")
    assert ads[1]["quoted name"] is UNDEFINED
    assert "url" not in ads[2]


def test_list_form_and_comments() -> None:
    ads = parse_ads("/* c */ { [ A = 1 ], // x\n [ B = 0x10; C = 1e3; D = .5; E = false ] }")
    assert ads[0]["a"] == 1 and ads[1] == {"b": 16, "c": 1000.0, "d": 0.5, "e": False}


@pytest.mark.parametrize(
    "bad",
    [
        "This is not a ClassAd!!!",
        "[ A = ",
        "[ A = 1",
        "[ = 1 ]",
        "[ A = ) ]",
        '[ A = "unterminated ]',
        "[ A 1 ]",
        "[ A = 1 ] garbage",
    ],
)
def test_malformed(bad: str) -> None:
    with pytest.raises(ClassAdError):
        parse_ads(bad)


def test_old_format() -> None:
    text = 'MultipleFileSupport = true\n# comment\nPluginType = "FileTransfer"\nBar = "ab\\"cd\\ef"\nN = 2\n'
    (ad,) = parse_old(text)
    assert ad == {"multiplefilesupport": True, "plugintype": "FileTransfer", "bar": 'ab"cd\\ef', "n": 2}
    ref = dict(classad2.parseOne(text, classad2.ParserType.Old))
    assert ref["Bar"] == ad["bar"]
    out = unparse_old({"TransferError": 'bad\\path "x"\nline2', "TransferSuccess": False})
    assert "\\" not in out.replace('\\"', "") and out.count("\n") == 2
    assert dict(classad2.parseOne(out, classad2.ParserType.Old))["TransferSuccess"] is False


def test_confine() -> None:
    sb = "/var/lib/condor/execute/dir_1/scratch"
    assert confine(f"{sb}/base.qcow2", sb) == f"{sb}/base.qcow2"
    assert confine("base.qcow2", sb) == f"{sb}/base.qcow2"
    for bad in (
        f"{sb}/../x",
        "/etc/passwd",
        "../x",
        f"{sb}/",
        f"{sb}/sub/../../x",
        "/var/lib/condor/execute/dir_1/scratchX/y",
    ):
        with pytest.raises(Escape):
            confine(bad, sb)


def test_parse_nfs() -> None:
    assert parse_nfs("nfs:/nfs/img/base.img:vm.img") == ("/nfs/img/base.img", "vm.img")
    assert parse_nfs("nfs:///nfs/img/base.img:vm.img") == ("/nfs/img/base.img", "vm.img")
    assert parse_nfs("nfs:///nfs/img/base.img") == ("/nfs/img/base.img", None)
