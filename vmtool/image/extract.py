"""Sparse extraction of a volume (a partition or an LV's extents) from a raw disk file.

Only data is copied: SEEK_DATA/SEEK_HOLE skip the source's holes, and all-zero blocks inside data runs
are skipped too, so the output's holes are at least the source's holes. The output is sized first
(ftruncate) and written with pwrite at the right offsets.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from vmtool.errors import ImageError
from vmtool.fsutil import os_error
from vmtool.log import Progress

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
                raise ImageError(f"volume data at bytes {off}-{off + n} lies past the end of the disk ({src_size})",
                                 hint="the image is truncated; give the complete image")
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
                            raise ImageError(f"{src}: short read at byte {pos}", hint="the image is truncated")
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
