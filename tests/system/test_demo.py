"""`vmtool demo` end to end (what `make demo` runs): real disk, build, beanstalkd, stage, 2 VMs, cleanup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import domains
from vmtool.cli.main import main

pytestmark = [pytest.mark.vm, pytest.mark.queue, pytest.mark.libvirt]


def test_demo_runs_eleven_items_on_two_vms_and_cleans_up(
    libvirt_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["demo", "--json", "--workdir", os.fspath(tmp_path), "--uri", libvirt_uri])
    out, err = capsys.readouterr()
    assert rc == 0, err
    d = json.loads(out)
    assert d["disk"] == {"table": "gpt", "boot": "partition", "root_kind": "lvm", "fstype": "ext4"}
    assert d["build"]["agent"]["mode"] == "relay"
    res = {r["id"]: r for r in d["results"]}
    assert len(res) == 11 and d["missing"] == []
    # The seed's flow: downloaded from the loopback HTTP server, gzipped in the VM, uploaded to moto's S3.
    seed = res["11-seed-flow"]
    assert seed["status"] == "ok", seed
    assert d["seed_flow"]["store"] == "s3 (moto)"
    gz = seed["outputs"]["survey.dat.gz"]
    assert gz["url"] == "s3://vmtool-demo/results/11-seed-flow/survey.dat.gz"
    assert 0 < gz["size"] < d["seed_flow"]["input_bytes"] and len(gz["sha256"]) == 64
    assert seed["bytes_in"] == d["seed_flow"]["input_bytes"] and seed["bytes_out"] == gz["size"]
    assert f"{gz['size']} survey.dat.gz" in seed["stdout"]
    assert res["01-hello"]["stdout"].startswith("hello from vmtool-guest")
    assert res["04-wordcount"]["stdout"].split()[0] == "26"
    assert res["07-output-file"]["outputs"] == {"seq.txt": "MQoyCjMKNAo1Cg=="}
    assert res["08-stderr"]["status"] == "failed" and res["08-stderr"]["exit"] == 3
    # Relay mode: the guest has no network interface besides loopback.
    assert res["09-no-network"]["stdout"].split() == ["lo"]
    vms = d["worker"]["vms"]
    assert len(vms) == 2 and sum(v["items"] for v in vms) == 11
    assert all(v["cpu_seconds"] and v["cpu_seconds"] > 0 for v in vms if v["items"])
    assert all(v["peak_memory_bytes"] and v["peak_memory_bytes"] > 0 for v in vms if v["items"])
    # Everything it started or wrote is gone.
    assert list(tmp_path.iterdir()) == []
    assert domains(libvirt_uri, "vmtool-demo-") == []
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"vmtool-demo-{os.getpid()}*"))
