"""`vmtool queue work`: reserve items, run them in VMs over the relay, put results, delete items.

Delivery is at least once and never silent: the item stays reserved (and is touched) while its VM works;
the result is put on `<tube>.results` before the item is deleted; a VM that dies mid-item gets the item
re-put with its attempt count and the error; a worker that dies drops its connection, which makes
beanstalkd return the item at once. An item that has failed `max_attempts` times, or that is malformed,
is buried with a JSON note on `<tube>.buried-reasons` ({"job", "item_id", "reason", "attempts"}), shown
by `vmtool queue stats`. SIGTERM (terminate()) releases the current items and destroys the VMs.

Each VM slot is a thread with its own beanstalkd connection (greenstalk is not thread-safe). VMs come
from a `VMStarter` (vmtool.queue.vms wraps vmtool.launch); a VM keeps taking items until the queue has
been idle for `idle_timeout` seconds, `max_items` items were taken, or the worker is stopped.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmtool.errors import QueueError, VmtoolError
from vmtool.queue.beanstalk import Beanstalk, check_tube, reasons_tube, results_tube
from vmtool.queue.data import CachedInput, Inputs, Outputs, describe
from vmtool.queue.items import (
    Item,
    ItemError,
    ItemResult,
    job_script,
    output_prefix,
    parse_item,
)
from vmtool.queue.relay import PROTOCOL_VERSION, Relay, RelayError

log = logging.getLogger("vmtool.queue.worker")

DEFAULT_MAX_ATTEMPTS = 3
MAX_BOOT_FAILURES = 2
# tmpfs rounds every file up to a page; keep room for $VMTOOL_OUTDIR and the page rounding.
SCRATCH_SLACK = 64 << 10


class GuestVM(Protocol):
    """What the worker needs from a running VM."""

    name: str
    relay_socket: Path

    def alive(self) -> bool: ...

    def failure(self) -> str | None: ...

    def usage(self) -> dict[str, Any]: ...


VMStarter = Callable[[int], AbstractContextManager[GuestVM]]


@dataclass
class WorkerOptions:
    address: tuple[str, int]
    tube: str
    vms: int = 1
    max_items: int | None = None
    idle_timeout: float = 60.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    boot_timeout: float = 300.0
    # Seconds a re-put failed item waits before it is ready again (lets a sick VM be replaced first).
    retry_delay: int = 0
    # relay: the worker hands items to the guest; direct: the guest agent is a beanstalkd client itself.
    mode: str = "relay"
    # The data plane: the node cache for URL inputs (None: vmtool's default cache), the directories
    # file:// inputs may be read from and file:// outputs written to (none: file:// refused), where
    # outputs are spooled before their upload (None: a temporary directory), and an S3 endpoint.
    cache_dir: Path | None = None
    input_roots: tuple[Path, ...] = ()
    output_roots: tuple[Path, ...] = ()
    spool_dir: Path | None = None
    s3_endpoint_url: str | None = None


@dataclass
class VMRecord:
    slot: int
    name: str = ""
    items: int = 0
    failed_items: int = 0
    boot_s: float = 0.0
    busy_s: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    end_reason: str = ""
    boot_failures: int = 0
    usage: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "vm": self.name,
            "items": self.items,
            "failed_items": self.failed_items,
            "boot_s": round(self.boot_s, 2),
            "busy_s": round(self.busy_s, 2),
            "wall_s": round(max(0.0, self.ended - self.started), 2),
            "end": self.end_reason,
            **self.usage,
        }


@dataclass
class WorkerReport:
    tube: str
    done: int = 0
    retried: int = 0
    buried: int = 0
    released: int = 0
    terminated: bool = False
    vms: list[VMRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tube": self.tube,
            "done": self.done,
            "retried": self.retried,
            "buried": self.buried,
            "released": self.released,
            "terminated": self.terminated,
            "vms": [v.to_dict() for v in self.vms],
            "errors": self.errors,
        }


class _Terminated(BaseException):
    """SIGTERM while an item is in progress (a BaseException: no `except Exception` may swallow it)."""


class _VMFailed(Exception):
    pass


def inline_inputs(item: Item) -> dict[str, bytes]:
    """The item's inline inputs, decoded (they travel inside the job script)."""
    return {name: base64.b64decode(spec["data"]) for name, spec in item.inputs.items() if "data" in spec}


class Worker:
    def __init__(
        self,
        opts: WorkerOptions,
        start_vm: VMStarter,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        check_tube(opts.tube)
        if opts.mode not in ("relay", "direct"):
            raise QueueError(f"unknown worker mode {opts.mode!r}", hint="use relay or direct")
        if opts.vms < 1:
            raise QueueError("--vms must be at least 1")
        self.opts = opts
        self.start_vm = start_vm
        self.on_event = on_event
        self.report = WorkerReport(opts.tube)
        self._lock = threading.Lock()
        self._claimed = 0
        self._term = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self._inputs: Inputs | None = None

    def inputs(self) -> Inputs:
        """The node-cache input fetcher, opened on first use (items without URL inputs need none)."""
        with self._lock:
            if self._inputs is None:
                from vmtool.stage.cache import Cache

                self._inputs = Inputs(
                    Cache.open(self.opts.cache_dir),
                    input_roots=self.opts.input_roots,
                    endpoint_url=self.opts.s3_endpoint_url,
                )
            return self._inputs

    # -- control ---------------------------------------------------------------------------------------
    def terminate(self) -> None:
        """SIGTERM: release current items, destroy VMs, return."""
        self.report.terminated = True
        self._term.set()
        self._stop.set()

    def stop(self) -> None:
        """Finish current items, then stop."""
        self._stop.set()

    def _event(self, what: str, **data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(what, data)
            except Exception:  # a progress display must never break the worker
                log.debug("progress callback failed", exc_info=True)

    def _claim(self) -> bool:
        with self._lock:
            if self.opts.max_items is not None and self._claimed >= self.opts.max_items:
                return False
            self._claimed += 1
            return True

    def _unclaim(self) -> None:
        with self._lock:
            self._claimed -= 1

    # -- main ------------------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        # Fail early and clearly if the queue is unreachable.
        Beanstalk(self.opts.address).close()
        threads = []
        for slot in range(self.opts.vms):
            rec = VMRecord(slot)
            self.report.vms.append(rec)
            t = threading.Thread(target=self._slot, args=(rec,), name=f"vmtool-vm{slot}", daemon=True)
            threads.append(t)
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.terminate()
            for t in threads:
                t.join(60)
        return self.report

    def _slot(self, rec: VMRecord) -> None:
        bs: Beanstalk | None = None
        try:
            bs = Beanstalk(self.opts.address, watch=self.opts.tube)
            while not self._stop.is_set():
                again = self._one_vm(rec, bs)
                if not again:
                    break
        except Exception as e:
            # One slot's failure must not take the others down; it is reported, and a libvirt or
            # library error that is not a VmtoolError is shown with its type.
            msg = e.message if isinstance(e, VmtoolError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, VmtoolError):
                log.debug("vm slot %d failed", rec.slot, exc_info=True)
            with self._lock:
                self.report.errors.append(f"vm slot {rec.slot}: {msg}")
            log.warning("vm slot %d: %s", rec.slot, msg)
            self._event("error", slot=rec.slot, message=msg)
        finally:
            if bs is not None:
                try:
                    self._retrying(bs, "delete", bs.flush)
                except QueueError as e:
                    log.warning("%s", e.message)
                bs.close()

    def _one_vm(self, rec: VMRecord, bs: Beanstalk) -> bool:
        """Boot one VM and feed it items. True: start another VM (this one failed and work remains)."""
        t0 = time.monotonic()
        rec.started = rec.started or time.time()
        self._event("booting", slot=rec.slot)
        with self.start_vm(rec.slot) as vm:
            rec.name = vm.name
            relay = Relay.connect(vm.relay_socket, timeout=60, name=vm.name, alive=vm.alive)
            try:
                relay.wait_hello(timeout=self.opts.boot_timeout, alive=self._alive_or_term(vm))
                if self.opts.mode == "relay" and relay.agent_version != PROTOCOL_VERSION:
                    # Every VM of this image would fail the same way: stop the slot, say why.
                    raise QueueError(
                        f"the image's guest agent speaks protocol {relay.agent_version}, this worker"
                        f" {PROTOCOL_VERSION}",
                        hint="rebuild the image with this vmtool's 'vmtool build --agent relay'",
                    )
                rec.boot_s += time.monotonic() - t0
                self._event("ready", slot=rec.slot, vm=vm.name, boot_s=round(time.monotonic() - t0, 1))
                if self.opts.mode == "direct":
                    again = self._serve_direct(rec, vm, relay)
                else:
                    again = self._serve(rec, bs, vm, relay)
                if not again:
                    relay.stop()
                    self._wait_off(vm, 30)
            except _Terminated:
                rec.end_reason = "terminated"
                again = False
            except RelayError as e:
                # Died while booting: counts against no item; try a new VM unless stopping, but give
                # up on a slot whose VMs keep failing to boot (a broken image would loop forever).
                why = e.message + (f" ({vm.failure()})" if vm.failure() else "")
                log.warning("%s", why)
                self._event("vm-failed", slot=rec.slot, vm=vm.name, message=why)
                rec.end_reason = "failed"
                rec.boot_failures += 1
                if rec.boot_failures >= MAX_BOOT_FAILURES:
                    raise QueueError(
                        f"VMs failed to boot {rec.boot_failures} times in a row; last: {why}",
                        hint="check the image with 'vmtool launch --manifest ...' and its console log",
                    ) from None
                again = not self._stop.is_set()
            finally:
                relay.close()
                rec.usage = vm.usage()
                rec.ended = time.time()
        return again

    def _alive_or_term(self, vm: GuestVM) -> Callable[[], bool]:
        def alive() -> bool:
            if self._term.is_set():
                raise _Terminated()
            return vm.alive()

        return alive

    @staticmethod
    def _wait_off(vm: GuestVM, timeout: float) -> None:
        end = time.monotonic() + timeout
        while vm.alive() and time.monotonic() < end:
            time.sleep(0.2)

    def _serve(self, rec: VMRecord, bs: Beanstalk, vm: GuestVM, relay: Relay) -> bool:
        idle_since = time.monotonic()
        while True:
            if self._stop.is_set():
                rec.end_reason = "terminated" if self._term.is_set() else "stopped"
                return False
            if not vm.alive():
                log.warning("%s stopped while idle%s", vm.name, f" ({vm.failure()})" if vm.failure() else "")
                self._event("vm-failed", slot=rec.slot, vm=vm.name, message="stopped while idle")
                rec.end_reason = "died"
                # Counted like a failed boot: a VM that keeps dying without finishing an item must
                # not be restarted forever.
                rec.boot_failures += 1
                if rec.boot_failures >= MAX_BOOT_FAILURES:
                    raise QueueError(
                        f"VMs stopped {rec.boot_failures} times in a row without finishing an item",
                        hint="check the image and the VM's console log",
                    )
                return not self._stop.is_set()
            if time.monotonic() - idle_since > self.opts.idle_timeout:
                self._event("idle", slot=rec.slot, vm=vm.name)
                rec.end_reason = "idle"
                return False
            if not self._claim():
                rec.end_reason = "max-items"
                return False
            try:
                job = self._reserve(bs, 1)
            except BaseException:
                self._unclaim()
                raise
            if job is None:
                self._unclaim()
                relay.ping()
                continue
            t_item = time.monotonic()
            try:
                self._handle(rec, bs, vm, relay, job)
            except _VMFailed:
                rec.busy_s += time.monotonic() - t_item
                rec.end_reason = "failed"
                return not self._stop.is_set()
            rec.busy_s += time.monotonic() - t_item
            idle_since = time.monotonic()

    def _serve_direct(self, rec: VMRecord, vm: GuestVM, relay: Relay) -> bool:
        """Direct mode: tell the agent where the queue is, then only watch (and count) until it is done."""
        host, port = self.opts.address
        # User-mode networking: the guest reaches the host's loopback at 10.0.2.2.
        ghost = "10.0.2.2" if host in ("127.0.0.1", "localhost", "::1") else host
        relay.send(
            f"DIRECT {ghost} {port} {self.opts.tube} {max(1, int(self.opts.idle_timeout))} "
            f"{self.opts.max_attempts} {vm.name}\n"
        )
        while True:
            if self._stop.is_set():
                # Destroying the VM drops its beanstalkd connection: its item is ready again at once.
                rec.end_reason = "terminated" if self._term.is_set() else "stopped"
                return False
            try:
                line = relay.next_line(0.5)
            except RelayError:
                line = None
                if vm.alive():
                    raise
            if line is None:
                if not vm.alive():
                    # Died mid-item (its item is ready again, its connection gone); the agent buries an
                    # item after max_attempts lost reservations. Start another VM unless stopping.
                    rec.end_reason = "died"
                    rec.failed_items += 1
                    return not self._stop.is_set()
                continue
            parts = line.split()
            if parts[:1] == ["DID"] and len(parts) == 5:
                rec.items += 1
                with self._lock:
                    self.report.done += 1
                try:
                    took = float(parts[4])
                except ValueError:
                    took = 0.0
                self._event(
                    "result",
                    item=parts[1][:128],
                    status=parts[2][:16],
                    exit=parts[3][:8],
                    vm=vm.name,
                    duration_s=took,
                )
            elif parts[:1] == ["DONE"]:
                rec.end_reason = "idle"
                self._wait_off(vm, 30)
                return False

    def _reserve(self, bs: Beanstalk, timeout: int) -> Any:
        try:
            return bs.reserve(timeout=timeout)
        except QueueError as e:
            log.warning("%s; reconnecting", e.message)
            self._event("reconnecting", message=e.message)
            bs.reconnect(deadline=120)
            return None

    def _release_unfinished(self, bs: Beanstalk, job_id: int, item_id: str) -> None:
        """Give an item back to the queue untouched: the worker is stopping before it finished."""
        self._retrying(bs, "release", lambda: bs.release(job_id))
        with self._lock:
            self.report.released += 1
        self._event("released", item=item_id)

    def _retrying(self, bs: Beanstalk, what: str, fn: Callable[[], Any]) -> Any:
        """Run a queue call, reconnecting (beanstalkd restarted) and retrying for up to 2 minutes."""
        end = time.monotonic() + 120
        while True:
            try:
                return fn()
            except QueueError as e:
                if time.monotonic() > end:
                    raise
                log.warning("%s failed (%s); reconnecting", what, e.message)
                self._event("reconnecting", message=e.message)
                bs.reconnect(deadline=max(1.0, end - time.monotonic()))

    def _bury(self, bs: Beanstalk, job_id: int, item_id: str | None, reason: str, attempts: int) -> None:
        note = json.dumps(
            {
                "job": job_id,
                "item_id": item_id,
                "reason": reason[:1000],
                "attempts": attempts,
                "tube": self.opts.tube,
                "at": time.time(),
            }
        ).encode()
        self._retrying(bs, "note", lambda: bs.put(note, tube=reasons_tube(self.opts.tube), ttr=60))
        self._retrying(bs, "bury", lambda: bs.bury(job_id))
        with self._lock:
            self.report.buried += 1
        log.warning("buried job %d (item %s): %s", job_id, item_id, reason)
        self._event("buried", job=job_id, item=item_id, reason=reason)

    def _handle(self, rec: VMRecord, bs: Beanstalk, vm: GuestVM, relay: Relay, job: Any) -> None:
        try:
            item = parse_item(job.body)
        except ItemError as e:
            self._bury(bs, job.id, None, f"malformed item: {e.message}", 0)
            return
        st = self._retrying(bs, "stats-job", lambda: bs.job_counts(job.id)) or {}
        ttr = int(st.get("ttr", 60))
        # Reservations of this job that ended without a result or a polite release: its VM or worker
        # died or its TTR ran out. Plus failed attempts recorded in the body by earlier re-puts.
        lost = max(0, int(st.get("reserves", 1)) - 1 - int(st.get("releases", 0)))
        attempts_before = item.attempts + lost
        if attempts_before >= self.opts.max_attempts:
            why = item.last_error or "its VM or worker died or its TTR expired"
            self._bury(bs, job.id, item.id, f"failed {attempts_before} times; last: {why}", attempts_before)
            return
        attempt = attempts_before + 1
        self._event("item", slot=rec.slot, vm=vm.name, item=item.id, attempt=attempt)
        t0 = time.monotonic()
        touch_every = max(0.5, min(ttr / 3.0, 10.0))
        last_touch = time.monotonic()
        touch_lock = threading.Lock()

        def tick() -> None:
            nonlocal last_touch
            if self._term.is_set():
                raise _Terminated()
            with touch_lock:
                if time.monotonic() - last_touch < touch_every:
                    return
                last_touch = time.monotonic()
                try:
                    bs.touch(job.id)
                except QueueError as e:
                    # beanstalkd went away: the item comes back after its restart; carry on.
                    log.warning("touch failed: %s", e.message)
                    try:
                        bs.reconnect(deadline=1)
                    except QueueError:
                        pass

        def error(message: str, **kw: Any) -> None:
            res = ItemResult(
                item.id,
                "error",
                None,
                vm=vm.name,
                attempt=attempt,
                error=message[:2000],
                duration_s=time.monotonic() - t0,
                **kw,
            )
            self._finish(bs, job.id, res)
            rec.items += 1

        t_fetch = time.monotonic()
        try:
            inline = inline_inputs(item)
            cached = self._fetch_inputs(item, inline, tick)
        except ItemError as e:
            error(describe(e), transfer_s=time.monotonic() - t_fetch)
            return
        except _Terminated:
            self._release_unfinished(bs, job.id, item.id)
            raise
        fetch_s = time.monotonic() - t_fetch

        with self._lock:
            self._seq += 1
            seq = self._seq
        spool: Path | None = None
        try:
            if item.output_url:
                base = self.opts.spool_dir or Path(tempfile.gettempdir())
                base.mkdir(parents=True, exist_ok=True)
                spool = Path(tempfile.mkdtemp(prefix=f"vmtool-out-{item.id[:40]}.", dir=base))
            try:
                with self.inputs().held(cached) if cached else contextlib.nullcontext(cached):
                    g = relay.run(
                        seq,
                        job_script(item, inline),
                        timeout_s=item.timeout_s,
                        max_output=item.max_output,
                        scratch_bytes=item.scratch_bytes,
                        files=[(c.name, c.path, c.size) for c in cached],
                        spool=spool,
                        max_output_bytes=item.max_output_bytes,
                        tick=tick,
                    )
            except _Terminated:
                self._release_unfinished(bs, job.id, item.id)
                raise
            except ItemError as e:  # an input pruned from the cache between fetch and send
                error(describe(e))
                return
            except RelayError as e:
                rec.failed_items += 1
                err = e.message
                retry = dataclasses.replace(item, attempts=attempt, last_error=err[:500])
                self._retrying(
                    bs,
                    "re-put",
                    lambda: bs.put(
                        retry.encode(), tube=self.opts.tube, ttr=ttr, delay=self.opts.retry_delay
                    ),
                )
                self._retrying(bs, "delete", lambda: bs.delete(job.id))
                with self._lock:
                    self.report.retried += 1
                self._event("retry", slot=rec.slot, vm=vm.name, item=item.id, message=e.message)
                raise _VMFailed() from None
            res = self._guest_result(item, g, vm.name, attempt)
            if g.bytes_in or g.bytes_out:
                self._event(
                    "transfer",
                    item=item.id,
                    vm=vm.name,
                    bytes_in=g.bytes_in,
                    in_s=round(g.in_s, 4),
                    bytes_out=g.bytes_out,
                    out_s=round(g.out_s, 4),
                )
            res.bytes_in = g.bytes_in + sum(len(v) for v in inline.values())
            res.transfer_s = fetch_s + g.transfer_s
            if res.status != "error" and spool is not None:
                t_up = time.monotonic()
                self._upload(item, g.spooled, res, tick)
                res.transfer_s += time.monotonic() - t_up
        finally:
            if spool is not None:
                shutil.rmtree(spool, ignore_errors=True)
        res.duration_s = time.monotonic() - t0
        self._finish(bs, job.id, res)
        rec.items += 1
        rec.boot_failures = 0

    def _fetch_inputs(
        self, item: Item, inline: dict[str, bytes], tick: Callable[[], None]
    ) -> list[CachedInput]:
        """URL inputs into the node cache, checked against the item's input and scratch limits."""
        total = sum(len(v) for v in inline.values())
        cached: list[CachedInput] = []
        for name, spec in item.inputs.items():
            if "url" not in spec:
                continue
            ci = self.inputs().get(
                item.id, name, spec, max_bytes=max(0, item.max_input_bytes - total), tick=tick
            )
            cached.append(ci)
            total += ci.size
        if total > item.max_input_bytes:
            raise ItemError(
                f"item {item.id}: inputs are {total} bytes, more than limits.max_input_bytes {item.max_input_bytes}",
                hint="raise limits.max_input_bytes",
            )
        need = sum(-(-n // 4096) * 4096 for n in [*map(len, inline.values()), *(c.size for c in cached)])
        if need + SCRATCH_SLACK > item.scratch_bytes:
            raise ItemError(
                f"item {item.id}: inputs need {need} bytes of scratch space, the item has"
                f" {item.scratch_bytes} (limits.scratch_bytes)",
                hint="raise limits.scratch_bytes (and the VMs' memory: scratch is a tmpfs in the guest)",
            )
        return cached

    @staticmethod
    def _guest_result(item: Item, g: Any, vm_name: str, attempt: int) -> ItemResult:
        timed_out = g.exit in (124, 143) and g.guest_seconds >= item.timeout_s - 1
        status = "timeout" if timed_out else ("ok" if g.exit == 0 else "failed")
        err = None
        if g.scratch_used + SCRATCH_SLACK >= item.scratch_bytes:
            status = "error"
            err = (
                f"the item filled its scratch space ({g.scratch_used} of {item.scratch_bytes} bytes,"
                " limits.scratch_bytes)"
            )
        elif g.output_error:
            status, err = "error", g.output_error
        res = ItemResult(
            item.id,
            status,
            g.exit,
            stdout=g.stdout.decode("utf-8", "replace"),
            stderr=g.stderr.decode("utf-8", "replace"),
            outputs={k: base64.b64encode(v).decode() for k, v in g.outputs.items()},
            vm=vm_name,
            attempt=attempt,
            error=err,
            truncated=bool(g.truncated_outputs),
            bytes_out=g.bytes_out,
        )
        return res

    def _upload(
        self, item: Item, spooled: dict[str, tuple[Path, int, str]], res: ItemResult, tick: Callable[[], None]
    ) -> None:
        """Upload the spooled outputs; on any failure remove what went up and make `res` an error."""
        prefix = output_prefix(item)
        assert prefix is not None
        outs = Outputs(prefix, output_roots=self.opts.output_roots, endpoint_url=self.opts.s3_endpoint_url)
        stop = threading.Event()

        def keepalive() -> None:
            # Uploads block this slot's thread: touch the item from here meanwhile (the slot thread
            # does not use its queue connection until the upload returns).
            while not stop.wait(1.0):
                with contextlib.suppress(Exception):
                    tick()

        t = threading.Thread(target=keepalive, name="vmtool-upload-keepalive", daemon=True)
        t.start()
        try:
            for name, (path, size, sha) in spooled.items():
                up = outs.upload(name, path, size, sha)
                res.outputs[name] = {"url": up.url, "size": up.size, "sha256": up.sha256}
        except ItemError as e:
            outs.rollback()
            res.outputs = {}
            res.status = "error"
            res.error = describe(e)[:2000]
        finally:
            stop.set()
            t.join()

    def _finish(self, bs: Beanstalk, job_id: int, res: ItemResult) -> None:
        body = res.encode()
        self._retrying(bs, "put result", lambda: bs.put(body, tube=results_tube(self.opts.tube), ttr=60))
        # The result is stored: the delete goes out with the next reserve (or at the slot's end). If
        # the reservation was lost meanwhile (TTR, beanstalkd restart) the item may run again; its
        # duplicate result is dropped by readers (results are keyed by item id).
        bs.defer_delete(job_id)
        with self._lock:
            self.report.done += 1
        self._event(
            "result",
            item=res.id,
            status=res.status,
            exit=res.exit,
            vm=res.vm,
            duration_s=round(res.duration_s, 2),
        )


def iter_lines(report: WorkerReport) -> Iterator[str]:
    """The per-VM usage table for people."""
    yield f"{'vm':<28} {'items':>5} {'failed':>6} {'boot s':>7} {'busy s':>7} {'wall s':>7} {'cpu s':>7} {'peak MiB':>8}  end"
    for v in report.vms:
        d = v.to_dict()
        cpu = d.get("cpu_seconds")
        mem = d.get("peak_memory_bytes")
        yield (
            f"{(d['vm'] or '-'):<28} {d['items']:>5} {d['failed_items']:>6} {d['boot_s']:>7.1f} {d['busy_s']:>7.1f}"
            f" {d['wall_s']:>7.1f} {(f'{cpu:.1f}' if isinstance(cpu, (int, float)) else '-'):>7}"
            f" {(f'{mem / 1048576:.0f}' if isinstance(mem, (int, float)) and mem else '-'):>8}  {d['end']}"
        )
