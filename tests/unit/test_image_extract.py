"""Sparse extraction and the one-pass overlay copy, on small files made here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vmtool.image.extract import changed_ranges, compose, extract, sparse_clone

pytestmark = pytest.mark.unit

K = 1024


def _sparse(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in data.items():
            f.seek(off)
            f.write(b)


def _data_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_extract_keeps_holes_and_skips_zero_blocks(tmp_path: Path) -> None:
    src = tmp_path / "disk"
    blob = os.urandom(200 * K)
    _sparse(src, 64 * 1024 * K, {1024 * K: blob, 8192 * K: bytes(1024 * K), 20000 * K: b"x" * 100})
    out = tmp_path / "vol"
    written = extract(src, [(1024 * K, 4096 * K), (20000 * K, 512 * K)], out)
    data = out.read_bytes()
    assert len(data) == 4608 * K
    assert data[: 200 * K] == blob and data[4096 * K : 4096 * K + 100] == b"x" * 100
    assert data.count(0) == len(data) - 200 * K - 100 + blob.count(0)
    assert written < 400 * K and _data_bytes(out) < 512 * K


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_compose_overlays_only_changed_blocks_and_hashes_the_result(tmp_path: Path, mapped: bool) -> None:
    size = 2048 * K
    src = tmp_path / "disk"
    base = os.urandom(size)
    _sparse(src, 4 * size, {size: base})
    meta = tmp_path / "meta"
    # an e2image-like copy: a few blocks of the source, with zero padding around them (as whole host blocks)
    _sparse(meta, size, {0: base[: 4 * K], 64 * K: bytes(4 * K), 300 * K: base[300 * K : 301 * K]})
    meta0 = tmp_path / "meta0"
    sparse_clone(meta, meta0)
    with open(meta, "r+b") as f:  # "the changes": one block rewritten, one new block in a former hole
        f.seek(K)
        f.write(b"L" * K)
        f.seek(900 * K)
        f.write(b"N" * K)
    changed = changed_ranges(meta0, meta, K)
    assert changed == [(K, b"L" * K), (900 * K, b"N" * K)]
    out = tmp_path / "out"
    digest = compose(src, [(size, size)], out, changed, mapped=mapped).get()
    want = bytearray(base)
    want[K : 2 * K] = b"L" * K
    want[900 * K : 901 * K] = b"N" * K
    got = out.read_bytes()
    assert got == bytes(want)  # padding zeros in meta did not clobber source data
    assert digest == hashlib.sha256(got).hexdigest()


def test_compose_digest_can_be_cancelled_and_its_thread_ends(tmp_path: Path) -> None:
    # A build that fails after the copy must not leave the hash thread working on a deleted file.
    import threading

    size = 64 << 30  # a 64 GiB hole after 4 KiB of data: about half a minute of hashing
    src = tmp_path / "disk"
    _sparse(src, size, {0: os.urandom(4 * K)})
    before = {t for t in threading.enumerate() if t.name == "vmtool-rootfs-sha256"}
    pending = compose(src, [(0, size)], tmp_path / "out", [(0, b"L" * K)])
    pending.cancel()
    for t in set(threading.enumerate()) - before:
        if t.name == "vmtool-rootfs-sha256":
            t.join(timeout=5)
            assert not t.is_alive(), "the hash thread went on after cancel()"
    # get() is the real digest and stays the same on a second call.
    small = 4 << 20
    _sparse(src, small, {})
    os.truncate(src, small)
    pending2 = compose(src, [(0, small)], tmp_path / "out2", [(0, b"L" * K)])
    want = hashlib.sha256((tmp_path / "out2").read_bytes()).hexdigest()
    assert pending2.get() == want == pending2.get()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_compose_leaves_zero_chunks_of_a_data_run_as_holes(tmp_path: Path, mapped: bool) -> None:
    # A data run of the source (written, so allocated) holding a whole zero chunk between two data
    # chunks, and a chunk that is zero only at its start: only the zero chunk becomes a hole.
    chunk = 4 << 20
    src = tmp_path / "disk"
    head = os.urandom(chunk)
    late = bytes(64) + os.urandom(chunk - 64)
    with open(src, "wb") as f:
        f.write(head + bytes(chunk) + late)
    out = tmp_path / "out"
    digest = compose(src, [(0, 3 * chunk)], out, [], mapped=mapped).get()
    got = out.read_bytes()
    assert got == head + bytes(chunk) + late
    assert digest == hashlib.sha256(got).hexdigest()
    assert _data_bytes(out) <= 2 * chunk + 64 * K
