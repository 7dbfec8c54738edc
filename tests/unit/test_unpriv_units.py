"""Pieces of the unprivileged launch that need no VM: kernel command-line quoting, no DAC label for a
connection without a dac driver, delegated-subtree detection and the slot's limit on fake cgroup trees,
and the safety rules for shared directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lxml import etree

from tests.unit.test_cgroups_fake import V2_SELF, _fake_proc, _v1_tree, _v2_tree
from tests.unit.test_domain_render import SLOT, TCG, fake_boot, qcow2
from vmtool.domain.policy import RenderOptions, kernel_cmdline, kernel_words, render
from vmtool.errors import DomainError
from vmtool.fsutil import unsafe_dir
from vmtool.launch import cgroups
from vmtool.launch.host import HostFacts

pytestmark = pytest.mark.unit


def test_append_words_are_split_and_quoted_the_kernel_way() -> None:
    assert kernel_words(["a=1 b"]) == ["a=1", "b"]
    assert kernel_cmdline(kernel_words(["a=1 b", 'msg="x y"', "c='p q'"])) == 'a=1 b msg="x y" c="p q"'
    assert kernel_cmdline(["lone word"]) == '"lone word"'
    with pytest.raises(DomainError, match="close the quote|No closing quotation"):
        kernel_words(['a="open'])
    with pytest.raises(DomainError, match="double quote"):
        kernel_cmdline(['a=x"y'])


def test_render_append_and_seclabel_follow_the_connection(tmp_path: Path) -> None:
    opts = RenderOptions(sandbox=tmp_path, disks=(qcow2(tmp_path / "root.qcow2"),), boot=fake_boot(tmp_path),
                         extra_cmdline=("a=1 b", 'msg="x y"'), seed=1)
    system = etree.fromstring(render(None, opts, TCG, SLOT).xml.encode())
    cmdline = system.findtext("os/cmdline") or ""
    assert cmdline.endswith(' a=1 b msg="x y"') and "'" not in cmdline
    assert system.find("seclabel[@model='dac']") is not None
    session = HostFacts(TCG.emulator, TCG.arch, TCG.machines, ("qemu",), False, "test", secmodels=("none",))
    xml = etree.fromstring(render(None, opts, session, SLOT).xml.encode())
    assert xml.find("seclabel") is None and xml.findtext("os/cmdline") == cmdline


def test_delegated_slot_only_for_a_scope_in_an_owned_slice(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    slice_ = root / "system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn.slice"
    (slice_ / "cgroup.procs").write_text("")
    assert cgroups.delegated_slot(root=root, proc=_fake_proc(tmp_path / "a", V2_SELF)) == slice_
    # HTCondor < 24.8.1: the job sits in the leaf itself, nothing to delegate
    leaf = "0::/system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn\n"
    assert cgroups.delegated_slot(root=root, proc=_fake_proc(tmp_path / "b", leaf)) is None
    (slice_ / "cgroup.controllers").write_text("cpu pids\n")
    assert cgroups.delegated_slot(root=root, proc=_fake_proc(tmp_path / "c", V2_SELF)) is None
    v1 = _v1_tree(tmp_path / "v1")
    assert cgroups.delegated_slot(root=v1, proc=_fake_proc(tmp_path / "d", "4:memory:/htcondor/slot1\n")) is None
    assert cgroups.choose_mode(use_cgroup=False, parent=None) == ("none", None)


def test_slot_memory_limit_and_oom_count(tmp_path: Path) -> None:
    v1 = _v1_tree(tmp_path / "v1")
    mem = v1 / "memory/htcondor/slot1"
    (mem / "memory.stat").write_text("cache 0\nhierarchical_memory_limit 1610612736\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    proc = _fake_proc(tmp_path / "p1", "4:memory:/htcondor/slot1\n3:cpu:/htcondor/slot1\n")
    sc = cgroups.SlotCgroup(cgroups.detect(root=v1, proc=proc))
    assert sc.memory_limit() == 1536 << 20 and sc.oom_kills() == 2
    (mem / "memory.stat").write_text(f"hierarchical_memory_limit {1 << 62}\n")
    assert sc.memory_limit() is None
    (tmp_path / "v2").mkdir()
    v2 = _v2_tree(tmp_path / "v2")
    slice_ = v2 / "system.slice/condor.service/htcondor/_var_lib_condor_execute_slot1_1@wn.slice"
    (slice_ / "memory.max").write_text(f"{2 << 30}\n")
    (slice_.parent / "memory.max").write_text(f"{1 << 30}\n")
    (slice_ / "memory.events").write_text("oom 0\noom_kill 0\n")
    sc2 = cgroups.SlotCgroup(cgroups.detect(root=v2, proc=_fake_proc(tmp_path / "p2", V2_SELF)))
    assert sc2.memory_limit() == 1 << 30 and sc2.oom_kills() == 0


def test_unsafe_dir(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    for mode, safe in ((0o700, True), (0o755, True), (0o2775, False), (0o777, False), (0o1777, True),
                       (0o3775, True)):
        d.chmod(mode)
        assert (unsafe_dir(d, writer_ok=True) is None) is safe, oct(mode)
    d.chmod(0o1777)
    assert "sticky" in (unsafe_dir(d) or "")  # without writer_ok others may not even add files
    os.symlink(d, tmp_path / "l")
    assert unsafe_dir(tmp_path / "l") == "it is a symbolic link"
