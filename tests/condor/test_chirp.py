"""vmtool.condor.chirp against the real condor_chirp and starter of the pool (tests/fixtures/condor.py).

- Outside a job (no .chirp.config) condor_chirp refuses: `set_job_attrs` raises CommandError and a
  Chirper turns that into one `--chirp:` warning, no exception (this check needs condor_chirp, which
  only the pool's root has).
- In a vanilla job with `+WantIOProxy = true`, run by the starter as the job's user, a Chirper puts the
  five Network* attributes into the job's ad: condor_history shows exactly the figures it sent.

`--network nat --chirp` in a pool job is not run here: the pool's jobs are chrooted (the fixture's
condor_master runs under chroot), and the kernel refuses a user namespace to a chrooted process, which
the non-root `--network nat` needs (docs/launch.md, Networking).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.condor import USER, VENV, Pool

pytestmark = [pytest.mark.condor]

FIGURES = {"net_rx_lan_bytes": 1111, "net_rx_wan_bytes": 2222, "net_tx_lan_bytes": 333,
           "net_tx_wan_bytes": 444, "net_dropped_packets": 5}

OUTSIDE = """
from vmtool.condor import chirp
from vmtool.errors import CommandError
from vmtool.launch.vm import VMStats
exe = chirp.find_chirp()
assert exe is not None, "no condor_chirp in the pool's root"
try:
    chirp.set_job_attrs({"NetworkDroppedPackets": 1}, exe)
except CommandError as e:
    print("refused:", e.message)
else:
    raise SystemExit("condor_chirp accepted a call outside a job")
note = chirp.Chirper(chirp=exe).update(VMStats(net_dropped_packets=1), final=True)
print("note:", note)
"""

INSIDE = """#!/bin/sh
exec {venv}/bin/python - <<'PY'
import json
from vmtool.condor import chirp
from vmtool.launch.vm import VMStats
st = VMStats(**json.loads('{figures}'))
c = chirp.Chirper()
note = c.update(st, final=True)
print(json.dumps({{"chirp": c.chirp, "note": note, "sent": chirp.attributes(st)}}))
PY
"""

SUB = """universe = vanilla
executable = chirp-job.sh
+WantIOProxy = true
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
request_cpus = 1
request_memory = 128
output = chirp.out
error = chirp.err
log = chirp.log
queue
"""


def test_chirp_outside_a_job_fails_clearly(condor_pool: Pool) -> None:
    r = condor_pool.run([f"{VENV}/bin/python", "-c", OUTSIDE], user=USER, cwd=f"/home/{USER}", check=False)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "refused:" in out and "note: --chirp:" in out, out


def test_chirp_puts_network_attributes_into_the_job_ad(condor_pool: Pool, tmp_path: Path) -> None:
    script = tmp_path / "chirp-job.sh"
    script.write_text(INSIDE.format(venv=VENV, figures=json.dumps(FIGURES)))
    script.chmod(0o755)
    job = condor_pool.submit("chirp", SUB, {"chirp-job.sh": script})
    condor_pool.wait(job, timeout=300)
    out = (job.sandbox / "chirp.out").read_text(errors="replace") if (job.sandbox / "chirp.out").exists() else ""
    err = (job.sandbox / "chirp.err").read_text(errors="replace") if (job.sandbox / "chirp.err").exists() else ""
    assert job.ad.get("JobStatus") == 4 and job.ad.get("ExitCode") == 0, (job.ad, out, err)
    said = json.loads(out.strip().splitlines()[-1])
    assert said["chirp"] and said["note"] is None, said  # the starter's I/O proxy took every attribute
    r = condor_pool.run(["condor_history", "-json", "-limit", "1", str(job.cluster)], check=False)
    hist = json.loads(r.stdout.decode() or "[]")
    assert hist, r.stderr.decode()
    expected = {"NetworkIncomingInternal": 1111, "NetworkIncomingExternal": 2222, "NetworkOutgoingInternal": 333,
                "NetworkOutgoingExternal": 444, "NetworkDroppedPackets": 5}
    assert {k: hist[0].get(k) for k in expected} == expected, hist[0]
