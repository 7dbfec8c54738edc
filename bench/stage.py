#!/usr/bin/env python3
"""Benchmark `vmtool stage` (issue 3). Prints ratio lines against anchors measured in the same run.

1. Warm cache, whole `vmtool stage` process: median for a 32 GiB sparse raw base / median for a
   1 GiB one (limit 1.2), and the 1 GiB median / `cp --sparse=always` of the 1 GiB base.
2. Cold cache over http from a local server: 32 stagers started together / one stager alone
   (limit 1.3; two rounds of each, in ABBA order, means compared), and the number of GETs of the
   image the server saw in each round of 32 (must be 1).

The 32 GiB base is sparse (1 MiB of data); the 1 GiB base is 1 GiB of real data, so the cp anchor
copies what a site without a cache would copy for every job.

Exits 1 if a limit is not met. Scratch files go to $VMTOOL_BENCH_DIR (default /var/tmp) and are removed.
"""

from __future__ import annotations

import http.server
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmtool.run import DEVNULL, PIPE, run, spawn  # noqa: E402

GiB = 1 << 30
WARM_RUNS = int(os.environ.get("BENCH_WARM_RUNS", "15"))
COLD_SIZE = int(os.environ.get("BENCH_COLD_GIB", "6")) * GiB
STAGERS = 32


def data_disk(path: Path, size: int) -> Path:
    """A raw disk of `size` bytes of real (random) data, the anchor's worst case for cp."""
    with open(path, "wb") as f:
        block = os.urandom(64 << 20)
        for _ in range(size // len(block)):
            f.write(block)
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


def sparse_disk(path: Path, size: int) -> Path:
    """A raw disk of `size` bytes, mostly holes: an MBR signature and 1 MiB of data."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


def stage_argv(src: str, into: Path, name: str, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vmtool",
        "stage",
        src,
        "--format",
        "raw",
        "--into",
        str(into),
        "--name",
        name,
        "--cache",
        str(cache),
    ]


# Like an installed vmtool, the stagers run from compiled bytecode (kept out of the work tree).
ENV: dict[str, str] = {"PYTHONDONTWRITEBYTECODE": ""}


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    run(argv, cwd=ROOT, env=ENV)
    return time.perf_counter() - t0


class Server:
    def __init__(self, root: Path) -> None:
        self.gets: Counter[str] = Counter()
        gets, lock = self.gets, threading.Lock()

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send_head(self) -> Path | None:
                p = root / self.path.lstrip("/")
                if not p.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                st = p.stat()
                self.send_response(200)
                self.send_header("Content-Length", str(st.st_size))
                self.send_header("ETag", f'"{st.st_ino}-{st.st_mtime_ns}"')
                self.end_headers()
                return p

            def do_HEAD(self) -> None:
                self._send_head()

            def do_GET(self) -> None:
                with lock:
                    gets[self.path] += 1
                p = self._send_head()
                if p is not None:
                    self.wfile.flush()
                    with open(p, "rb") as f:
                        self.connection.sendfile(f)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> int:
    work = Path(
        tempfile.mkdtemp(prefix="vmtool-bench-stage.", dir=os.environ.get("VMTOOL_BENCH_DIR", "/var/tmp"))
    )
    ok = True
    ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        run([sys.executable, "-m", "compileall", "-q", str(ROOT / "vmtool")], env=ENV)
        b1 = data_disk(work / "base-1g.img", GiB)
        b32 = sparse_disk(work / "base-32g.img", 32 * GiB)
        cache, into = work / "cache", work / "jobs"
        # Warm both (the 32 GiB base hashes 32 GiB of holes once).
        run(stage_argv(str(b32), into, "warmup32.qcow2", cache), cwd=ROOT, env=ENV)
        run(stage_argv(str(b1), into, "warmup1.qcow2", cache), cwd=ROOT, env=ENV)
        t32, t1 = [], []
        for i in range(WARM_RUNS):  # interleaved, so load from other work on the machine hits both alike
            t32.append(timed(stage_argv(str(b32), into, f"a{i}.qcow2", cache)))
            t1.append(timed(stage_argv(str(b1), into, f"b{i}.qcow2", cache)))
        m32, m1 = statistics.median(t32), statistics.median(t1)
        r = m32 / m1
        ok &= r <= 1.2
        print(f"stage warm: 32 GiB median {m32:.3f} s / 1 GiB median {m1:.3f} s = {r:.2f} (limit 1.2)")
        tcp = []
        for _ in range(5):
            dst = work / "cp-copy.img"
            tcp.append(timed(["cp", "--sparse=always", str(b1), str(dst)]))
            dst.unlink()
        mcp = statistics.median(tcp)
        print(
            f"stage warm: 1 GiB median {m1:.3f} s / cp --sparse=always of the 1 GiB base median {mcp:.3f} s"
            f" = {m1 / mcp:.2f}"
        )

        www = work / "www"
        www.mkdir()
        sparse_disk(www / "cold.img", COLD_SIZE)
        srv = Server(www)
        try:
            url = f"http://127.0.0.1:{srv.port}/cold.img"
            ones, manys, gets, failed = [], [], [], 0
            for rnd, kind in enumerate(
                ("one", "many", "many", "one")
            ):  # ABBA: cancels drift in machine load
                if kind == "one":
                    t0 = time.perf_counter()
                    run(
                        stage_argv(url, work / f"one{rnd}", "one.qcow2", work / f"cache-one{rnd}"),
                        cwd=ROOT,
                        env=ENV,
                    )
                    ones.append(time.perf_counter() - t0)
                    continue
                srv.gets.clear()
                cache_many = work / f"cache-many{rnd}"
                t0 = time.perf_counter()
                procs = [
                    spawn(
                        stage_argv(url, work / f"many{rnd}", f"vm{i}.qcow2", cache_many),
                        cwd=ROOT,
                        env=ENV,
                        stdout=DEVNULL,
                        stderr=PIPE,
                    )
                    for i in range(STAGERS)
                ]
                for p in procs:
                    _, err = p.communicate()
                    if p.returncode != 0:
                        failed += 1
                        sys.stderr.write(err.decode())
                manys.append(time.perf_counter() - t0)
                gets.append(srv.gets["/cold.img"])
                shutil.rmtree(cache_many, ignore_errors=True)
        finally:
            srv.close()
        t_one, t_many = statistics.mean(ones), statistics.mean(manys)
        r = t_many / t_one
        ok &= r <= 1.3 and set(gets) == {1} and failed == 0
        print(
            f"stage cold: {STAGERS} stagers at once over http, {COLD_SIZE // GiB} GiB base, mean {t_many:.2f} s"
            f" / 1 stager alone mean {t_one:.2f} s = {r:.2f} (limit 1.3); GETs of the image per round:"
            f" {', '.join(map(str, gets))} (must be 1); failed stagers: {failed}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
