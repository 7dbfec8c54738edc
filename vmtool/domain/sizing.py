"""How much memory a guest may have in a slot: qemu's overhead, the largest guest that fits, units.

Pure arithmetic; which size a domain gets is domain/policy.py's decision.
"""

from __future__ import annotations

from vmtool.errors import DomainError

TCG_TB_CACHE_MIB = 128

_UNIT_BYTES = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
               "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40,
               "tb": 10**12}


def qemu_overhead_mib(memory_mib: int, accel: str) -> int:
    """Memory qemu needs beyond the guest's RAM: max(64 MiB, 5%), plus, under TCG, its translation cache
    (capped with <tb-cache>) and 32 MiB. The cap is 128 MiB: a Linux boot translated ~75-100 MiB of code
    here, and a 64 MiB cache made boots ~10% slower (flushes); qemu's own default is 1 GiB."""
    base = max(64, -(-memory_mib * 5 // 100))
    return base + (TCG_TB_CACHE_MIB + 32 if accel == "tcg" else 0)


def max_guest_memory(slot_mib: int, accel: str) -> int:
    """The largest guest memory m with m + overhead(m) <= slot memory."""
    lo, hi = 0, slot_mib
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + qemu_overhead_mib(mid, accel) <= slot_mib:
            lo = mid
        else:
            hi = mid - 1
    return lo


def to_mib(value: int, unit: str | None) -> int:
    """A libvirt memory size (`unit` as in <memory unit=...>, default KiB) in MiB, rounded down."""
    unit = (unit or "KiB").lower()
    if unit not in _UNIT_BYTES:
        raise DomainError(f"domain XML: unknown memory unit {unit!r}", hint="use KiB, MiB or GiB")
    return value * _UNIT_BYTES[unit] // (1 << 20)
