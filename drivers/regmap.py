"""Declarative register maps for non-SunSpec devices: one TOML file per device type.

A map says where each value a nature needs lives, so adding a device is adding data::

    [device]
    kind = "meter"              # the nature it feeds (only "meter" so far)
    manufacturer = "Eastron"
    model = "SDM630-Modbus V2"
    function = "input"          # default table: "input" (FC04) or "holding" (FC03)
    word_order = "big"          # 32-bit values: "big" = high word first, "little" = low first
    max_read = 80               # registers per request the device accepts (<= 125)
    max_gap = 40                # unused registers a read may span to save a request

    [points.site_w]             # a nature field (see FIELDS); the table key is the field
    address = 0x0034            # protocol address (0-based, as on the wire)
    type = "float32"            # int16 | uint16 | int32 | uint32 | float32
    scale = 1.0                 # value = raw * scale (a negative scale flips a sign convention)
    unit = "W"
    label = "Total system power"
    function = "input"          # optional, overrides [device].function

    [writes.demand_period_min]  # optional write points (always holding registers, FC16)
    address = 0x0002
    type = "float32"
    min = 0                     # optional bounds, checked before anything goes on the wire
    max = 60

:func:`load_map` validates a file and raises :class:`RegisterMapError` naming the file, the table
and the key. :class:`MappedMeter` is the generic :class:`~drivers.natures.Meter` built from one.
"""

from __future__ import annotations

import math
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from drivers.clock import Clock, WallClock
from drivers.modbus import MAX_READ, WriteRefused
from drivers.natures import DeviceError, DeviceRejected, MeterReading

MAPS_DIR = Path(__file__).parent / "maps"

TYPES: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}

#: Nature fields a map may feed, per kind; ``required`` must be present.
FIELDS: dict[str, dict[str, bool]] = {
    "meter": {
        "site_w": True,
        "phase_a_w": False,
        "phase_b_w": False,
        "phase_c_w": False,
        "import_wh": False,
        "export_wh": False,
        "voltage_v": False,
        "freq_hz": False,
    },
}

_DEVICE_KEYS = {"kind", "manufacturer", "model", "function", "word_order", "max_read", "max_gap",
                "notes"}
_POINT_KEYS = {"address", "type", "scale", "unit", "label", "function"}
_WRITE_KEYS = {"address", "type", "scale", "unit", "label", "min", "max"}

Function = Literal["holding", "input"]


class RegisterMapError(ValueError):
    """A register map file is invalid; the message names the file, table and key."""


class MapLink(Protocol):
    """What a mapped device needs from a link (a :class:`~drivers.modbus.ModbusLink`)."""

    name: str
    where: str

    async def read_holding(self, address: int, count: int) -> list[int]: ...

    async def read_input(self, address: int, count: int) -> list[int]: ...

    async def write_registers(self, address: int, values: Sequence[int]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MapPoint:
    """One register-mapped value."""

    name: str
    address: int
    type: str
    function: Function
    scale: float = 1.0
    unit: str = ""
    label: str = ""
    min: float | None = None
    max: float | None = None

    @property
    def size(self) -> int:
        return TYPES[self.type]


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A validated register map."""

    source: str
    kind: str
    manufacturer: str
    model: str
    word_order: Literal["big", "little"]
    max_read: int
    max_gap: int
    points: dict[str, MapPoint]
    writes: dict[str, MapPoint]


# --------------------------------------------------------------------------- loading

def resolve_map_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a shipped map (``"sdm630"``)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in name_or_path:
        return p
    return MAPS_DIR / f"{name_or_path}.toml"


def shipped_maps() -> list[str]:
    """Names of the maps shipped in ``drivers/maps``."""
    return sorted(p.stem for p in MAPS_DIR.glob("*.toml"))


def load_map(name_or_path: str) -> RegisterMap:
    """Load and validate a map file (or a shipped map by name)."""
    path = resolve_map_path(name_or_path)
    src = path.name
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegisterMapError(
            f"{path}: no such register map (shipped maps: {', '.join(shipped_maps())})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise RegisterMapError(f"{src}: not valid TOML: {e}") from None
    return parse_map(doc, src)


def _err(src: str, table: str, key: str | None, msg: str) -> RegisterMapError:
    where = f"[{table}]" + (f" key {key!r}" if key else "")
    return RegisterMapError(f"{src}: {where}: {msg}")


def _int(src: str, table: str, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(src, table, key, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise _err(src, table, key, f"must be {lo}..{hi}, got {v}")
    return v


def _num(src: str, table: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _err(src, table, key, f"must be a finite number, got {v!r}")
    return float(v)


def _str(src: str, table: str, key: str, v: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(v, str):
        raise _err(src, table, key, f"must be a string, got {v!r}")
    if choices is not None and v not in choices:
        raise _err(src, table, key, f"{v!r} is not one of {', '.join(choices)}")
    return v


def _point(src: str, table: str, name: str, raw: Any, default_fn: str, write: bool) -> MapPoint:
    if not isinstance(raw, dict):
        raise _err(src, table, None, "must be a table")
    allowed = _WRITE_KEYS if write else _POINT_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(src, table, unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for k in ("address", "type"):
        if k not in raw:
            raise _err(src, table, k, "missing")
    ptype = _str(src, table, "type", raw["type"], list(TYPES))
    addr = _int(src, table, "address", raw["address"], 0, 0x10000 - TYPES[ptype])
    fn = "holding" if write else _str(src, table, "function", raw.get("function", default_fn),
                                      ["holding", "input"])
    scale = _num(src, table, "scale", raw.get("scale", 1.0))
    if scale == 0:
        raise _err(src, table, "scale", "must not be 0")
    lo = _num(src, table, "min", raw["min"]) if "min" in raw else None
    hi = _num(src, table, "max", raw["max"]) if "max" in raw else None
    if lo is not None and hi is not None and lo > hi:
        raise _err(src, table, "min", f"min {lo:g} > max {hi:g}")
    return MapPoint(
        name=name,
        address=addr,
        type=ptype,
        function=fn,  # type: ignore[arg-type]
        scale=scale,
        unit=_str(src, table, "unit", raw.get("unit", "")),
        label=_str(src, table, "label", raw.get("label", "")),
        min=lo,
        max=hi,
    )


def parse_map(doc: Mapping[str, Any], src: str = "<map>") -> RegisterMap:
    """Validate a parsed TOML document."""
    unknown = sorted(set(doc) - {"device", "points", "writes"})
    if unknown:
        raise _err(src, unknown[0], None, "unknown table (allowed: device, points, writes)")
    dev = doc.get("device")
    if not isinstance(dev, dict):
        raise _err(src, "device", None, "missing table")
    bad = sorted(set(dev) - _DEVICE_KEYS)
    if bad:
        allowed = ", ".join(sorted(_DEVICE_KEYS))
        raise _err(src, "device", bad[0], f"unknown key (allowed: {allowed})")
    if "kind" not in dev:
        raise _err(src, "device", "kind", "missing")
    kind = _str(src, "device", "kind", dev["kind"], list(FIELDS))
    fn = _str(src, "device", "function", dev.get("function", "holding"), ["holding", "input"])
    wo = _str(src, "device", "word_order", dev.get("word_order", "big"), ["big", "little"])
    max_read = _int(src, "device", "max_read", dev.get("max_read", MAX_READ), 1, MAX_READ)
    max_gap = _int(src, "device", "max_gap", dev.get("max_gap", 0), 0, MAX_READ)
    raw_points = doc.get("points")
    if not isinstance(raw_points, dict) or not raw_points:
        raise _err(src, "points", None, "missing or empty: a map needs at least one point")
    fields = FIELDS[kind]
    points: dict[str, MapPoint] = {}
    for pname, raw in raw_points.items():
        if pname not in fields:
            raise _err(src, f"points.{pname}", None,
                       f"not a {kind} field (fields: {', '.join(fields)})")
        points[pname] = _point(src, f"points.{pname}", pname, raw, fn, write=False)
    for f, required in fields.items():
        if required and f not in points:
            raise _err(src, f"points.{f}", None, f"missing: a {kind} needs {f}")
    writes: dict[str, MapPoint] = {}
    raw_writes = doc.get("writes", {})
    if not isinstance(raw_writes, dict):
        raise _err(src, "writes", None, "must be a table of tables")
    for wname, raw in raw_writes.items():
        writes[wname] = _point(src, f"writes.{wname}", wname, raw, "holding", write=True)
    _check_overlaps(src, list(points.values()) + list(writes.values()))
    return RegisterMap(
        source=src,
        kind=kind,
        manufacturer=str(dev.get("manufacturer", "")),
        model=str(dev.get("model", "")),
        word_order=wo,  # type: ignore[arg-type]
        max_read=max_read,
        max_gap=max_gap,
        points=points,
        writes=writes,
    )


def _check_overlaps(src: str, pts: list[MapPoint]) -> None:
    for fn in ("holding", "input"):
        prev: MapPoint | None = None
        for p in sorted((p for p in pts if p.function == fn), key=lambda p: p.address):
            if prev is not None and p.address < prev.address + prev.size and (
                p.address != prev.address or p.type != prev.type
            ):
                raise RegisterMapError(
                    f"{src}: {p.name} at {fn} {p.address} overlaps {prev.name} at {prev.address}"
                )
            prev = p


# --------------------------------------------------------------------------- codec (pure)

def decode_value(regs: Sequence[int], ptype: str, word_order: str = "big") -> float | None:
    """Registers to a number; a float32 NaN/inf reads as None."""
    words = list(regs) if word_order == "big" or len(regs) == 1 else list(reversed(regs))
    raw = b"".join(struct.pack(">H", w & 0xFFFF) for w in words)
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}[ptype]
    v = struct.unpack(fmt, raw)[0]
    if ptype == "float32" and not math.isfinite(v):
        return None
    return float(v)


def encode_value(value: float, ptype: str, word_order: str = "big") -> list[int]:
    """A number to registers; raises ValueError if it does not fit the type."""
    if ptype == "float32":
        raw = struct.pack(">f", value)
    else:
        iv = round(value)
        fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I"}[ptype]
        try:
            raw = struct.pack(fmt, iv)
        except struct.error:
            raise ValueError(f"{value:g} does not fit {ptype}") from None
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return words if word_order == "big" else list(reversed(words))


def plan_map_reads(
    pts: Sequence[MapPoint], max_read: int, max_gap: int
) -> list[tuple[Function, int, int, list[MapPoint]]]:
    """Coalesce points into reads ``(function, start, count, points)``."""
    out: list[tuple[Function, int, int, list[MapPoint]]] = []
    for fn in ("holding", "input"):
        cur: list[MapPoint] = []
        start = end = 0
        for p in sorted((p for p in pts if p.function == fn), key=lambda p: p.address):
            p_end = p.address + p.size
            if cur and p.address - end <= max_gap and max(end, p_end) - start <= max_read:
                cur.append(p)
                end = max(end, p_end)
                continue
            if cur:
                out.append((fn, start, end - start, cur))
            cur, start, end = [p], p.address, p_end
        if cur:
            out.append((fn, start, end - start, cur))
    return out


# --------------------------------------------------------------------------- devices

class MappedDevice:
    """A device read and written through a :class:`RegisterMap`."""

    def __init__(self, link: MapLink, rmap: RegisterMap, *, name: str | None = None,
                 clock: Clock | None = None) -> None:
        self.link = link
        self.map = rmap
        self.name = name or link.name
        self.clock: Clock = clock or WallClock()
        self._plan = plan_map_reads(list(rmap.points.values()), rmap.max_read, rmap.max_gap)


    async def close(self) -> None:
        """Close the device's Modbus connection."""
        await self.link.close()
    async def read_values(self) -> dict[str, float | None]:
        """All mapped points, scaled."""
        out: dict[str, float | None] = {}
        for fn, start, count, pts in self._plan:
            if fn == "input":
                regs = await self.link.read_input(start, count)
            else:
                regs = await self.link.read_holding(start, count)
            for p in pts:
                i = p.address - start
                v = decode_value(regs[i : i + p.size], p.type, self.map.word_order)
                out[p.name] = None if v is None else v * p.scale
        return out

    async def write(self, name: str, value: float) -> float:
        """Write a map write point (scaled), read it back and verify; returns the read-back."""
        p = self.map.writes.get(name)
        if p is None:
            raise WriteRefused(self.name, f"{self.map.source} has no write point {name!r} "
                                          f"(has: {', '.join(self.map.writes) or 'none'})")
        if not math.isfinite(value) or (p.min is not None and value < p.min) or (
            p.max is not None and value > p.max
        ):
            raise WriteRefused(self.name, f"{name}: {value:g} outside "
                                          f"{p.min if p.min is not None else '-inf'}.."
                                          f"{p.max if p.max is not None else 'inf'}")
        try:
            regs = encode_value(value / p.scale, p.type, self.map.word_order)
        except ValueError as e:
            raise WriteRefused(self.name, f"{name}: {e}") from None
        await self.link.write_registers(p.address, regs)
        back_regs = await self.link.read_holding(p.address, p.size)
        back = decode_value(back_regs, p.type, self.map.word_order)
        back_v = None if back is None else back * p.scale
        want = decode_value(regs, p.type, self.map.word_order)
        if back is None or want is None or not math.isclose(back, want, rel_tol=1e-6,
                                                             abs_tol=1e-9):
            raise DeviceRejected(self.name, f"write of {name} did not read back: wrote "
                                            f"{value:g}, read {back_v!r}")
        assert back_v is not None
        return back_v


class MappedMeter(MappedDevice):
    """A :class:`~drivers.natures.Meter` from a register map of kind ``meter``."""

    kind = "meter"

    def __init__(self, link: MapLink, rmap: RegisterMap, *, name: str | None = None,
                 clock: Clock | None = None) -> None:
        if rmap.kind != "meter":
            raise RegisterMapError(f"{rmap.source}: kind {rmap.kind!r} is not a meter")
        super().__init__(link, rmap, name=name, clock=clock)

    async def read(self) -> MeterReading:
        v = await self.read_values()
        site = v.get("site_w")
        if site is None:
            raise DeviceError(self.name, f"site_w reads as not-a-number on {self.link.where}")
        return MeterReading(
            ts=self.clock.now(),
            site_w=site,
            phases_w=(v.get("phase_a_w"), v.get("phase_b_w"), v.get("phase_c_w")),
            import_wh=v.get("import_wh"),
            export_wh=v.get("export_wh"),
            voltage_v=v.get("voltage_v"),
            freq_hz=v.get("freq_hz"),
        )
