"""`vmtool queue work` as an ordinary job user in a root-owned cgroup v1 slot, with no --uri and no cgroup
flags: one item runs in a VM of the agent build and its result comes back; nothing is left after."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.fixtures.beanstalk import BeanstalkServer
from tests.fixtures.slotuser import JobSlot, shared_dir
from vmtool.queue.beanstalk import Beanstalk, results_tube
from vmtool.queue.client import collect_results, put_items
from vmtool.queue.items import Item
from vmtool.run import run

pytestmark = [pytest.mark.vm, pytest.mark.queue, pytest.mark.libvirt]


def test_queue_work_as_job_user(beanstalkd: BeanstalkServer, agent_build: Path, job_slot: JobSlot) -> None:
    build = shared_dir("vmtool-unpriv-agent-")
    try:
        shutil.copytree(agent_build.parent, build / "out")
        run(["chmod", "-R", "a+rX", str(build)])
        tube = "unpriv"
        with Beanstalk(beanstalkd.address) as bs:
            put_items(bs, tube, [Item("one", ["sh", "-c", "id -u; echo from-the-guest"])], ttr=60)
        proc = job_slot.vmtool("queue", "work", "--server", beanstalkd.server, "--tube", tube, "--image",
                               str(build / "out" / "manifest.json"), "--vms", "1", "--memory", "512",
                               "--max-items", "1", "--idle-timeout", "1", "--workdir", str(job_slot.sandbox),
                               "--json")
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["done"] == 1
        with Beanstalk(beanstalkd.address, watch=results_tube(tube)) as rb:
            got = collect_results(rb, want=1, timeout=5)
        r = got.results["one"]
        assert r["status"] == "ok" and "from-the-guest" in r["stdout"], r
        end = time.monotonic() + 10
        while job_slot.procs_of_user() and time.monotonic() < end:
            time.sleep(0.2)
        assert job_slot.procs_of_user() == []
        assert [p for p in Path("/tmp").glob("vmtool-session-*") if p.lstat().st_uid == job_slot.user.pw_uid] == []
        assert list(job_slot.sandbox.iterdir()) == []
    finally:
        run(["rm", "-rf", str(build)])
