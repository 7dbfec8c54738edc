"""vmtool_plugin: HTCondor file-transfer plugin staging VM images as qcow2 overlays.

Protocol: ../shared/reference/htcondor.md section 1 (v2 multi-file; v1 single-file for old sites).
This layer uses the standard library only; vmtool's stage code is imported inside the per-file
guard, so an import error, a bug or a timeout still produces a failure ad for every file. Every
exit path writes its ads: a normal return, an exception, SIGTERM, the time bound (SIGALRM), and a
watchdog thread that writes the ads itself and _exits if the main thread does not finish.

Schemes (docs/stage.md): vmimage:///abs/path (a node-local or NFS image), vmimage://host/path
(https), <t>+vmimage://... (t = http, https, s3, sftp, file), and the legacy
nfs:<abs path to image>:<instance file name> of the 2011 VM-universe recipe.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any

from vmtool import __version__
from vmtool.condor.classad import ClassAdError, parse_ads, unparse, unparse_old

PLUGIN_VERSION = __version__
METHODS = ("vmimage", "nfs")
EXIT_OK = 0
EXIT_FAIL = 1
DEFAULT_TIMEOUT = 4 * 3600.0  # well under MAX_FILE_TRANSFER_PLUGIN_LIFETIME (20 h)
GRACE = 15.0
MAX_INFILE = 16 << 20
USAGE = (
    "usage: vmtool_plugin -classad\n"
    "       vmtool_plugin -infile FILE -outfile FILE [-upload]\n"
    "       vmtool_plugin URL DEST            (legacy single-file form)\n"
)


class PluginTimeout(Exception):
    pass


class BadInput(Exception):
    """The input names something the plugin cannot do (reported as a Specification error)."""

    error_type = "Specification"
    code = -1
    server = ""


class Escape(BadInput):
    """A LocalFileName or URL that would write outside the job sandbox."""


def capability_ad() -> dict[str, object]:
    return {
        "MultipleFileSupport": True,
        "PluginType": "FileTransfer",
        "PluginVersion": PLUGIN_VERSION,
        "ProtocolVersion": 2,
        "SupportedMethods": ",".join(METHODS),
    }


def _timeout() -> float:
    try:
        return float(os.environ.get("VMTOOL_PLUGIN_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def sandbox_dir(infile: str | None = None) -> str:
    """_CONDOR_SCRATCH_DIR; else the directory the starter wrote the -infile in (its IWD, also for
    the <PLUGIN>_TEST_URL check at startup, which runs in a temporary directory); else the cwd."""
    base = os.environ.get("_CONDOR_SCRATCH_DIR") or (
        os.path.dirname(os.path.abspath(infile)) if infile else ""
    )
    return os.path.realpath(base or os.getcwd())


def confine(path: str, sandbox: str) -> str:
    """The absolute path for `path` if it stays inside the sandbox (its directory resolved), else Escape."""
    p = path if os.path.isabs(path) else os.path.join(sandbox, path)
    name = os.path.basename(p)
    if name in ("", ".", "..") or "\x00" in p:
        raise Escape(f"{path!r} is not a file name inside the job sandbox")
    parent = os.path.realpath(os.path.dirname(p))
    if parent != sandbox and not parent.startswith(sandbox.rstrip("/") + "/"):
        raise Escape(f"{path!r} is outside the job sandbox {sandbox}")
    return os.path.join(parent, name)


def scheme_of(url: str) -> str:
    head = url.split(":", 1)[0].lower() if ":" in url else ""
    return head


def parse_nfs(url: str) -> tuple[str, str | None]:
    """nfs:<abs path>:<instance name> (also nfs://<abs path>:<name>, as submit files must spell it)."""
    rest = url.split(":", 1)[1].lstrip("/")
    if ":" in rest:
        image, inst = rest.rsplit(":", 1)
    else:
        image, inst = rest, None
    if not image:
        raise BadInput(f"nfs URL names no image: {url!r}")
    return "/" + image, inst or None


class ResultWriter:
    """Writes the .out file once, from whichever path gets there first (main thread or watchdog)."""

    def __init__(self, outfile: str) -> None:
        self.outfile = outfile
        self.lock = threading.Lock()
        self.done = False

    def write(self, ads: list[dict[str, object]]) -> bool:
        with self.lock:
            if self.done:
                return True
            self.done = True
            data = "".join(unparse(a) + "\n" for a in ads).encode()
            try:
                # No O_TRUNC: the starter pre-allocates this file so a full disk can still take the
                # report; truncate afterwards so no stale bytes of an older run remain.
                fd = os.open(self.outfile, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.ftruncate(fd, len(data))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                sys.stderr.write(f"vmtool_plugin: cannot write {self.outfile}: {e.strerror or e}\n")
                return False
            return True


def _base_ad(url: str, local: str, upload: bool, start: float) -> dict[str, object]:
    return {
        "TransferUrl": url,
        "TransferFileName": local,
        "TransferType": "upload" if upload else "download",
        "TransferProtocol": scheme_of(url) or "unknown",
        "TransferStartTime": int(start),
    }


def failure_ad(url: str, local: str, upload: bool, start: float, err: BaseException) -> dict[str, object]:
    try:
        return _failure_ad(url, local, upload, start, err)
    except Exception:  # an exception too odd to describe must not cost the report itself
        ad = _base_ad(url, local, upload, start)
        ad.update(
            TransferSuccess=False,
            TransferError=f"transfer failed ({type(err).__name__})",
            TransferErrorData=[
                {"ErrorType": "Parameter", "ErrorCode": -1, "ErrorString": type(err).__name__}
            ],
        )
        return ad


def _failure_ad(url: str, local: str, upload: bool, start: float, err: BaseException) -> dict[str, object]:
    ad = _base_ad(url, local, upload, start)
    end = time.time()
    message, hint = str(err) or type(err).__name__, getattr(err, "hint", None)
    ted: dict[str, object]
    etype = getattr(err, "error_type", None)
    if etype is not None:
        code = int(getattr(err, "code", -1))
        ted = {"ErrorType": etype, "ErrorCode": code, "ErrorString": "not found" if code == 404 else message}
        server = str(getattr(err, "server", "") or "")
        failure = getattr(err, "failure_type", None)
        if etype == "Resolution":
            ted["FailedName"] = server
            ted["FailureType"] = failure or "Definitive"
        elif etype == "Parameter":
            ted.update(PluginVersion=PLUGIN_VERSION, PluginLaunched=True)
        else:
            ted["FailedServer"] = server
            if etype == "Authorization":
                ted["FailureType"] = failure or "Authorization"
                ted["ShouldRefresh"] = False
            elif etype == "Transfer" and failure:
                ted["FailureType"] = failure
    elif isinstance(err, PluginTimeout):
        ted = {
            "ErrorType": "Transfer",
            "ErrorCode": 62,
            "ErrorString": message,
            "FailedServer": "",
            "FailureType": "TimedOut",
        }
    elif _is_vmtool_error(err):
        ted = {"ErrorType": "Specification", "ErrorCode": -1, "ErrorString": message, "FailedServer": ""}
    else:
        message = f"internal error in vmtool_plugin: {type(err).__name__}: {err}"
        ted = {
            "ErrorType": "Parameter",
            "ErrorCode": -1,
            "ErrorString": message,
            "PluginVersion": PLUGIN_VERSION,
            "PluginLaunched": True,
        }
    ad.update(
        TransferSuccess=False,
        TransferError=message + (f" (hint: {hint})" if hint else ""),
        TransferErrorData=[ted],
        TransferEndTime=int(end),
        ConnectionTimeSeconds=float(end - start),
        TransferTotalBytes=0,
    )
    return ad


def _is_vmtool_error(err: BaseException) -> bool:
    return any(c.__name__ == "VmtoolError" and c.__module__ == "vmtool.errors" for c in type(err).__mro__)


def transfer(url: str, local: str, upload: bool, sandbox: str, deadline: float) -> dict[str, object]:
    """One file; returns a success ad or raises (the caller turns any exception into a failure ad)."""
    start = time.time()
    scheme = scheme_of(url)
    if scheme not in METHODS and not scheme.endswith("+vmimage"):
        raise BadInput(
            f"vmtool_plugin does not handle URL scheme {scheme!r} (it handles {', '.join(METHODS)})"
        )
    if upload:
        return _upload(url, local, sandbox, start)
    from vmtool.stage.cache import Cache
    from vmtool.stage.sources import parse_source
    from vmtool.stage.stage import stage

    if scheme == "nfs":
        image, inst = parse_nfs(url)
        local_abs = confine(local, sandbox)
        dest = confine(
            os.path.join(os.path.dirname(local_abs), inst or os.path.basename(local_abs)), sandbox
        )
        src = parse_source(image)
    else:
        dest = confine(local, sandbox)
        src = parse_source(url)
    cache = Cache.open(None)
    res = stage(
        src,
        os.path.dirname(dest),
        cache,
        name=os.path.basename(dest),
        force=True,
        deadline=deadline,
        progress=False,
    )
    end = time.time()
    ad = _base_ad(url, local, False, start)
    ad.update(
        TransferSuccess=True,
        TransferFileBytes=os.path.getsize(res.overlay),
        TransferTotalBytes=res.fetched_bytes,
        TransferEndTime=int(end),
        ConnectionTimeSeconds=float(end - start),
        DeveloperData={
            "BaseSha256": res.sha256,
            "CacheHit": res.cache_hit,
            "Overlay": os.fspath(res.overlay),
            "BaseFormat": res.format,
        },
    )
    return ad


def _upload(url: str, local: str, sandbox: str, start: float) -> dict[str, object]:
    from pathlib import Path

    from vmtool.stage.cache import Cache
    from vmtool.stage.sources import parse_source
    from vmtool.stage.upload import copy_local, flatten_if_overlay, upload

    path = confine(local, sandbox)
    real = os.path.realpath(path)
    if real != sandbox and not real.startswith(sandbox.rstrip("/") + "/"):
        raise Escape(f"{local!r} resolves outside the job sandbox")
    if not os.path.isfile(real):
        raise Escape(f"{local!r} is not a regular file in the job sandbox")
    if scheme_of(url) == "nfs":
        raise BadInput("the legacy nfs: scheme is download-only")
    dest = parse_source(url)
    dest_path = confine(dest.path, sandbox) if dest.kind == "file" else None
    flat = flatten_if_overlay(Path(real), Cache.open(None), Path(sandbox))
    try:
        data = flat or Path(real)
        sent = copy_local(data, Path(dest_path)) if dest_path else upload(data, dest)
    finally:
        if flat is not None:
            flat.unlink()
    end = time.time()
    ad = _base_ad(url, local, True, start)
    ad.update(
        TransferSuccess=True,
        TransferFileBytes=sent,
        TransferTotalBytes=sent,
        TransferEndTime=int(end),
        ConnectionTimeSeconds=float(end - start),
    )
    return ad


class _Run:
    """State shared by the main loop, the signal handlers and the watchdog."""

    def __init__(self, files: list[tuple[str, str]], upload: bool) -> None:
        self.files = files
        self.upload = upload
        self.results: list[dict[str, object] | None] = [None] * len(files)
        self.start = time.time()
        self.stopped: BaseException | None = None

    def final_ads(self, extra: list[dict[str, object]] | None = None) -> list[dict[str, object]]:
        ads: list[dict[str, object]] = []
        for (url, local), res in zip(self.files, self.results, strict=True):
            if res is None:
                why = self.stopped or PluginTimeout("not transferred: the plugin was stopped first")
                res = failure_ad(url, local, self.upload, self.start, why)
            ads.append(res)
        return ads + (extra or [])


def _install_stops(state: _Run) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        why = "time limit reached" if signum == signal.SIGALRM else f"stopped by signal {signum}"
        state.stopped = PluginTimeout(f"transfer {why}")
        raise state.stopped

    for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _watchdog(
    state: _Run, writer: ResultWriter, limit: float, extra: list[dict[str, object]]
) -> threading.Timer:
    """Last resort if the main thread is stuck past the time bound: write the ads here and exit."""

    def fire() -> None:
        if writer.done:
            return
        state.stopped = state.stopped or PluginTimeout("transfer time limit reached")
        writer.write(state.final_ads(extra))
        os._exit(EXIT_FAIL)

    t = threading.Timer(limit + GRACE, fire)
    t.daemon = True
    t.start()
    return t


def run_multi(infile: str, outfile: str, upload: bool) -> int:
    writer = ResultWriter(outfile)
    limit = _timeout()
    deadline = time.monotonic() + limit
    sandbox = sandbox_dir(infile)
    now = time.time()
    try:
        with open(infile, "rb") as f:
            raw = f.read(MAX_INFILE + 1)
        if len(raw) > MAX_INFILE:
            raise ClassAdError("input file is larger than 16 MiB")
        ads = parse_ads(raw.decode("utf-8", "replace"))
    except (OSError, ClassAdError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        err = BadInput(f"cannot read the plugin input file {infile}: {what}")
        writer.write([failure_ad("", "", upload, now, err)])
        sys.stderr.write(f"vmtool_plugin: {err}\n")
        return EXIT_FAIL
    files: list[tuple[str, str]] = []
    bad: list[dict[str, object]] = []
    for ad in ads:
        url, local = ad.get("url"), ad.get("localfilename")
        if url is None and local is None:
            continue  # a v4 non-file ad (PluginData, Protocol), or one we do not know
        if not isinstance(url, str) or not isinstance(local, str):
            bad.append(
                failure_ad(
                    str(url or ""),
                    str(local or ""),
                    upload,
                    now,
                    BadInput("input ad needs string Url and LocalFileName"),
                )
            )
            continue
        files.append((url, local))
    state = _Run(files, upload)
    _install_stops(state)
    watchdog = _watchdog(state, writer, limit, bad)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 0.001))
    try:
        for i, (url, local) in enumerate(files):
            if state.stopped is not None:
                break
            start = time.time()
            try:
                state.results[i] = transfer(url, local, upload, sandbox, deadline)
            except BaseException as e:  # noqa: B036 - every failure, even a bug, becomes a failure ad
                if os.environ.get("VMTOOL_PLUGIN_DEBUG"):
                    traceback.print_exc()
                state.results[i] = failure_ad(url, local, upload, start, e)
                sys.stderr.write(f"vmtool_plugin: {url}: {state.results[i]['TransferError']}\n")  # type: ignore[index]
    except BaseException as e:  # noqa: B036 - a signal between files
        state.stopped = state.stopped or e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the report is written now; nothing may cut it short
    final = state.final_ads(bad)
    if not final:
        final = [failure_ad("", "", upload, now, BadInput("the input file names no files to transfer"))]
    ok = writer.write(final)
    watchdog.cancel()
    return EXIT_OK if ok and all(a.get("TransferSuccess") is True for a in final) else EXIT_FAIL


def run_single(a: str, b: str) -> int:
    """v1: `plugin URL DEST` downloads, `plugin LOCAL URL` uploads; the result ad goes to stdout."""
    upload = _looks_like_url(b) and not _looks_like_url(a)
    url, local = (b, a) if upload else (a, b)
    sandbox = sandbox_dir()
    limit = _timeout()
    state = _Run([(url, local)], upload)
    _install_stops(state)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 0.001))
    start = time.time()
    try:
        ad = transfer(url, local, upload, sandbox, time.monotonic() + limit)
    except BaseException as e:  # noqa: B036 - every failure becomes a failure ad
        ad = failure_ad(url, local, upload, start, e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    flat = {k: v for k, v in ad.items() if not isinstance(v, (dict, list))}
    sys.stdout.write(unparse_old(flat))
    sys.stdout.flush()
    if ad.get("TransferSuccess") is not True:
        sys.stderr.write(f"vmtool_plugin: {ad.get('TransferError')}\n")
        return EXIT_FAIL
    return EXIT_OK


def _looks_like_url(s: str) -> bool:
    head = s.split(":", 1)[0]
    return (
        ":" in s
        and head.replace("+", "").replace("-", "").replace(".", "").isalnum()
        and ("://" in s or head.lower() == "nfs")
    )


def _usage(msg: str) -> int:
    sys.stderr.write(f"vmtool_plugin: {msg}\n{USAGE}")
    return EXIT_FAIL


def job_aws_environment(env: dict[str, str] | os._Environ[str]) -> None:
    """VMTOOL_AWS_<X> -> AWS_<X>. Of the job's environment the starter passes only VMTOOL_* to this
    plugin (its file name makes it VMTOOL), so a job's S3 credentials, region, profile, credentials
    file or endpoint come this way; they override the starter's own AWS_* (docs/condor.md)."""
    for k, v in list(env.items()):
        if k.startswith("VMTOOL_AWS_") and len(k) > len("VMTOOL_AWS_"):
            env[k[len("VMTOOL_"):]] = v


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    job_aws_environment(os.environ)
    if args == ["-classad"]:
        sys.stdout.write(unparse_old(capability_ad()))
        sys.stdout.flush()
        return EXIT_OK
    opts: dict[str, Any] = {"upload": False}
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-infile", "-outfile"):
            if i + 1 >= len(args):
                return _usage(f"{a} needs a file name")
            opts[a[1:]] = args[i + 1]
            i += 2
            continue
        if a == "-upload":
            opts["upload"] = True
        elif a in ("-diagnostic", "-classad"):
            pass
        elif a.startswith("-") and len(a) > 1:
            return _usage(f"unknown option {a}")
        else:
            pos.append(a)
        i += 1
    if "infile" in opts or "outfile" in opts:
        if "infile" not in opts or "outfile" not in opts or pos:
            return _usage("-infile and -outfile go together, with no other arguments")
        return run_multi(opts["infile"], opts["outfile"], bool(opts["upload"]))
    if len(pos) == 2:
        return run_single(pos[0], pos[1])
    return _usage("wrong arguments")


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
