"""SunSpec model definitions, loaded from the official model JSON shipped by ``pysunspec2``.

No register offset is typed by hand anywhere in hems: every point's offset, type, size, scale
factor and access comes from these definitions. The same definitions decode registers in
:mod:`drivers` and build register images in :mod:`firmware_sim`.

Offsets are relative to the model's first register (the ``ID`` point), so the ``ID`` point has
offset 0, ``L`` offset 1, and a model occupies ``L + 2`` registers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

#: Register value(s) that mean "not implemented", per SunSpec type (SunSpec Information Model
#: Specification, "Unimplemented registers").
NOT_IMPLEMENTED: dict[str, int] = {
    "int16": 0x8000,
    "uint16": 0xFFFF,
    "count": 0x0000,  # not really a sentinel; count is always implemented
    "acc16": 0x0000,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "int32": 0x80000000,
    "uint32": 0xFFFFFFFF,
    "acc32": 0x00000000,
    "enum32": 0xFFFFFFFF,
    "bitfield32": 0xFFFFFFFF,
    "ipaddr": 0x00000000,
    "int64": 0x8000000000000000,
    "uint64": 0xFFFFFFFFFFFFFFFF,
    "acc64": 0x0000000000000000,
    "float32": 0x7FC00000,
    "sunssf": 0x8000,
    "pad": 0x8000,
}

SIGNED_TYPES = frozenset({"int16", "int32", "int64", "sunssf"})
NUMERIC_SIZES = {
    "int16": 1, "uint16": 1, "count": 1, "acc16": 1, "enum16": 1, "bitfield16": 1,
    "sunssf": 1, "pad": 1, "int32": 2, "uint32": 2, "acc32": 2, "enum32": 2,
    "bitfield32": 2, "ipaddr": 2, "float32": 2, "int64": 4, "uint64": 4, "acc64": 4,
}

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = 0xFFFF


class ModelDefinitionError(LookupError):
    """No official definition for a model id, or a malformed definition."""


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model (or of a repeating group instance)."""

    name: str
    type: str
    size: int  # registers
    offset: int  # registers from the model's ID register
    sf: str | int | None = None  # name of a sunssf point, or a fixed exponent
    units: str | None = None
    access: str = "R"
    mandatory: bool = False
    static: bool = False
    value: int | None = None  # fixed value in the definition (e.g. ID)
    symbols: dict[str, int] = field(default_factory=dict)
    label: str = ""

    @property
    def writable(self) -> bool:
        return self.access.upper() == "RW"


@dataclass(frozen=True, slots=True)
class GroupDef:
    """A repeating group: ``count`` is the name of a count point, or a fixed number."""

    name: str
    points: tuple[PointDef, ...]  # offsets relative to the group instance start
    count: str | int
    size: int


@dataclass(frozen=True, slots=True)
class ModelDef:
    """The fixed part of a model (``points``, offsets from ID) and its repeating groups."""

    id: int
    name: str
    label: str
    points: tuple[PointDef, ...]
    groups: tuple[GroupDef, ...]
    fixed_size: int  # registers of the fixed block, ID and L included

    @property
    def fixed_length(self) -> int:
        """The ``L`` value of the model without repeating-group instances."""
        return self.fixed_size - 2

    def point(self, name: str) -> PointDef:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"model {self.id} has no point {name!r}")

    def has_point(self, name: str) -> bool:
        return any(p.name == name for p in self.points)


def _point(raw: dict[str, Any], offset: int) -> PointDef:
    ptype = raw["type"]
    size = int(raw.get("size", NUMERIC_SIZES.get(ptype, 1)))
    sf = raw.get("sf")
    return PointDef(
        name=raw["name"],
        type=ptype,
        size=size,
        offset=offset,
        sf=int(sf) if isinstance(sf, int) else sf,
        units=raw.get("units"),
        access=raw.get("access", "R"),
        mandatory=raw.get("mandatory") == "M",
        static=raw.get("static") == "S",
        value=raw.get("value") if isinstance(raw.get("value"), int) else None,
        symbols={s["name"]: int(s["value"]) for s in raw.get("symbols", [])},
        label=raw.get("label", ""),
    )


def _points(raw_points: list[dict[str, Any]], start: int) -> tuple[tuple[PointDef, ...], int]:
    out = []
    offset = start
    for rp in raw_points:
        p = _point(rp, offset)
        out.append(p)
        offset += p.size
    return tuple(out), offset


def parse_model(doc: dict[str, Any]) -> ModelDef:
    """Build a :class:`ModelDef` from one official model JSON document."""
    group = doc["group"]
    points, end = _points(group["points"], 0)
    groups = []
    for g in group.get("groups", []):
        gpoints, gsize = _points(g["points"], 0)
        if g.get("groups"):
            # No model hems reads nests repeating groups; refuse rather than mis-decode.
            raise ModelDefinitionError(f"model {doc['id']}: nested groups are not supported")
        groups.append(GroupDef(g["name"], gpoints, g.get("count", 0), gsize))
    return ModelDef(
        id=int(doc["id"]),
        name=group["name"],
        label=group.get("label", ""),
        points=points,
        groups=tuple(groups),
        fixed_size=end,
    )


@cache
def load_model(model_id: int) -> ModelDef:
    """The official definition of ``model_id`` (cached)."""
    try:
        pkg = resources.files("sunspec2") / "models" / "json" / f"model_{int(model_id)}.json"
        text = pkg.read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelDefinitionError(f"no official SunSpec definition for model {model_id}") from e
    return parse_model(json.loads(text))


def model_available(model_id: int) -> bool:
    try:
        load_model(model_id)
    except ModelDefinitionError:
        return False
    return True


# --------------------------------------------------------------------------- raw <-> registers

def regs_to_int(regs: list[int] | tuple[int, ...], signed: bool) -> int:
    """Big-endian register words to an integer (SunSpec is big-endian, high word first)."""
    v = 0
    for r in regs:
        v = (v << 16) | (r & 0xFFFF)
    if signed and regs and v >= 1 << (16 * len(regs) - 1):
        v -= 1 << (16 * len(regs))
    return v


def int_to_regs(v: int, size: int) -> list[int]:
    bits = 16 * size
    v &= (1 << bits) - 1
    return [(v >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]


def is_not_implemented(ptype: str, regs: list[int] | tuple[int, ...]) -> bool:
    """True if ``regs`` hold the "not implemented" sentinel of ``ptype``."""
    if ptype == "string":
        return all(r == 0 for r in regs)
    if ptype == "float32":
        return math.isnan(struct.unpack(">f", struct.pack(">HH", *regs))[0])
    if ptype in ("count",):
        return False
    sentinel = NOT_IMPLEMENTED.get(ptype)
    if sentinel is None:
        return False
    return regs_to_int(regs, signed=False) == sentinel


def decode_raw(p: PointDef, regs: list[int] | tuple[int, ...]) -> int | float | str | None:
    """Decode one point's registers to its raw (unscaled) value; ``None`` if not implemented."""
    if len(regs) != p.size:
        raise ValueError(f"point {p.name}: expected {p.size} registers, got {len(regs)}")
    if is_not_implemented(p.type, regs):
        return None
    if p.type == "string":
        raw = b"".join(struct.pack(">H", r) for r in regs)
        return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    if p.type == "float32":
        v = float(struct.unpack(">f", struct.pack(">HH", *regs))[0])
        # +-inf is no reading either (NaN, the sentinel, was handled above).
        return v if math.isfinite(v) else None
    if p.type in ("ipv6addr", "eui48"):
        return "".join(f"{r:04x}" for r in regs)
    return regs_to_int(regs, signed=p.type in SIGNED_TYPES)


def encode_raw(p: PointDef, value: int | float | str | None) -> list[int]:
    """Encode a raw (unscaled) value to registers; ``None`` writes the sentinel."""
    if value is None:
        if p.type == "string":
            return [0] * p.size
        return int_to_regs(NOT_IMPLEMENTED.get(p.type, 0), p.size)
    if p.type == "string":
        b = str(value).encode("utf-8")[: 2 * p.size]
        b = b.ljust(2 * p.size, b"\x00")
        return [int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2)]
    if p.type == "float32":
        return list(struct.unpack(">HH", struct.pack(">f", float(value))))
    iv = int(value)
    bits = 16 * p.size
    if p.type in SIGNED_TYPES:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    if not lo <= iv <= hi:
        raise ValueError(f"point {p.name}: raw value {iv} out of range for {p.type}")
    return int_to_regs(iv, p.size)


def scale(raw: int | float | None, sf: int | None) -> float | None:
    """Apply a scale factor exponent. ``None`` in, or a missing scale factor, gives ``None``."""
    if raw is None or sf is None:
        return None
    return float(raw) * (10.0 ** sf)


def unscale(value: float, sf: int) -> int:
    """Scaled value to the nearest raw integer."""
    return round(value / (10.0 ** sf))
