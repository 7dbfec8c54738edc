"""Work items and results: versioned JSON, validated and size-bounded (queue messages are hostile).

An item (v1):

    {"v": 1, "id": "a1b2", "cmd": ["sh", "-c", "wc -l data.txt"],
     "inputs": {"data.txt": {"data": "<base64>"} | {"url": "https://...", "sha256": "<hex>"}},
     "output_url": "s3://bucket/prefix/{id}/",
     "limits": {"timeout_s": 600, "max_output": 8192, "max_input_bytes": N, "max_output_bytes": N,
                "scratch_bytes": N}}

A result (v1), put on the tube `<tube>.results` and keyed by the item id:

    {"v": 1, "id": "a1b2", "status": "ok|failed|timeout|error", "exit": 0, "stdout": "...", "stderr": "...",
     "outputs": {"name": "<base64>" | {"url", "size", "sha256"}}, "vm": "vmtool-...", "duration_s": 1.2,
     "attempt": 1, "error": null, "bytes_in": N, "bytes_out": N, "transfer_s": S}

Inputs are written into the item's working directory in the guest; files the command leaves in
$VMTOOL_OUTDIR come back as outputs: inline (base64, at most max_output bytes each) or, with
`output_url`, uploaded whole to `<output_url><name>` ({id} replaced by the item id). URL inputs and
uploaded outputs have no size limit of their own (the item's limits apply); the item and its result
each fit one beanstalkd job (default max 65535 bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
import uuid
from dataclasses import dataclass, field
from typing import Any

from vmtool.errors import QueueError

ITEM_VERSION = 1
RESULT_VERSION = 1

# beanstalkd's default -z is 65535 bytes; keep a margin for the worker's attempt bookkeeping.
MAX_ITEM_BYTES = 60_000
MAX_RESULT_BYTES = 60_000
BOOKKEEPING_BYTES = 1024
MAX_ARGS = 256
MAX_ARG_BYTES = 4096
MAX_INPUTS = 32
DEFAULT_MAX_INPUT_BYTES = 1 << 30
DEFAULT_MAX_OUTPUT_BYTES = 1 << 30
DEFAULT_SCRATCH_BYTES = 512 << 20
MAX_DATA_BYTES = 1 << 40
MIN_SCRATCH_BYTES = 1 << 20
INPUT_SCHEMES = ("http", "https", "s3", "sftp", "file")
OUTPUT_SCHEMES = ("http", "https", "s3", "sftp", "file")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
URL_RE = re.compile(r"([a-z0-9]+)://[^\s#]{1,2000}")
DEFAULT_TIMEOUT_S = 600
MAX_TIMEOUT_S = 7 * 24 * 3600
DEFAULT_MAX_OUTPUT = 8192
MAX_MAX_OUTPUT = 16384

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
ITEM_KEYS = {"v", "id", "cmd", "inputs", "output_url", "limits", "attempts", "last_error"}
LIMIT_KEYS = {"timeout_s", "max_output", "max_input_bytes", "max_output_bytes", "scratch_bytes"}


class ItemError(QueueError):
    """An item that can never run: malformed, oversized or of an unknown version."""


@dataclass
class Item:
    id: str
    cmd: list[str]
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    timeout_s: int = DEFAULT_TIMEOUT_S
    max_output: int = DEFAULT_MAX_OUTPUT
    # Bookkeeping the worker adds when it re-puts an item after a failed attempt.
    attempts: int = 0
    last_error: str | None = None
    output_url: str | None = None
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": ITEM_VERSION, "id": self.id, "cmd": self.cmd}
        if self.inputs:
            d["inputs"] = self.inputs
        if self.output_url:
            d["output_url"] = self.output_url
        d["limits"] = {"timeout_s": self.timeout_s, "max_output": self.max_output}
        for k, default in (
            ("max_input_bytes", DEFAULT_MAX_INPUT_BYTES),
            ("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES),
            ("scratch_bytes", DEFAULT_SCRATCH_BYTES),
        ):
            if getattr(self, k) != default:
                d["limits"][k] = getattr(self, k)
        if self.attempts:
            d["attempts"] = self.attempts
        if self.last_error:
            d["last_error"] = self.last_error
        return d

    def encode(self) -> bytes:
        body = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True).encode()
        # A re-put carries the attempt count and last error on top of what `put` accepted.
        limit = MAX_ITEM_BYTES + (BOOKKEEPING_BYTES if self.attempts or self.last_error else 0)
        if len(body) > limit:
            raise ItemError(
                f"item {self.id} is {len(body)} bytes, more than the {MAX_ITEM_BYTES} a queue item may hold",
                hint="pass large inputs by URL instead of inline",
            )
        return body


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ItemError(f"{what} must be an integer from {lo} to {hi}, not {v!r}"[:300])
    return v


def item_from_dict(d: Any, *, default_id: bool = False) -> Item:
    """Validate a decoded item. default_id: assign a fresh id (and version) when missing (for `put`)."""
    if not isinstance(d, dict):
        raise ItemError("an item must be a JSON object")
    unknown = set(d) - ITEM_KEYS
    if unknown:
        raise ItemError(f"unknown item field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
    v = d.get("v", ITEM_VERSION if default_id else None)
    if v != ITEM_VERSION:
        raise ItemError(
            f"unsupported item version {v!r}"[:100], hint=f"this vmtool reads version {ITEM_VERSION}"
        )
    iid = d.get("id", new_id() if default_id else None)
    if not isinstance(iid, str) or not ID_RE.fullmatch(iid):
        raise ItemError(f"item id must match {ID_RE.pattern}, not {iid!r}"[:200])
    cmd = d.get("cmd")
    if not isinstance(cmd, list) or not cmd or len(cmd) > MAX_ARGS:
        raise ItemError(f"item {iid}: cmd must be a non-empty list of at most {MAX_ARGS} strings")
    for a in cmd:
        if not isinstance(a, str) or "\0" in a or len(a.encode()) > MAX_ARG_BYTES:
            raise ItemError(
                f"item {iid}: each cmd argument must be a string without NUL, <= {MAX_ARG_BYTES} bytes"
            )
    inputs = d.get("inputs", {})
    if not isinstance(inputs, dict) or len(inputs) > MAX_INPUTS:
        raise ItemError(f"item {iid}: inputs must be an object with at most {MAX_INPUTS} entries")
    clean_inputs: dict[str, dict[str, str]] = {}
    for name, spec in inputs.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ItemError(f"item {iid}: input name {name!r} must match {NAME_RE.pattern}"[:200])
        if not isinstance(spec, dict) or not 1 <= len(spec) <= 2:
            raise ItemError(f'item {iid}: input {name} must be {{"data": base64}} or {{"url": ...}}')
        if "data" in spec:
            if len(spec) != 1:
                raise ItemError(f'item {iid}: input {name}: {{"data": ...}} takes no other field')
            data = spec["data"]
            if not isinstance(data, str):
                raise ItemError(f"item {iid}: input {name}: data must be a base64 string")
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ItemError(f"item {iid}: input {name}: data is not valid base64") from None
            clean_inputs[name] = {"data": data}
        elif "url" in spec:
            clean_inputs[name] = _url_input(iid, name, spec)
        else:
            raise ItemError(f'item {iid}: input {name} must be {{"data": base64}} or {{"url": ...}}')
    output_url = d.get("output_url")
    if output_url is not None:
        output_url = check_output_url(output_url, f"item {iid}: output_url")
    limits = d.get("limits", {})
    if not isinstance(limits, dict) or set(limits) - LIMIT_KEYS:
        raise ItemError(f"item {iid}: limits may hold only {', '.join(sorted(LIMIT_KEYS))}")
    data_limits = {
        k: _int(limits.get(k, default), f"item {iid}: limits.{k}", lo, MAX_DATA_BYTES)
        for k, default, lo in (
            ("max_input_bytes", DEFAULT_MAX_INPUT_BYTES, 0),
            ("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES, 0),
            ("scratch_bytes", DEFAULT_SCRATCH_BYTES, MIN_SCRATCH_BYTES),
        )
    }
    timeout_s = _int(
        limits.get("timeout_s", DEFAULT_TIMEOUT_S), f"item {iid}: limits.timeout_s", 1, MAX_TIMEOUT_S
    )
    max_output = _int(
        limits.get("max_output", DEFAULT_MAX_OUTPUT), f"item {iid}: limits.max_output", 1, MAX_MAX_OUTPUT
    )
    attempts = _int(d.get("attempts", 0), f"item {iid}: attempts", 0, 1000)
    last_error = d.get("last_error")
    if last_error is not None and not isinstance(last_error, str):
        raise ItemError(f"item {iid}: last_error must be a string")
    return Item(
        iid,
        list(cmd),
        clean_inputs,
        timeout_s,
        max_output,
        attempts,
        last_error[:500] if last_error else None,
        output_url,
        **data_limits,
    )


def _url_input(iid: str, name: str, spec: dict[str, Any]) -> dict[str, str]:
    if set(spec) - {"url", "sha256"}:
        raise ItemError(f"item {iid}: input {name}: a URL input holds only url and sha256")
    url = spec["url"]
    m = URL_RE.fullmatch(url) if isinstance(url, str) else None
    if m is None or m.group(1) not in INPUT_SCHEMES:
        raise ItemError(
            f"item {iid}: input {name}: url must be an http(s)://, s3://, sftp:// or file:// URL"
            " without spaces or a #fragment"
        )
    out = {"url": url}
    if "sha256" in spec:
        sha = spec["sha256"]
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise ItemError(f"item {iid}: input {name}: sha256 must be 64 lower-case hex digits")
        out["sha256"] = sha
    return out


def check_output_url(url: Any, what: str) -> str:
    """An output_url: a URL of a known scheme naming a directory ("/" at the end), with {id} in it."""
    m = URL_RE.fullmatch(url) if isinstance(url, str) else None
    if m is None or m.group(1) not in OUTPUT_SCHEMES:
        raise ItemError(
            f"{what} must be an s3://, sftp://, http(s):// or file:// URL without spaces or a #fragment",
            hint="e.g. s3://bucket/results/{id}/",
        )
    assert isinstance(url, str)
    if not url.endswith("/") or "{id}" not in url:
        raise ItemError(
            f"{what} must contain {{id}} and end with '/', not {url[:200]!r}",
            hint="e.g. s3://bucket/results/{id}/ (each item writes under its own id)",
        )
    if "?" in url or url.replace("{id}", "").count("{") or url.replace("{id}", "").count("}"):
        raise ItemError(f"{what}: no query string or braces other than {{id}} are allowed")
    return url


def output_prefix(item: Item) -> str | None:
    """The item's output_url with {id} filled in (ids hold no '/', so it stays under its own prefix)."""
    return item.output_url.replace("{id}", item.id) if item.output_url else None


def parse_item(body: bytes) -> Item:
    """Decode and validate one queue job body."""
    if len(body) > MAX_ITEM_BYTES + BOOKKEEPING_BYTES:
        raise ItemError(f"item is {len(body)} bytes, more than {MAX_ITEM_BYTES}")
    try:
        d = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ItemError(f"item is not valid UTF-8 JSON: {str(e)[:120]}") from None
    return item_from_dict(d)


def read_items_jsonl(text: str, *, source: str = "items") -> list[Item]:
    """Items from JSON lines (blank lines and lines starting with # skipped); id and v may be omitted."""
    items: list[Item] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ItemError(f"{source}:{n}: not valid JSON: {e}") from None
        try:
            item = item_from_dict(d, default_id=True)
            item.encode()
        except ItemError as e:
            raise ItemError(f"{source}:{n}: {e.message}", hint=e.hint) from None
        if item.id in seen:
            raise ItemError(f"{source}:{n}: duplicate item id {item.id}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ItemError(f"{source}: no items found", hint='one JSON object per line, e.g. {"cmd": ["true"]}')
    return items


def job_script(item: Item, inputs: dict[str, bytes]) -> str:
    """The sh script the guest agent runs for an item: write the inputs, then exec the command."""
    lines = ["# vmtool item " + item.id, f"# vmtool-timeout: {item.timeout_s}", "set -e"]
    for name, data in inputs.items():
        if not NAME_RE.fullmatch(name):
            raise ItemError(f"item {item.id}: bad input name {name!r}")
        lines.append(f"base64 -d > {shlex.quote(name)} <<'VMTOOL_EOF'")
        b64 = base64.b64encode(data).decode()
        lines.extend(b64[i : i + 76] for i in range(0, len(b64), 76))
        lines.append("VMTOOL_EOF")
    lines.append("set +e")
    lines.append("exec " + " ".join(shlex.quote(a) for a in item.cmd))
    return "\n".join(lines) + "\n"


@dataclass
class ItemResult:
    id: str
    status: str  # ok (exit 0), failed (exit != 0), timeout, error (never ran: bad item or input)
    exit: int | None
    stdout: str = ""
    stderr: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    vm: str | None = None
    duration_s: float = 0.0
    attempt: int = 1
    error: str | None = None
    truncated: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    transfer_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RESULT_VERSION,
            "id": self.id,
            "status": self.status,
            "exit": self.exit,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "outputs": self.outputs,
            "vm": self.vm,
            "duration_s": round(self.duration_s, 3),
            "attempt": self.attempt,
            "error": self.error,
            "truncated": self.truncated,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "transfer_s": round(self.transfer_s, 3),
        }

    def encode(self) -> bytes:
        """JSON bytes, trimmed (outputs first, then tails) to fit MAX_RESULT_BYTES."""
        d = self.to_dict()
        body = json.dumps(d, separators=(",", ":")).encode()
        if len(body) <= MAX_RESULT_BYTES:
            return body
        d["truncated"] = True
        # Uploaded outputs are kept (their bytes are safe elsewhere); inline ones are dropped.
        d["outputs"] = {k: v for k, v in d["outputs"].items() if isinstance(v, dict)}
        d["stdout"] = d["stdout"][-4096:]
        d["stderr"] = d["stderr"][-4096:]
        return json.dumps(d, separators=(",", ":")).encode()


def parse_result(body: bytes) -> dict[str, Any]:
    """A result body as a dict (checked for the fields readers rely on)."""
    try:
        d = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise QueueError(f"result is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(d, dict) or d.get("v") != RESULT_VERSION or not isinstance(d.get("id"), str):
        raise QueueError("result is not a vmtool v1 result")
    return d
