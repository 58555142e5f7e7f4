"""Read and write SunSpec model blocks, decoded with the official definitions.

Reads are coalesced: the models wanted are sorted by address and read in spans of at most 125
registers (one Modbus request each), gaps between wanted models included, since one round trip
costs far more than a few extra registers. Every point is decoded with its scale factor; a
"not implemented" value, or a point whose scale factor is not implemented, is ``None``.
Repeating groups are decoded where the model's length holds them.

Writes are by point name in scaled units: each value is checked against the point's access
(``RW``), its type's range and its enumeration before anything goes on the wire
(:class:`WriteRefused`), encoded with the scale factor in force, written, then the model is
READ BACK and every written point compared: a device that silently clamps or ignores a write is
a :class:`~drivers.natures.DeviceRejected` naming the point, the value written and the value read.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

from drivers.modbus import WriteRefused
from drivers.natures import DeviceError, DeviceRejected
from drivers.sunspec.discovery import ModelLocation, SunSpecMap
from drivers.sunspec.models import (
    NOT_IMPLEMENTED,
    NUMERIC_SIZES,
    SIGNED_TYPES,
    ModelDef,
    ModelDefinitionError,
    PointDef,
    decode_raw,
    encode_raw,
    load_model,
)

MAX_SPAN = 125
SF_MIN, SF_MAX = -10, 10  # the SunSpec range of a sunssf

Value = int | float | str | None


class RegisterLink(Protocol):
    """What the reader needs from a link (a :class:`~drivers.modbus.ModbusLink`)."""

    name: str
    where: str

    async def read_holding(self, address: int, count: int) -> list[int]: ...

    async def write_registers(self, address: int, values: Sequence[int]) -> None: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- decoding (pure)

@dataclass(frozen=True, slots=True)
class ModelValues:
    """One decoded model block.

    ``values`` are scaled (a point with a scale factor is a float, or None if the point or its
    scale factor is not implemented; a point without one keeps its raw int/str); ``raw`` are the
    register values before scaling; ``groups`` holds the decoded repeating-group instances.
    """

    id: int
    address: int
    length: int
    name: str
    values: dict[str, Value]
    raw: dict[str, Value]
    sfs: dict[str, int | None] = field(default_factory=dict)  # point -> exponent in force
    groups: dict[str, list[dict[str, Value]]] = field(default_factory=dict)

    def __getitem__(self, point: str) -> Value:
        return self.values[point]

    def get(self, point: str) -> Value:
        return self.values.get(point)

    def num(self, point: str) -> float | None:
        """A numeric point as float (None if absent or not implemented)."""
        v = self.values.get(point)
        if v is None or isinstance(v, str):
            return None
        return float(v)


def _resolve_sf(p: PointDef, scope: Mapping[str, Value], outer: Mapping[str, Value]) -> int | None:
    """The exponent of ``p``: 0 without a scale factor, None if the sf is not implemented."""
    if p.sf is None:
        return 0
    if isinstance(p.sf, int):
        return p.sf
    v = scope.get(p.sf, outer.get(p.sf))
    if v is None or isinstance(v, str | float):
        return None
    if not SF_MIN <= v <= SF_MAX:
        # 10.0**32767 overflows, and +-11.. is no meter's scale: the device is garbling.
        raise ValueError(f"point {p.name}: scale factor {p.sf} = {v} outside "
                         f"{SF_MIN}..{SF_MAX}")
    return int(v)


# How one point decodes: (name, offset, size, sentinel, signed, needs_sf, point). ``size`` 0 means
# "not a plain integer": decode it with the generic :func:`decode_raw` (strings, floats,
# addresses, a definition whose size does not match its type).
_Step = tuple[str, int, int, int | None, bool, bool, PointDef]
_INT_SIZES = {t: n for t, n in NUMERIC_SIZES.items() if t != "float32"}
_plans: dict[int, tuple[object, tuple[_Step, ...]]] = {}
_PLANS_MAX = 1024  # models x poll selections in use are a few dozen


def _decode_plan(points: Iterable[PointDef]) -> tuple[_Step, ...]:
    """The steps decoding ``points``, kept per points tuple (a model's, a group's or a poll
    selection's: all long-lived, cached tuples). A poll decodes the same few points thousands of
    times a day; resolving each point's type, sentinel and sign once is most of the saving."""
    hit = _plans.get(id(points))
    if hit is not None and hit[0] is points:
        return hit[1]
    steps: list[_Step] = []
    for p in points:
        size = p.size if p.size == _INT_SIZES.get(p.type) else 0
        # "count" has a sentinel in the table but is always implemented (decode_raw's rule).
        sentinel = None if p.type == "count" else NOT_IMPLEMENTED.get(p.type)
        steps.append((p.name, p.offset, size, sentinel, p.type in SIGNED_TYPES,
                      p.sf is not None and p.type != "sunssf", p))
    plan = tuple(steps)
    # Bounded: a caller passing a fresh tuple per call would otherwise grow it without end.
    if isinstance(points, tuple) and len(_plans) < _PLANS_MAX:
        _plans[id(points)] = (points, plan)
    return plan


def _decode_points(
    points: Iterable[PointDef], regs: Sequence[int], start: int, outer: Mapping[str, Value]
) -> tuple[dict[str, Value], dict[str, Value], dict[str, int | None]]:
    raw: dict[str, Value] = {}
    plan = _decode_plan(points)
    n = len(regs)
    for name, off, size, sentinel, signed, _sf, p in plan:
        a = start + off
        # Integers inline (the same value as decode_raw, see the property test); anything else,
        # or a point running past the registers (decode_raw raises), the generic way.
        if size == 1 and a < n:
            u = regs[a] & 0xFFFF
            raw[name] = (None if u == sentinel
                         else u - 0x10000 if signed and u >= 0x8000 else u)
        elif size == 2 and a + 1 < n:
            u = ((regs[a] & 0xFFFF) << 16) | (regs[a + 1] & 0xFFFF)
            raw[name] = (None if u == sentinel
                         else u - 0x100000000 if signed and u >= 0x80000000 else u)
        else:
            raw[name] = decode_raw(p, list(regs[a : a + p.size]))
    values: dict[str, Value] = {}
    sfs: dict[str, int | None] = {}
    for name, _o, _s, _n, _g, needs_sf, p in plan:
        r = raw[name]
        if not needs_sf:
            values[name] = r
            continue
        sf = _resolve_sf(p, raw, outer)
        sfs[name] = sf
        if r is None or sf is None or isinstance(r, str):
            values[name] = None
        else:
            values[name] = apply_sf(r, sf)
    return values, raw, sfs


def apply_sf(raw: int | float, sf: int) -> float:
    """``raw * 10**sf``; dividing for negative exponents keeps 41 * 10**-1 == 4.1 exact-ish."""
    return float(raw) / 10.0**-sf if sf < 0 else float(raw) * 10.0**sf


def _group_counts(mdef: ModelDef, raw: Mapping[str, Value], extra: int) -> list[int]:
    counts: list[int] = []
    left = extra
    for i, g in enumerate(mdef.groups):
        if isinstance(g.count, str):
            c = raw.get(g.count)
            n = int(c) if isinstance(c, int) else 0
        elif g.count:
            n = int(g.count)
        elif i < len(mdef.groups) - 1:
            # A group without a count that is not the last one is a single fixed instance
            # (the definition loader maps "no count" to 0; only the last group may repeat).
            n = 1
        else:
            n = left // g.size if g.size else 0
        n = max(0, min(n, left // g.size if g.size else 0))
        counts.append(n)
        left -= n * g.size
    return counts


@cache
def _selection(model_id: int, only: frozenset[str]) -> tuple[PointDef, ...]:
    """The points named in ``only`` plus the scale factors they need, in map order."""
    mdef = load_model(model_id)
    unknown = only - {p.name for p in mdef.points}
    if unknown:
        raise ValueError(f"model {model_id} has no points {sorted(unknown)}")
    names = set(only)
    for p in mdef.points:
        if p.name in only and isinstance(p.sf, str):
            names.add(p.sf)
    return tuple(p for p in mdef.points if p.name in names)


def decode_model(
    loc: ModelLocation, regs: Sequence[int], only: Collection[str] | None = None
) -> ModelValues:
    """Decode a model block; ``regs`` start at the model's ID register.

    ``only`` restricts decoding to those points (and their scale factors), without repeating
    groups: a poll decodes the handful of points it uses, a scan decodes everything.
    """
    mdef = load_model(loc.id)
    if len(regs) < mdef.fixed_size:
        raise ValueError(
            f"model {loc.id} at {loc.address}: {len(regs)} registers, fixed block needs "
            f"{mdef.fixed_size}"
        )
    points = mdef.points if only is None else _selection(loc.id, frozenset(only))
    try:
        values, raw, sfs = _decode_points(points, regs, 0, {})
        groups: dict[str, list[dict[str, Value]]] = {}
        if mdef.groups and only is None:
            extra = min(len(regs), loc.size) - mdef.fixed_size
            off = mdef.fixed_size
            for g, n in zip(mdef.groups, _group_counts(mdef, raw, extra), strict=True):
                inst: list[dict[str, Value]] = []
                for _ in range(n):
                    gv, _gr, _gs = _decode_points(g.points, regs, off, raw)
                    inst.append(gv)
                    off += g.size
                groups[g.name] = inst
    except ValueError as e:
        raise ValueError(f"model {loc.id} at {loc.address}: {e}") from None
    return ModelValues(loc.id, loc.address, loc.length, mdef.name, values, raw, sfs, groups)


def plan_reads(
    locs: Iterable[ModelLocation], max_span: int = MAX_SPAN
) -> list[tuple[int, int, list[ModelLocation]]]:
    """Coalesce model blocks into reads ``(start, count, models)`` of at most ``max_span``
    registers (a single model larger than that is one read that the link splits)."""
    spans: list[tuple[int, int, list[ModelLocation]]] = []
    for loc in sorted(set(locs), key=lambda m: m.address):
        if spans:
            start, count, ms = spans[-1]
            end = start + count
            if loc.address >= end and loc.end - start <= max_span:
                spans[-1] = (start, loc.end - start, [*ms, loc])
                continue
        spans.append((loc.address, loc.size, [loc]))
    return spans


# --------------------------------------------------------------------------- encoding (pure)

_RAW_RANGE: dict[str, tuple[int, int]] = {
    # Valid raw ranges, "not implemented" sentinels excluded.
    "int16": (-0x7FFF, 0x7FFF),
    "uint16": (0, 0xFFFE),
    "count": (0, 0xFFFF),
    "acc16": (0, 0xFFFF),
    "enum16": (0, 0xFFFE),
    "bitfield16": (0, 0xFFFE),
    "int32": (-0x7FFFFFFF, 0x7FFFFFFF),
    "uint32": (0, 0xFFFFFFFE),
    "acc32": (0, 0xFFFFFFFF),
    "enum32": (0, 0xFFFFFFFE),
    "bitfield32": (0, 0xFFFFFFFE),
    "int64": (-0x7FFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF),
    "uint64": (0, 0xFFFFFFFFFFFFFFFE),
    "acc64": (0, 0xFFFFFFFFFFFFFFFF),
    "sunssf": (-10, 10),
}


def encode_point(
    p: PointDef, value: float | int | str, sf: int | None
) -> tuple[int | float | str, list[int]]:
    """``(raw, registers)`` for a scaled ``value``; raises ValueError naming the problem."""
    if p.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"{p.name} is a string point, got {value!r}")
        if len(value.encode("utf-8")) > 2 * p.size:
            raise ValueError(f"{p.name}: {value!r} longer than {2 * p.size} bytes")
        return value, encode_raw(p, value)
    if isinstance(value, str):
        raise ValueError(f"{p.name} is numeric ({p.type}), got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{p.name}: {value!r} is not a finite number")
    if p.type == "float32":
        return v, encode_raw(p, v)
    if p.sf is not None and sf is None:
        raise ValueError(f"{p.name}: its scale factor {p.sf} is not implemented by the device")
    exp = sf or 0
    raw = round(v / 10.0**exp)
    lo, hi = _RAW_RANGE.get(p.type, (-(1 << 62), 1 << 62))
    if not lo <= raw <= hi:
        unit = f" {p.units}" if p.units else ""
        raise ValueError(
            f"{p.name}: {value:g}{unit} out of range {lo * 10.0**exp:g}..{hi * 10.0**exp:g}"
            f" ({p.type}, sf {exp})"
        )
    if p.symbols and p.type.startswith("enum") and raw not in p.symbols.values():
        names = ", ".join(f"{k}={v}" for k, v in p.symbols.items())
        raise ValueError(f"{p.name}: {raw} is not one of its values ({names})")
    if p.symbols and p.type.startswith("bitfield"):
        allowed = 0
        for bit in p.symbols.values():
            allowed |= 1 << bit
        if raw & ~allowed:
            names = ", ".join(f"{k}=bit {v}" for k, v in p.symbols.items())
            raise ValueError(f"{p.name}: {raw:#x} sets bits outside ({names})")
    return raw, encode_raw(p, raw)


# --------------------------------------------------------------------------- I/O

class SunSpecReader:
    """Reads and writes models of one device, given its discovered :class:`SunSpecMap`."""

    def __init__(self, link: RegisterLink, smap: SunSpecMap, max_span: int = MAX_SPAN) -> None:
        self.link = link
        self.smap = smap
        self.max_span = max_span
        self.last: dict[int, ModelValues] = {}  # last decoded block per model id

    @property
    def name(self) -> str:
        return self.link.name

    def location(self, model_id: int) -> ModelLocation:
        loc = self.smap.find(model_id)
        if loc is None:
            raise DeviceError(
                self.link.name,
                f"{self.link.where} has no SunSpec model {model_id} (models: {self.smap.ids})",
            )
        if not loc.known:
            raise DeviceError(self.link.name, f"model {model_id} has no official definition")
        return loc

    async def read(
        self, *model_ids: int, points: Mapping[int, Collection[str]] | None = None
    ) -> dict[int, ModelValues]:
        """Read and decode the given models (coalesced), keyed by model id; ``points``
        optionally restricts decoding, per model id, to the points named."""
        locs = [self.location(i) for i in model_ids]
        return {mv.id: mv for mv in await self.read_locations(locs, points)}

    async def read_locations(
        self,
        locs: Iterable[ModelLocation],
        points: Mapping[int, Collection[str]] | None = None,
    ) -> list[ModelValues]:
        out: list[ModelValues] = []
        for start, count, models in plan_reads(locs, self.max_span):
            regs = await self.link.read_holding(start, count)
            for loc in models:
                a = loc.address - start
                block = regs[a : a + loc.size]
                if block[0] != loc.id:
                    raise DeviceError(
                        self.link.name,
                        f"model {loc.id} expected at {loc.address} on {self.link.where}, found "
                        f"id {block[0]}: the device's map changed, rediscover",
                    )
                only = points.get(loc.id) if points else None
                try:
                    mv = decode_model(loc, block, only)
                except (ValueError, ModelDefinitionError) as e:
                    raise DeviceError(self.link.name, f"cannot decode {e}") from None
                self.last[loc.id] = mv
                out.append(mv)
        return out

    async def write(self, model_id: int, values: Mapping[str, float | int | str]) -> ModelValues:
        """Write points of ``model_id`` by name (scaled values), in the order given, then read
        the model back and verify every point. Returns the read-back block."""
        loc = self.location(model_id)
        mdef = load_model(model_id)
        # 1. validate and encode everything before touching the wire
        for pname in values:
            if not mdef.has_point(pname):
                raise WriteRefused(self.link.name, f"model {model_id} has no point {pname!r}")
            if not mdef.point(pname).writable:
                raise WriteRefused(
                    self.link.name,
                    f"model {model_id} point {pname} is read-only ({mdef.point(pname).access})",
                )
        current = self.last.get(model_id)
        if current is None or any(n not in current.raw for n in values):
            current = (await self.read(model_id))[model_id]  # for the scale factors in force
        planned: list[tuple[PointDef, int | float | str, list[int], int | None]] = []
        for pname, v in values.items():
            p = mdef.point(pname)
            sf = current.sfs.get(pname, 0)
            try:
                raw, regs = encode_point(p, v, sf)
            except ValueError as e:
                raise WriteRefused(
                    self.link.name, f"refused write to model {model_id}: {e}"
                ) from None
            planned.append((p, raw, regs, sf))
        # 2. write, merging points adjacent both in the map and in the order given
        runs: list[tuple[int, list[int], list[str]]] = []
        for p, _raw, regs, _sf in planned:
            addr = loc.address + p.offset
            if runs and runs[-1][0] + len(runs[-1][1]) == addr:
                runs[-1][1].extend(regs)
                runs[-1][2].append(p.name)
            else:
                runs.append((addr, list(regs), [p.name]))
        for addr, regs, names in runs:
            try:
                await self.link.write_registers(addr, regs)
            except DeviceRejected as e:
                raise DeviceRejected(
                    self.link.name,
                    f"write of model {model_id} {', '.join(names)} rejected: {e.reason}",
                ) from None
        # 3. read back and verify
        back = (await self.read(model_id, points={model_id: list(values)}))[model_id]
        for p, raw, _regs, sf in planned:
            got = back.raw.get(p.name)
            same = got == raw if p.type != "float32" else _float_eq(got, raw)
            if not same or back.sfs.get(p.name, 0) != sf:
                wrote = values[p.name]
                raise DeviceRejected(
                    self.link.name,
                    f"write of model {model_id} {p.name} did not read back: wrote {wrote!r}, "
                    f"read {back.values.get(p.name)!r}",
                )
        return back


def _float_eq(a: Value, b: Value) -> bool:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return False
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)


__all__ = [
    "ModelValues",
    "SunSpecReader",
    "WriteRefused",  # re-exported from drivers.modbus
    "decode_model",
    "encode_point",
    "plan_reads",
]
