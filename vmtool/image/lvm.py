"""LVM2 read in user space: PV label, metadata area, the VG's text metadata, and LV -> disk extent maps.

Layout (lvm2 lib/format_text/layout.h, lib/label/label.h): a `LABELONE` label header in one of the first
four sectors of the PV, followed by the PV header (PV UUID, device size, data area and metadata area
lists). Each metadata area starts with an mda_header (CRC, magic, raw_locn slots) pointing at the text
of the newest metadata, which may wrap around the end of the circular buffer. LVM's CRC is the zlib
CRC-32 polynomial without the final inversion, seeded with 0xf597a6cf.

Only what a root filesystem needs is supported: linear ("striped" with stripe_count 1) segments, one or
more of them, on PVs found on this disk. Anything else is refused with a message naming it.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from vmtool.errors import ImageError

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
MAX_METADATA = 16 << 20
MAX_DEPTH = 16

HINT_DAMAGED = "the LVM metadata is damaged; check it with 'pvck' on a copy, or give the original image"


def lvm_crc(data: bytes, seed: int = INITIAL_CRC) -> int:
    return zlib.crc32(data, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _fmt_uuid(raw: bytes) -> str:
    s = raw.decode("ascii", errors="replace")
    parts, i = [], 0
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append(s[i : i + n])
        i += n
    return "-".join(parts)


@dataclass
class PVLabel:
    offset: int  # where the PV starts on the disk (bytes)
    size: int  # size of the region holding it (partition size)
    uuid: str
    device_size: int
    data_areas: list[tuple[int, int]]
    metadata_areas: list[tuple[int, int]]


@dataclass
class LVSegment:
    start_extent: int
    extent_count: int
    type: str
    pv: str = ""
    pv_extent: int = 0
    stripe_count: int = 1


@dataclass
class LogicalVolume:
    vg: str
    name: str
    uuid: str
    status: list[str]
    segments: list[LVSegment]
    extent_size: int
    # (disk offset, length) pieces in LV order; empty when the LV cannot be mapped (unsupported).
    extents: list[tuple[int, int]] = field(default_factory=list)
    unsupported: str = ""

    @property
    def size(self) -> int:
        return sum(s.extent_count for s in self.segments) * self.extent_size

    @property
    def visible(self) -> bool:
        return "VISIBLE" in self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "vg": self.vg,
            "name": self.name,
            "uuid": self.uuid,
            "size": self.size,
            "segments": len(self.segments),
            "extents": [list(e) for e in self.extents],
            "unsupported": self.unsupported or None,
        }


@dataclass
class VolumeGroup:
    name: str
    uuid: str
    seqno: int
    extent_size: int
    pvs: dict[str, dict[str, Any]]
    lvs: list[LogicalVolume]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "seqno": self.seqno,
            "extent_size": self.extent_size,
            "pvs": [
                {
                    "name": k,
                    "uuid": v.get("id"),
                    "pe_start": v.get("pe_start"),
                    "pe_count": v.get("pe_count"),
                }
                for k, v in self.pvs.items()
            ],
            "lvs": [lv.to_dict() for lv in self.lvs],
        }


def find_label(f: BinaryIO, offset: int, size: int) -> PVLabel | None:
    """The PV label of the region at `offset`, or None if the region is not an LVM2 PV."""
    if size < 4 * SECTOR:
        return None
    f.seek(offset)
    head = f.read(4 * SECTOR)
    for s in range(4):
        sec = head[s * SECTOR : (s + 1) * SECTOR]
        if sec[:8] != LABEL_ID:
            continue
        sector_xl, crc, off_xl = struct.unpack_from("<QII", sec, 8)
        if sec[24:32] != LABEL_TYPE:
            raise ImageError(f"unsupported LVM label type {sec[24:32]!r}", hint="only LVM2 is supported")
        if sector_xl != s or lvm_crc(sec[20:]) != crc:
            raise ImageError("LVM label checksum does not match", hint=HINT_DAMAGED)
        if not 32 <= off_xl <= SECTOR - 40:
            raise ImageError("LVM label points outside its sector", hint=HINT_DAMAGED)
        pvh = sec[off_xl:]
        pv_uuid = _fmt_uuid(pvh[:32])
        (dev_size,) = struct.unpack_from("<Q", pvh, 32)
        pos = 40
        lists: list[list[tuple[int, int]]] = [[], []]
        for which in range(2):
            while True:
                if pos + 16 > len(pvh):
                    raise ImageError("LVM PV header runs past its sector", hint=HINT_DAMAGED)
                o, n = struct.unpack_from("<QQ", pvh, pos)
                pos += 16
                if o == 0 and n == 0:
                    break
                lists[which].append((o, n))
        return PVLabel(offset, size, pv_uuid, dev_size, lists[0], lists[1])
    return None


def read_metadata_text(f: BinaryIO, pv: PVLabel) -> str:
    """The newest metadata text found in the PV's metadata areas (CRC-checked)."""
    if not pv.metadata_areas:
        raise ImageError(
            "LVM PV has no metadata area on this disk",
            hint="the VG's metadata lives on another disk; vmtool reads single-disk VGs only",
        )
    best: tuple[int, str] | None = None
    errors = []
    for mda_off, mda_size in pv.metadata_areas:
        if mda_off + mda_size > pv.size or mda_size < 2 * SECTOR:
            errors.append("metadata area lies outside the PV")
            continue
        f.seek(pv.offset + mda_off)
        hdr = f.read(SECTOR)
        (crc,) = struct.unpack_from("<I", hdr, 0)
        if hdr[4:20] != MDA_MAGIC or lvm_crc(hdr[4:SECTOR]) != crc:
            errors.append("metadata area header is damaged")
            continue
        version, start, size = struct.unpack_from("<IQQ", hdr, 20)
        if version != 1 or start != mda_off or size != mda_size:
            errors.append("metadata area header does not match the PV header")
            continue
        r_off, r_size, r_crc, _flags = struct.unpack_from("<QQII", hdr, 40)
        if r_off == 0 and r_size == 0:
            continue
        if r_size > MAX_METADATA or r_size > mda_size - SECTOR or not SECTOR <= r_off < mda_size:
            errors.append("metadata text location is out of bounds")
            continue
        first = min(r_size, mda_size - r_off)
        f.seek(pv.offset + mda_off + r_off)
        data = f.read(first)
        if first < r_size:  # wraps to just after the mda header
            f.seek(pv.offset + mda_off + SECTOR)
            data += f.read(r_size - first)
        if len(data) != r_size or lvm_crc(data) != r_crc:
            errors.append("metadata text checksum does not match")
            continue
        text = data.rstrip(b"\0").decode("utf-8", errors="replace")
        seq = _seqno(text)
        if best is None or seq > best[0]:
            best = (seq, text)
    if best is None:
        raise ImageError(
            f"LVM metadata is unreadable: {'; '.join(errors) or 'no metadata found'}", hint=HINT_DAMAGED
        )
    return best[1]


def _seqno(text: str) -> int:
    m = re.search(r"\bseqno\s*=\s*(\d+)", text)
    return int(m.group(1)) if m else -1


# --- the metadata text format (lvm2 lib/config: sections, key = value, arrays) ---

_TOKEN = re.compile(
    r'\s+|#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<id>[A-Za-z0-9_.+\-]+)|(?P<op>[={}\[\],])'
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ImageError(f"LVM metadata does not parse near {text[pos : pos + 20]!r}", hint=HINT_DAMAGED)
        pos = m.end()
        kind = m.lastgroup
        if kind is None:
            continue
        tok = m.group(kind)
        if kind == "str":
            tok = re.sub(r"\\(.)", r"\1", tok[1:-1])
        out.append((kind, tok))
    return out


def parse_config(text: str) -> dict[str, Any]:
    toks = _tokens(text)
    pos = 0

    def fail(what: str) -> ImageError:
        near = " ".join(t for _, t in toks[max(0, pos - 3) : pos + 2])
        return ImageError(f"LVM metadata does not parse: {what} near {near!r}", hint=HINT_DAMAGED)

    def value() -> Any:
        nonlocal pos
        if pos >= len(toks):
            raise fail("unexpected end")
        kind, tok = toks[pos]
        if kind == "op" and tok == "[":
            pos += 1
            items: list[Any] = []
            while True:
                if pos >= len(toks):
                    raise fail("unterminated array")
                k, t = toks[pos]
                if k == "op" and t == "]":
                    pos += 1
                    return items
                if k == "op" and t == ",":
                    pos += 1
                    continue
                if k == "op":
                    raise fail(f"unexpected {t!r} in array")
                items.append(_scalar(k, t))
                pos += 1
        if kind == "op":
            raise fail(f"unexpected {tok!r}")
        pos += 1
        return _scalar(kind, tok)

    def section(depth: int, closing: bool) -> dict[str, Any]:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise fail("sections nested too deeply")
        d: dict[str, Any] = {}
        while pos < len(toks):
            kind, tok = toks[pos]
            if kind == "op" and tok == "}":
                if not closing:
                    raise fail("unbalanced '}'")
                pos += 1
                return d
            if kind not in ("id", "num", "str"):
                raise fail(f"unexpected {tok!r}")
            pos += 1
            if pos >= len(toks):
                raise fail("unexpected end")
            k2, t2 = toks[pos]
            if k2 == "op" and t2 == "=":
                pos += 1
                d[tok] = value()
            elif k2 == "op" and t2 == "{":
                pos += 1
                d[tok] = section(depth + 1, True)
            else:
                raise fail(f"expected '=' or '{{' after {tok!r}")
        if closing:
            raise fail("missing '}'")
        return d

    return section(0, False)


def _scalar(kind: str, tok: str) -> Any:
    if kind == "num":
        return float(tok) if "." in tok else int(tok)
    return tok


def _int(d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or v < 0:
        raise ImageError(f"LVM metadata: {where} has no valid {key}", hint=HINT_DAMAGED)
    return v


def parse_vg(text: str, pvs_on_disk: dict[str, PVLabel]) -> VolumeGroup:
    """The VG described by metadata `text`, with each LV mapped to disk extents where supported."""
    cfg = parse_config(text)
    vgs = [(k, v) for k, v in cfg.items() if isinstance(v, dict)]
    if len(vgs) != 1:
        raise ImageError("LVM metadata does not describe exactly one volume group", hint=HINT_DAMAGED)
    vg_name, vg = vgs[0]
    extent_size = _int(vg, "extent_size", f"VG {vg_name}") * SECTOR
    if extent_size == 0:
        raise ImageError(f"LVM metadata: VG {vg_name} has extent_size 0", hint=HINT_DAMAGED)
    pvs = vg.get("physical_volumes")
    if not isinstance(pvs, dict) or not pvs:
        raise ImageError(f"LVM metadata: VG {vg_name} lists no physical volumes", hint=HINT_DAMAGED)
    pv_map: dict[str, dict[str, Any]] = {}
    for name, pv in pvs.items():
        if not isinstance(pv, dict):
            raise ImageError(f"LVM metadata: PV {name} is malformed", hint=HINT_DAMAGED)
        info = dict(pv)
        _int(pv, "pe_start", f"PV {name}")
        _int(pv, "pe_count", f"PV {name}")
        label = pvs_on_disk.get(str(pv.get("id", "")))
        info["label"] = label
        if label is not None:
            end = pv["pe_start"] * SECTOR + pv["pe_count"] * extent_size
            if end > label.size:
                raise ImageError(
                    f"LVM PV {name} of VG {vg_name} claims {end} bytes but its partition holds {label.size}",
                    hint="the image is truncated or the LVM metadata is damaged",
                )
        pv_map[name] = info
    lvs: list[LogicalVolume] = []
    for lv_name, lv in (vg.get("logical_volumes") or {}).items():
        if not isinstance(lv, dict):
            raise ImageError(f"LVM metadata: LV {lv_name} is malformed", hint=HINT_DAMAGED)
        segs: list[LVSegment] = []
        unsupported = ""
        for key in sorted(
            (k for k in lv if k.startswith("segment") and isinstance(lv[k], dict)),
            key=lambda k: int(k[7:]) if k[7:].isdigit() else 0,
        ):
            s = lv[key]
            seg = LVSegment(
                _int(s, "start_extent", f"LV {lv_name}"),
                _int(s, "extent_count", f"LV {lv_name}"),
                str(s.get("type", "")),
            )
            if seg.type == "striped":
                seg.stripe_count = _int(s, "stripe_count", f"LV {lv_name}")
                stripes = s.get("stripes")
                if (
                    seg.stripe_count == 1
                    and isinstance(stripes, list)
                    and len(stripes) == 2
                    and isinstance(stripes[1], int)
                ):
                    seg.pv, seg.pv_extent = str(stripes[0]), stripes[1]
                elif seg.stripe_count != 1:
                    unsupported = f"striped over {seg.stripe_count} PVs"
                else:
                    raise ImageError(
                        f"LVM metadata: LV {lv_name} has a malformed stripes list", hint=HINT_DAMAGED
                    )
            else:
                unsupported = f"segment type {seg.type!r}"
            segs.append(seg)
        status = [str(x) for x in lv.get("status", [])] if isinstance(lv.get("status"), list) else []
        out = LogicalVolume(
            vg_name, lv_name, str(lv.get("id", "")), status, segs, extent_size, unsupported=unsupported
        )
        if not unsupported:
            out.extents = _map(out, pv_map, vg_name)
            if not out.extents and segs:
                out.unsupported = "its PV is not on this disk"
        lvs.append(out)
    return VolumeGroup(
        vg_name, str(vg.get("id", "")), int(vg.get("seqno", 0) or 0), extent_size, pv_map, lvs
    )


def _map(lv: LogicalVolume, pv_map: dict[str, dict[str, Any]], vg: str) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    expect = 0
    for seg in sorted(lv.segments, key=lambda s: s.start_extent):
        if seg.start_extent != expect:
            raise ImageError(
                f"LVM metadata: LV {vg}/{lv.name} has a gap or overlap in its segments", hint=HINT_DAMAGED
            )
        expect += seg.extent_count
        pv = pv_map.get(seg.pv)
        if pv is None:
            raise ImageError(
                f"LVM metadata: LV {vg}/{lv.name} names unknown PV {seg.pv!r}", hint=HINT_DAMAGED
            )
        label = pv["label"]
        if label is None:
            return []
        if seg.pv_extent + seg.extent_count > pv["pe_count"]:
            raise ImageError(
                f"LV {vg}/{lv.name}: extents {seg.pv_extent}-{seg.pv_extent + seg.extent_count - 1} lie outside "
                f"PV {seg.pv} ({pv['pe_count']} extents)",
                hint="the LVM metadata is damaged or the image is truncated; give the original image",
            )
        start = label.offset + pv["pe_start"] * SECTOR + seg.pv_extent * lv.extent_size
        length = seg.extent_count * lv.extent_size
        if pieces and pieces[-1][0] + pieces[-1][1] == start:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + length)
        else:
            pieces.append((start, length))
    return pieces


def read_vgs(f: BinaryIO, labels: list[PVLabel]) -> list[VolumeGroup]:
    """All VGs whose metadata is on these PVs (one entry per VG, newest metadata wins)."""
    by_uuid = {pv.uuid: pv for pv in labels}
    texts: dict[str, tuple[int, str]] = {}
    for pv in labels:
        if not pv.metadata_areas:
            continue
        text = read_metadata_text(f, pv)
        cfg_name = _vg_name(text)
        seq = _seqno(text)
        if cfg_name not in texts or seq > texts[cfg_name][0]:
            texts[cfg_name] = (seq, text)
    return [parse_vg(text, by_uuid) for _seq, text in texts.values()]


def _vg_name(text: str) -> str:
    m = re.search(r"^\s*([A-Za-z0-9_.+\-]+)\s*\{", text, re.M)
    if not m:
        raise ImageError("LVM metadata does not parse: no volume group section", hint=HINT_DAMAGED)
    return m.group(1)
