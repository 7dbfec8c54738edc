"""Sparse extraction of a volume (a partition or an LV's extents) from a raw disk file.

Only data is copied: SEEK_DATA/SEEK_HOLE skip the source's holes, and all-zero blocks inside data runs
are skipped too, so the output's holes are at least the source's holes. The output is sized first
(ftruncate) and written with pwrite at the right offsets.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vmtool.errors import ImageError
from vmtool.fsutil import os_error
from vmtool.log import Progress

log = logging.getLogger("vmtool.image.extract")

CHUNK = 4 << 20
BLOCK = 64 << 10
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(BLOCK)


def _data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the data ranges of [start, end) in the file behind fd."""
    runs = []
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if d >= end:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        runs.append((d, h - d))
        pos = h
    return runs


def extract(src: Path, pieces: Sequence[tuple[int, int]], out: Path, *, label: str = "extracting") -> int:
    """Write the concatenation of `pieces` (disk offset, length) of `src` to the new file `out`, sparse.

    Returns the number of bytes written (data bytes).
    """
    total = sum(n for _, n in pieces)
    written = 0
    progress = Progress(label, total)
    try:
        fi = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise os_error(e, f"cannot read {src}") from None
    try:
        src_size = os.fstat(fi).st_size
        for off, n in pieces:
            if off < 0 or off + n > src_size:
                raise ImageError(
                    f"volume data at bytes {off}-{off + n} lies past the end of the disk ({src_size})",
                    hint="the image is truncated; give the complete image",
                )
        try:
            fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise os_error(e, f"cannot create {out}") from None
        try:
            os.ftruncate(fo, total)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            base = 0
            # bytes/bytearray equality is a memcmp; memoryview equality compares element by element.
            for off, n in pieces:
                for d, length in _data_runs(fi, off, off + n):
                    pos = d
                    end = d + length
                    while pos < end:
                        k = min(CHUNK, end - pos)
                        got = os.preadv(fi, [view[:k]], pos)
                        if got != k:
                            raise ImageError(
                                f"{src}: short read at byte {pos}", hint="the image is truncated"
                            )
                        if k == CHUNK and buf == _ZERO_CHUNK:
                            pos += k
                            continue
                        written += _write_nonzero(fo, buf, k, base + pos - off)
                        pos += k
                        progress.update(done=base + pos - off)
                base += n
        except OSError as e:
            raise os_error(e, f"writing {out}") from None
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    progress.close()
    return written


def _is_zero(buf: bytearray, i: int, n: int) -> bool:
    end = min(i + BLOCK, n)
    return buf[i:end] == (_ZERO_BLOCK if end - i == BLOCK else bytes(end - i))


def _write_nonzero(fd: int, buf: bytearray, n: int, at: int) -> int:
    """pwrite the non-zero BLOCK-sized runs of buf[:n] at `at`; zero blocks stay holes."""
    view = memoryview(buf)
    written = 0
    i = 0
    while i < n:
        while i < n and _is_zero(buf, i, n):
            i += BLOCK
        if i >= n:
            break
        j = i
        while j < n and not _is_zero(buf, j, n):
            j += BLOCK
        j = min(j, n)
        data = view[i:j]
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], at + i + done)
        written += len(data)
        i = j
    return written


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class _Hasher:
    """sha256 fed in file order from a queue, on its own thread (hashlib releases the GIL)."""

    def __init__(self) -> None:
        import hashlib
        import queue
        import threading

        self.h = hashlib.sha256()
        self.q: queue.Queue[bytes | memoryview | int | None] = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.t = threading.Thread(target=self._run, name="vmtool-rootfs-sha256", daemon=True)
        self.t.start()

    def _run(self) -> None:
        zero = bytes(CHUNK)
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if isinstance(item, int):
                    while item > 0 and not self.stopped.is_set():
                        k = min(item, CHUNK)
                        self.h.update(zero if k == CHUNK else zero[:k])
                        item -= k
                else:
                    self.h.update(item)
        except BaseException as e:  # surfaced by hexdigest()
            self.error = e

    def feed(self, item: bytes | memoryview | int) -> None:
        import queue

        if isinstance(item, int) and item <= 0:
            return
        while True:
            if self.error is not None or not self.t.is_alive():
                raise ImageError(f"hashing the root filesystem failed: {self.error}")
            try:
                self.q.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def hexdigest(self) -> str:
        self.feed_end()
        self.t.join()
        if self.error is not None:
            raise self.error
        return self.h.hexdigest()

    def feed_end(self) -> None:
        import queue

        while self.t.is_alive():
            try:
                self.q.put(None, timeout=1.0)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        import queue

        # drop what is queued so the thread reaches the end marker at once, and cut a long hole short
        self.stopped.set()
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.feed_end()


def sparse_clone(src: Path, dst: Path) -> None:
    """Copy the data ranges of `src` to the new file `dst` (same size, holes kept)."""
    fi = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fi).st_size
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fo, size)
            for d, n in _data_runs(fi, 0, size):
                done = 0
                while done < n:
                    done += os.copy_file_range(fi, fo, n - done, d + done, d + done)
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def changed_ranges(before: Path, after: Path, block: int) -> list[tuple[int, bytes]]:
    """The `block`-sized blocks of `after` that differ from `before` (a file of the same size), merged
    into runs: (offset, the run's bytes in `after`). They are few (the blocks an edit touched), so they
    are kept in memory and both files can go at once."""
    out: list[tuple[int, bytearray]] = []
    fa = os.open(after, os.O_RDONLY)
    fb = os.open(before, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        for d, n in _data_runs(fa, 0, size):
            start = d - d % block
            end = min(size, -(-(d + n) // block) * block)
            a = os.pread(fa, end - start, start)
            b = os.pread(fb, end - start, start)
            for i in range(0, len(a), block):
                if a[i : i + block] != b[i : i + block]:
                    off = start + i
                    if out and out[-1][0] + len(out[-1][1]) == off:
                        out[-1][1].extend(a[i : i + block])
                    elif out and out[-1][0] + len(out[-1][1]) > off:
                        continue
                    else:
                        out.append((off, bytearray(a[i : i + block])))
    finally:
        os.close(fa)
        os.close(fb)
    return [(off, bytes(data)) for off, data in out]


def compose(
    src: Path,
    pieces: Sequence[tuple[int, int]],
    out: Path,
    changes: Sequence[tuple[int, bytes]],
    *,
    label: str = "extracting",
    mapped: bool = True,
) -> PendingDigest:
    """Write the volume `pieces` of `src` to the new file `out` with the `changes` (offset, bytes) laid
    over it, sparse, and return the sha256 of the result, hashed while it is written
    (PendingDigest.get() waits for the last of it).

    This is how the native backend avoids a second pass over the root filesystem: the changes (fstab,
    keys, label) are made first on an `e2image -r` metadata-only copy of the filesystem, and
    changed_ranges lists the filesystem blocks they touched, with their new bytes.

    The source is read through a read-only map (`mapped`): the hash and the write take its page-cache
    pages as they are, where a read would copy every chunk into freshly allocated memory first, which
    cost more CPU than the write itself on the 2-core test machine (bench/build.py). Shrinking the
    source file while a build maps it ends the process with SIGBUS, as it does for git and ripgrep;
    where the map cannot be made (address-space limits) the source is read instead.
    """
    total = sum(n for _, n in pieces)
    over = sorted((off, len(data)) for off, data in changes)
    by_offset = dict(changes)
    for i, (off, n) in enumerate(over):
        if off < 0 or off + n > total or (i and over[i - 1][0] + over[i - 1][1] > off):
            raise ImageError("internal: a change lies outside the volume or overlaps another")
    progress = Progress(label, total)
    hasher = _Hasher()
    try:
        fi = os.open(src, os.O_RDONLY)
        try:
            fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            flusher = _Flusher(fo)
            try:
                os.ftruncate(fo, total)
                # Source data runs in volume coordinates.
                src_runs: list[tuple[int, int, int]] = []  # (volume offset, length, disk offset)
                base = 0
                for off, n in pieces:
                    if off < 0 or off + n > os.fstat(fi).st_size:
                        raise ImageError(
                            f"volume data at bytes {off}-{off + n} lies past the end of the disk",
                            hint="the image is truncated; give the complete image",
                        )
                    for d, length in _data_runs(fi, off, off + n):
                        src_runs.append((base + d - off, length, d))
                    base += n
                pos = 0
                read = _source_reader(fi) if mapped else functools.partial(os.pread, fi)
                for kind, start, length, disk in _merge(src_runs, over, total):
                    hasher.feed(start - pos)  # hole before this run
                    end = start + length
                    p = start
                    while p < end:
                        k = min(CHUNK, end - p)
                        if kind == "overlay":
                            buf: bytes | memoryview = by_offset[start][p - start : p - start + k]
                        else:
                            buf = read(k, disk + (p - start))
                        if len(buf) != k:
                            raise ImageError(f"{src}: short read", hint="the image is truncated")
                        if kind == "overlay" or not _zero(buf):
                            done = 0
                            while done < k:
                                done += os.pwrite(fo, buf[done:], p + done)
                            flusher.wrote(k)
                        hasher.feed(buf)
                        p += k
                        progress.update(done=p)
                    pos = end
                hasher.feed(total - pos)
            finally:
                flusher.close()
                os.close(fo)
        finally:
            os.close(fi)
    except OSError as e:
        hasher.abort()
        raise os_error(e, f"writing {out}") from None
    except BaseException:
        hasher.abort()
        raise
    progress.close()
    # The copy runs at most the queue's length ahead of the hash: the caller checks and syncs the new
    # file while the hash thread finishes, and asks for the digest last.
    return PendingDigest(hasher)


def _source_reader(fd: int) -> Callable[[int, int], bytes | memoryview]:
    """A read(length, offset) that slices a read-only map of the file (each slice keeps the map alive
    until the hash thread is done with it), or reads when the file cannot be mapped."""
    try:
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    except (OSError, ValueError) as e:
        log.debug("cannot map the source (%s): reading it", e)
        return functools.partial(os.pread, fd)
    with contextlib.suppress(OSError):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    view = memoryview(mm)
    size = len(mm)

    def read(n: int, at: int) -> memoryview:
        return view[at : min(at + n, size)]

    return read


def _zero(buf: bytes | memoryview) -> bool:
    # bytes equality is a memcmp; a memoryview's compares item by item, so one is only copied when
    # its first bytes are zero (an unwritten part of the filesystem, rare inside a data run).
    n = len(buf)
    if isinstance(buf, memoryview):
        if buf[:64] != _ZERO_CHUNK[: min(64, n)]:
            return False
        buf = bytes(buf)
    return buf == (_ZERO_CHUNK if n == CHUNK else bytes(n))


class PendingDigest:
    """The sha256 of a file written by compose(), finished on its own thread."""

    def __init__(self, hasher: _Hasher) -> None:
        self._hasher = hasher
        self._value: str | None = None

    def get(self) -> str:
        if self._value is None:
            self._value = self._hasher.hexdigest()
        return self._value

    def cancel(self) -> None:
        if self._value is None:
            self._hasher.abort()


class _Flusher:
    """fsync the output on a thread every FLUSH_EVERY bytes written, so its writeback overlaps the
    (CPU-bound) hashing instead of all waiting for the final fsync."""

    FLUSH_EVERY = 256 << 20

    def __init__(self, fd: int) -> None:
        import threading

        self.fd = fd
        self.pending = 0
        self.event = threading.Event()
        self.done = False
        self.t = threading.Thread(target=self._run, name="vmtool-flush", daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            self.event.wait()
            self.event.clear()
            if self.done:
                return
            try:
                os.fsync(self.fd)
            except OSError:
                return  # the final fsync, by the caller, reports errors

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.FLUSH_EVERY:
            self.pending = 0
            self.event.set()

    def close(self) -> None:
        self.done = True
        self.event.set()
        self.t.join()


def _merge(
    src_runs: list[tuple[int, int, int]], over: list[tuple[int, int]], total: int
) -> list[tuple[str, int, int, int]]:
    """Ordered, non-overlapping (kind, volume offset, length, disk offset) runs: overlay ranges win."""
    out: list[tuple[str, int, int, int]] = []
    oi = 0
    for vstart, length, disk in src_runs:
        vend = vstart + length
        cur = vstart
        while cur < vend:
            while oi < len(over) and over[oi][0] + over[oi][1] <= cur:
                oi += 1
            if oi < len(over) and over[oi][0] < vend:
                o_start, o_len = over[oi]
                if o_start > cur:
                    out.append(("src", cur, o_start - cur, disk + (cur - vstart)))
                    cur = o_start
                else:
                    cur = min(vend, o_start + o_len)
            else:
                out.append(("src", cur, vend - cur, disk + (cur - vstart)))
                cur = vend
    for o_start, o_len in over:
        out.append(("overlay", o_start, o_len, 0))
    out.sort(key=lambda r: r[1])
    return out
