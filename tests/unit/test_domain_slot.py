"""The slot's size from HTCondor's ClassAd files (our small parser, checked against classad2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmtool.domain.slot import discover_slot, host_memory_mib, parse_classad
from vmtool.errors import DomainError

pytestmark = pytest.mark.unit

MACHINE_AD = """\
Arch = "X86_64"
Cpus = 2
Memory = 2048
Disk = 10485760
Name = "slot1_1@wn01.example.org"
SlotType = "Dynamic"
HasVM = false
LoadAvg = 0.25
TotalSlotCpus = 2
Start = (TARGET.RequestMemory <= 4096) && true
Quote = "a \\"quoted\\" word"
"""

JOB_AD = """\
ClusterId = 42
ProcId = 7
RequestCpus = 1
RequestMemory = 1536
Owner = "alice"
Iwd = "/home/alice/run"
"""


def test_parser_matches_classad2() -> None:
    classad2 = pytest.importorskip("classad2", reason="the htcondor wheel (test dependency) is not installed")
    ours = parse_classad(MACHINE_AD)
    theirs = classad2.parseOne(MACHINE_AD, classad2.ParserType.Old)
    for key in ("Arch", "Cpus", "Memory", "Disk", "Name", "SlotType", "HasVM", "LoadAvg", "TotalSlotCpus", "Quote"):
        assert ours.get_ci(key) == theirs.eval(key), key
    assert isinstance(ours.get_ci("start"), str)  # an expression stays text


def test_discover_from_machine_ad(tmp_path: Path) -> None:
    (tmp_path / ".machine.ad").write_text(MACHINE_AD)
    (tmp_path / ".job.ad").write_text(JOB_AD)
    env = {"_CONDOR_MACHINE_AD": str(tmp_path / ".machine.ad"), "_CONDOR_JOB_AD": str(tmp_path / ".job.ad")}
    slot = discover_slot(env)
    assert (slot.cpus, slot.memory_mib, slot.source, slot.job_id) == (2, 2048, "machine-ad", "42.7")
    assert slot.name == "slot1_1@wn01.example.org"


def test_discover_from_job_ad_then_host(tmp_path: Path) -> None:
    (tmp_path / ".job.ad").write_text(JOB_AD)
    slot = discover_slot({"_CONDOR_JOB_AD": str(tmp_path / ".job.ad")})
    assert (slot.cpus, slot.memory_mib, slot.source) == (1, 1536, "job-ad")
    host = discover_slot({})
    assert host.source == "host" and host.memory_mib == host_memory_mib() and host.cpus >= 1


def test_bad_ads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ad"
    bad.write_text("Cpus = -3\nMemory = 100\n")
    with pytest.raises(DomainError, match="Cpus = -3 is not a positive number"):
        discover_slot({}, machine_ad=bad)
    with pytest.raises(DomainError, match="does not exist"):
        discover_slot({}, machine_ad=tmp_path / "missing.ad")
