"""Producer and reader side: put items, collect results (deduplicated by item id), tube statistics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from vmtool.errors import QueueError
from vmtool.queue.beanstalk import Beanstalk, check_tube, reasons_tube, results_tube
from vmtool.queue.items import Item, parse_result

DEFAULT_TTR = 60
DEFAULT_PRIORITY = 1024


def put_items(
    bs: Beanstalk, tube: str, items: list[Item], *, ttr: int = DEFAULT_TTR, priority: int = DEFAULT_PRIORITY
) -> list[dict[str, Any]]:
    """Put validated items on `tube`; returns [{"id", "job"}] in order."""
    check_tube(tube)
    if not 1 <= ttr <= 86400:
        raise QueueError(f"--ttr must be from 1 to 86400 seconds, not {ttr}")
    bodies = [it.encode() for it in items]  # all validated before the first put
    out = []
    for it, body in zip(items, bodies, strict=True):
        out.append({"id": it.id, "job": bs.put(body, tube=tube, priority=priority, ttr=ttr)})
    return out


@dataclass
class Collected:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    invalid: int = 0


def collect_results(
    bs: Beanstalk,
    *,
    want: int = 0,
    timeout: float = 0.0,
    keep: bool = False,
    collected: Collected | None = None,
) -> Collected:
    """Reserve results from the watched results tube until `want` distinct ids (or `timeout` s) arrive.

    Each result is deleted once read (kept with keep=True: released at the end); a second result
    for an id already seen is a duplicate from a retry and is dropped. want=0: take what is ready now.
    """
    c = collected or Collected()
    held: list[int] = []
    end = time.monotonic() + timeout
    enough = False
    try:
        while True:
            if want and len(c.results) >= want:
                # Enough: still sweep what is ready now, to drop duplicates of what we return.
                enough = True
            left = end - time.monotonic()
            if want and left <= 0:
                enough = True
            job = bs.reserve(timeout=0 if enough or not want else max(0, min(5, int(left) + 1)))
            if job is None:
                if enough or not want:
                    break
                continue
            try:
                d = parse_result(job.body)
            except QueueError:
                c.invalid += 1
                bs.bury(job.id)
                continue
            if d["id"] in c.results:
                c.duplicates += 1
                if keep:
                    held.append(job.id)
                else:
                    bs.delete(job.id)
                continue
            if enough:
                held.append(job.id)  # a new result beyond `want`: leave it for the next reader
                continue
            c.results[d["id"]] = d
            if keep:
                held.append(job.id)
            else:
                bs.delete(job.id)
    finally:
        for jid in held:
            bs.release(jid)
    return c


def buried_reasons(bs: Beanstalk, tube: str) -> list[dict[str, Any]]:
    """The notes the worker left on `<tube>.buried-reasons` (read without consuming them)."""
    notes: list[dict[str, Any]] = []
    held: list[int] = []
    watcher = Beanstalk(bs.address, watch=reasons_tube(tube), io_timeout=bs.io_timeout)
    try:
        while True:
            job = watcher.reserve(timeout=0)
            if job is None:
                break
            held.append(job.id)
            try:
                d = json.loads(job.body)
                if isinstance(d, dict):
                    notes.append(d)
            except ValueError:
                notes.append({"reason": "(unreadable note)"})
    finally:
        for jid in held:
            watcher.release(jid)
        watcher.close()
    return notes


def tube_stats(bs: Beanstalk, tube: str) -> dict[str, Any]:
    keys = (
        "current-jobs-ready",
        "current-jobs-reserved",
        "current-jobs-delayed",
        "current-jobs-buried",
        "total-jobs",
        "current-watching",
    )
    out: dict[str, Any] = {}
    for t in (tube, results_tube(tube), reasons_tube(tube)):
        st = bs.stats_tube(t) or {}
        out[t] = {k.replace("current-jobs-", "").replace("current-", ""): int(st.get(k, 0)) for k in keys}
    buried = []
    for note in buried_reasons(bs, tube):
        job = note.get("job")
        js = bs.stats_job(job) if isinstance(job, int) else None
        note = dict(note)
        if js is not None:
            note["state"] = js.get("state")
            note["stats"] = {k: js.get(k) for k in ("reserves", "timeouts", "releases", "buries", "kicks")}
        buried.append(note)
    return {"tube": tube, "tubes": out, "buried": buried, "transfer": transfer_totals(bs, tube)}


def transfer_totals(bs: Beanstalk, tube: str) -> dict[str, Any]:
    """Bytes in, bytes out and transfer seconds summed over the results waiting on `<tube>.results`.

    Results are reserved only for the read and released at once (none is consumed); results already
    collected by `vmtool queue results` carry their own numbers.
    """
    tot: dict[str, Any] = {"results": 0, "bytes_in": 0, "bytes_out": 0, "transfer_s": 0.0}
    held: list[int] = []
    watcher = Beanstalk(bs.address, watch=results_tube(tube), io_timeout=bs.io_timeout)
    try:
        while True:
            job = watcher.reserve(timeout=0)
            if job is None:
                break
            held.append(job.id)
            try:
                d = parse_result(job.body)
            except QueueError:
                continue
            tot["results"] += 1
            for k in ("bytes_in", "bytes_out"):
                v = d.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    tot[k] += v
            v = d.get("transfer_s")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tot["transfer_s"] += float(v)
    finally:
        for jid in held:
            watcher.release(jid)
        watcher.close()
    tot["transfer_s"] = round(tot["transfer_s"], 3)
    return tot
