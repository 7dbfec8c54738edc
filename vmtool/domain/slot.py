"""The slot a job runs in: CPUs and memory from HTCondor's ClassAd files, else the host.

HTCondor writes the machine and job ads in the old long ClassAd format (`Cpus = 2`, `Memory = 2048`,
one attribute per line) and names them in `_CONDOR_MACHINE_AD` / `_CONDOR_JOB_AD`. A small parser for
that format lives here: literals (integers, reals, strings, booleans, undefined) are decoded, anything
else (expressions) is kept as its source text. Attribute names are case-insensitive, as in ClassAds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vmtool.errors import DomainError

MAX_AD_BYTES = 4 << 20

ClassAdValue = int | float | str | bool | None

_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "r": "\r", "'": "'"}


class ClassAd(dict[str, ClassAdValue]):
    """Attributes keyed by lower-cased name; values decoded where they are literals."""

    def get_ci(self, name: str) -> ClassAdValue:
        return self.get(name.lower())


def _string(text: str) -> str | None:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return None
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
            continue
        if c == '"':
            return None  # two strings or an expression like "a" + "b"
        out.append(c)
        i += 1
    return "".join(out)


def parse_value(text: str) -> ClassAdValue:
    low = text.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("undefined", "error"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text):
        return float(text)
    s = _string(text)
    return s if s is not None else text


def parse_classad(text: str) -> ClassAd:
    """Parse an old-syntax ClassAd (one `Name = value` per line); comments and blank lines are skipped."""
    ad = ClassAd()
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "//")):
            continue
        m = _LINE.match(line)
        if not m:
            continue  # "[" / "]" of new syntax or a separator line: not an attribute
        value = m.group(2).rstrip(";").rstrip()
        ad[m.group(1).lower()] = parse_value(value)
    return ad


def read_classad(path: str | os.PathLike[str]) -> ClassAd:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_AD_BYTES:
            raise DomainError(f"ClassAd file {p} is too large", hint="give the .machine.ad HTCondor wrote")
        return parse_classad(p.read_text(errors="replace"))
    except OSError as e:
        raise DomainError(f"cannot read ClassAd file {p}: {e.strerror}",
                          hint="check _CONDOR_MACHINE_AD / --machine-ad") from None


@dataclass(frozen=True)
class Slot:
    """What the job may use. source: machine-ad, job-ad or host."""

    cpus: int
    memory_mib: int
    source: str
    name: str = ""
    job_id: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "source": self.source, "name": self.name,
                "job_id": self.job_id}


def host_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise DomainError("cannot read MemTotal from /proc/meminfo")


def _pos_int(ad: ClassAd, name: str, path: str | os.PathLike[str]) -> int | None:
    v = ad.get_ci(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise DomainError(f"{path}: {name} = {v!r} is not a positive number",
                          hint="the slot's ClassAd is damaged; check _CONDOR_MACHINE_AD")
    return int(v)


def _job_id(job: ClassAd | None) -> str:
    if not job:
        return ""
    c, p = job.get_ci("ClusterId"), job.get_ci("ProcId")
    return f"{c}.{p}" if isinstance(c, int) and isinstance(p, int) else ""


def discover_slot(
    environ: Mapping[str, str] | None = None,
    *,
    machine_ad: str | os.PathLike[str] | None = None,
) -> Slot:
    """The slot from the machine ad (Cpus, Memory), else the job ad (RequestCpus, RequestMemory), else the host."""
    env = os.environ if environ is None else environ
    job_path = env.get("_CONDOR_JOB_AD")
    job = read_classad(job_path) if job_path and Path(job_path).is_file() else None
    mpath = machine_ad or env.get("_CONDOR_MACHINE_AD")
    if machine_ad is not None and not Path(machine_ad).is_file():
        raise DomainError(f"machine ad {machine_ad} does not exist", hint="give the file HTCondor wrote (.machine.ad)")
    if mpath and Path(mpath).is_file():
        ad = read_classad(mpath)
        cpus, mem = _pos_int(ad, "Cpus", mpath), _pos_int(ad, "Memory", mpath)
        if cpus and mem:
            name = ad.get_ci("Name")
            return Slot(cpus, mem, "machine-ad", name if isinstance(name, str) else "", _job_id(job))
    if job is not None and job_path:
        cpus, mem = _pos_int(job, "RequestCpus", job_path), _pos_int(job, "RequestMemory", job_path)
        if cpus and mem:
            return Slot(cpus, mem, "job-ad", "", _job_id(job))
    return Slot(os.cpu_count() or 1, host_memory_mib(), "host", "", _job_id(job))
