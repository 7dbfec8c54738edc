"""Benchmark for `vmtool build` (issue 2). Run: .venv/bin/python bench/build.py [--no-guestfs]

A 4 GiB sparse GPT+LVM disk (ext4 /boot partition; VG with lv_swap first, then a 2 GiB (--lv-mib) lv_root holding
~1 GiB of incompressible files) is built once; then, with warm page caches for every contender:
- native `vmtool build` time / the time to sha256 its output (rootfs.img) alone: limit 1.25
  (also printed: the same build when the initrd's report is not remembered yet)
- native `vmtool build` time / `cp --sparse=always` of the root LV's bytes (as a file): printed
- guestfs backend time / native time: printed (native should be at least 10x faster)
- allocated bytes of rootfs.img / allocated bytes of the LV's data in the source: limit 1.1
Each timing is the best of --runs runs (default 5; guestfs runs once).
Then a real Debian 12 disk (images/debian-12.toml: MBR, /boot ext2, LVM debian-vg with root and swap_1,
made by mmdebstrap; its tree cached in --tree-cache): native build / cp --sparse=always of its root LV.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmtool.fsutil import sha256_file  # noqa: E402
from vmtool.image.extract import _data_runs, extract  # noqa: E402
from vmtool.launch.host import newest_host_kernel  # noqa: E402
from vmtool.recipe.busybox import make_rootfs_tree  # noqa: E402
from vmtool.recipe.create import create_disk  # noqa: E402
from vmtool.recipe.disk import make_whole_disk  # noqa: E402
from vmtool.recipe.recipe import load_recipe  # noqa: E402
from vmtool.run import run  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def make_disk(work: Path, data_mib: int, lv_mib: int = 2048) -> tuple[Path, dict[str, object]]:
    tree = work / "tree"
    make_rootfs_tree(tree, label="rootfs", kernel_version=newest_host_kernel()[2])
    data = tree / "srv/data"
    data.mkdir(parents=True)
    per = 64
    for n in range(data_mib // per):
        with open(data / f"blob{n:03d}", "wb") as f:
            for _ in range(per):
                f.write(os.urandom(MiB))
    disk = work / "disk.raw"
    facts = make_whole_disk(
        disk, tree=tree, table="gpt", boot="partition", root="lvm", size_mib=4096, root_size_mib=lv_mib
    )
    shutil.rmtree(tree)
    return disk, facts


# Like an installed vmtool, the builds run from compiled bytecode (kept out of the work tree, as
# bench/stage.py does): an install compiles it once, a checkout with PYTHONDONTWRITEBYTECODE never does.
BYTECODE: dict[str, str] = {"PYTHONDONTWRITEBYTECODE": ""}


def compile_bytecode(work: Path) -> None:
    BYTECODE["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    run([sys.executable, "-m", "compileall", "-q", str(ROOT / "vmtool")], env=BYTECODE)


def timed(*argvs: list[str], cleanup: Path | None = None, env: dict[str, str] | None = None) -> float:
    if cleanup is not None:
        if cleanup.is_dir():
            shutil.rmtree(cleanup)
        else:
            cleanup.unlink(missing_ok=True)
    run(["sync"])  # start every contender with no dirty pages of the others'
    t = time.monotonic()
    for argv in argvs:
        run(argv, timeout=3600, env=env)
    return time.monotonic() - t


def hash_data_only(path: Path) -> float:
    """Seconds to sha256 only the data ranges of `path`: the hash's cost if its LV had no free space."""
    h = hashlib.sha256()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.monotonic()
        for d, n in _data_runs(fd, 0, os.fstat(fd).st_size):
            end = d + n
            while d < end:
                k = os.preadv(fd, [view[: min(len(buf), end - d)]], d)
                h.update(view[:k])
                d += k
        return time.monotonic() - t
    finally:
        os.close(fd)


def lv_file(disk: Path, facts: dict[str, object], out: Path) -> int:
    """The root LV's bytes as a sparse file (dd skips zero blocks: conv=sparse); returns its length."""
    lvm = facts["lvm"]
    assert isinstance(lvm, dict)
    pv_data = int(facts["root"]["offset"])  # type: ignore[index]
    lv_len = int(sum(c for _, c in lvm["lv_root"]) * lvm["extent_size"])
    run(
        [
            "dd",
            f"if={disk}",
            f"of={out}",
            "bs=1M",
            f"skip={pv_data // MiB}",
            f"count={lv_len // MiB}",
            "conv=sparse",
            "status=none",
        ]
    )
    return lv_len


def debian(work: Path, runs: int, cache: Path) -> str:
    disk = work / "debian-12.raw"
    facts = create_disk(load_recipe("debian-12"), disk, cache=cache)
    lv = work / "debian-root.img"
    lv_len = lv_file(disk, facts, lv)
    copy = work / "debian-copy.img"
    cp_argv = [["cp", "--sparse=always", str(lv), str(copy)], ["sync", str(copy)]]
    vm = [sys.executable, "-m", "vmtool", "build", str(disk), "-o", str(work / "dout")]
    env = {"VMTOOL_CACHE_DIR": str(work / "cache"), **BYTECODE}
    timed(*cp_argv)
    timed(vm, env=env)  # warm: the source's sha256 is cached from here on
    cp_ts, nat_ts = [], []
    for _ in range(runs):
        cp_ts.append(timed(*cp_argv, cleanup=copy))
        nat_ts.append(timed(vm, cleanup=work / "dout", env=env))
    cp_t, nat_t = min(cp_ts), min(nat_ts)
    return (
        f"build: real Debian 12 disk (MBR, /boot ext2, LVM debian-vg/root {lv_len // MiB} MiB, "
        f"{allocated(lv) // MiB} MiB used): native {nat_t:.2f} s / cp --sparse=always of the root LV "
        f"{cp_t:.2f} s = {nat_t / cp_t:.2f}"
    )


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5, help="best of this many runs (the machine is shared: noisy)")
    ap.add_argument("--lv-mib", type=int, default=2048)
    ap.add_argument("--no-guestfs", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-debian", action="store_true", help="skip the real Debian 12 disk")
    ap.add_argument("--tree-cache", default="/var/cache/vmtool-ci/trees", help="mmdebstrap trees kept here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmtool-bench-", dir=args.workdir) as td:
        work = Path(td)
        disk, facts = make_disk(work, args.data_mib, args.lv_mib)
        pv_data = int(facts["root"]["offset"])  # type: ignore[index]
        # The anchor's input: the LV's bytes as a sparse file.
        lv = work / "lv.img"
        lv_len = lv_file(disk, facts, lv)
        fd = os.open(disk, os.O_RDONLY)
        try:
            lv_data = sum(n for _, n in _data_runs(fd, pv_data, pv_data + lv_len))
        finally:
            os.close(fd)
        vmtool = [sys.executable, "-m", "vmtool"]
        compile_bytecode(work)
        env = {"VMTOOL_CACHE_DIR": str(work / "cache"), **BYTECODE}
        copy = work / "copy.img"
        # Both contenders finish with their output on disk: cp is followed by `sync FILE` (fsync), and
        # vmtool build fsyncs its outputs before renaming OUTDIR into place.
        cp_argv = [["cp", "--sparse=always", str(lv), str(copy)], ["sync", str(copy)]]
        timed(*cp_argv)  # warm the page cache with the disk's data
        cold = timed([*vmtool, "build", str(disk), "-o", str(work / "out")], env=env)
        cp_ts, nat_ts = [], []
        for _ in range(args.runs):
            cp_ts.append(timed(*cp_argv, cleanup=copy))
            nat_ts.append(
                timed([*vmtool, "build", str(disk), "-o", str(work / "out")], cleanup=work / "out", env=env)
            )
        cp_t, nat_t = min(cp_ts), min(nat_ts)
        # The same warm build when the initrd has not been checked before (its report is remembered by
        # content, like the source's sha256): a first build of a new kernel pays for reading the initrd.
        fresh_ts = []
        for n in range(args.runs):
            fresh = work / f"cache-fresh-initrd-{n}"
            shutil.copytree(work / "cache/sha256", fresh / "sha256")
            fresh_ts.append(
                timed(
                    [*vmtool, "build", str(disk), "-o", str(work / "out")],
                    cleanup=work / "out",
                    env={**env, "VMTOOL_CACHE_DIR": str(fresh)},
                )
            )
        fresh_t = min(fresh_ts)
        rootfs_alloc = allocated(work / "out/rootfs.img")
        # Where the time goes: vmtool's copy pass alone, and sha256 of the rootfs alone (the manifest
        # records it; SHA-256 has no shortcut over holes, so it costs the LV's full size in hashing).
        copy_ts, sha_ts, data_sha_ts = [], [], []
        for _ in range(args.runs):
            piece = work / "piece.img"
            piece.unlink(missing_ok=True)
            run(["sync"])
            t = time.monotonic()
            extract(disk, [(pv_data, lv_len)], piece)
            fd = os.open(piece, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            copy_ts.append(time.monotonic() - t)
            t = time.monotonic()
            sha256_file(work / "out/rootfs.img")
            sha_ts.append(time.monotonic() - t)
            data_sha_ts.append(hash_data_only(work / "out/rootfs.img"))
        copy_t, sha_t, data_sha_t = min(copy_ts), min(sha_ts), min(data_sha_ts)
        lines = [
            f"build: native {nat_t:.2f} s / sha256 of the output (rootfs.img) alone {sha_t:.2f} s = "
            f"{nat_t / sha_t:.2f} (limit 1.25)",
            f"build: native, initrd not checked before (its report not remembered yet) {fresh_t:.2f} s / sha256 "
            f"of the output alone {sha_t:.2f} s = {fresh_t / sha_t:.2f}",
            f"build: native {nat_t:.2f} s / cp --sparse=always {cp_t:.2f} s = {nat_t / cp_t:.2f}",
            f"build: native, first build (source sha256 and initrd report not cached yet) {cold:.2f} s / cp --sparse=always {cp_t:.2f} s"
            f" = {cold / cp_t:.2f}",
            f"build: its copy pass alone (vmtool.image.extract + fsync) {copy_t:.2f} s / cp --sparse=always "
            f"{cp_t:.2f} s = {copy_t / cp_t:.2f}",
            f"build: sha256 of the {lv_len // MiB} MiB rootfs.img alone {sha_t:.2f} s = {sha_t / cp_t:.2f} x cp "
            "(manifest rootfs.sha256; hashed while copying, on a second core)",
            f"build: sha256 of the rootfs's {rootfs_alloc // MiB} MiB of data alone (as if the LV were full) "
            f"{data_sha_t:.2f} s = {data_sha_t / cp_t:.2f} x cp",
            # The same work done by hand: the copy, then the checksum the manifest records.
            f"build: native {nat_t:.2f} s / (cp --sparse=always {cp_t:.2f} s + sha256 of rootfs.img {sha_t:.2f} s)"
            f" = {nat_t / (cp_t + sha_t):.2f}",
        ]
        if not args.no_guestfs:
            g_t = timed([*vmtool, "build", str(disk), "-o", str(work / "gout"), "--backend", "guestfs"])
            lines.append(
                f"build: guestfs {g_t:.1f} s / native {nat_t:.2f} s = {g_t / nat_t:.1f} "
                "(native should be >= 10x faster)"
            )
        lines.append(
            f"build: rootfs allocated {rootfs_alloc / MiB:.0f} MiB / LV data allocated "
            f"{lv_data / MiB:.0f} MiB = {rootfs_alloc / lv_data:.3f} (limit 1.1)"
        )
        lines.append(
            f"build: disk {facts['size'] // GiB} GiB sparse GPT+LVM, LV {lv_len // MiB} MiB, "
            f"{args.data_mib} MiB of random files, best of {args.runs}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} (the machine is shared with other work)"
        )
        for ln in lines:
            sys.stdout.write(ln + "\n")
        sys.stdout.flush()
        if not args.no_debian:
            sys.stdout.write(debian(work, args.runs, Path(args.tree_cache)) + "\n")
        ok = nat_t / sha_t <= 1.25 and rootfs_alloc / lv_data <= 1.1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
