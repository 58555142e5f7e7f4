"""SunSpec register images, built from the official model definitions.

A device image is ``SunS`` at the base address, then a chain of models (ID, L, points...), then
the end marker (0xFFFF, 0). Points not given a value hold their "not implemented" sentinel, as a
real device that does not implement them would. :class:`RegisterImage` keeps the absolute
address of every point so that the physics can update values by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from drivers.sunspec.models import (
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDef,
    PointDef,
    decode_raw,
    encode_raw,
    load_model,
    scale,
    unscale,
)


@dataclass
class ModelBlock:
    """One model placed in an image."""

    mdef: ModelDef
    address: int  # absolute address of the ID register

    def addr(self, point: str) -> int:
        return self.address + self.mdef.point(point).offset


@dataclass
class RegisterImage:
    """A flat register array starting at ``base`` plus the model placement."""

    base: int
    regs: list[int]
    models: list[ModelBlock] = field(default_factory=list)
    # (model id, point) -> (definition, index into regs); filled on first use, because the
    # simulated devices look points up on every poll.
    _loc: dict[tuple[int, str], tuple[PointDef, int]] = field(
        default_factory=dict, repr=False, compare=False
    )

    # ---- placement -------------------------------------------------------------------------
    def model(self, model_id: int) -> ModelBlock:
        for m in self.models:
            if m.mdef.id == model_id:
                return m
        raise KeyError(f"image has no model {model_id}")

    def has_model(self, model_id: int) -> bool:
        return any(m.mdef.id == model_id for m in self.models)

    def locate(self, model_id: int, point: str) -> tuple[PointDef, int]:
        """A point's definition and its index in :attr:`regs`."""
        key = (model_id, point)
        hit = self._loc.get(key)
        if hit is None:
            blk = self.model(model_id)
            p = blk.mdef.point(point)
            hit = self._loc[key] = (p, blk.address + p.offset - self.base)
        return hit

    def span(self, model_id: int) -> tuple[int, int]:
        """Absolute register addresses ``[start, end)`` of a model (ID and L included)."""
        blk = self.model(model_id)
        return blk.address, blk.address + blk.mdef.fixed_size

    @property
    def end(self) -> int:
        """First absolute address after the image (after the end marker)."""
        return self.base + len(self.regs)

    # ---- raw access --------------------------------------------------------------------------
    def get_raw(self, model_id: int, point: str) -> int | float | str | None:
        p, i = self.locate(model_id, point)
        return decode_raw(p, self.regs[i : i + p.size])

    def set_raw(self, model_id: int, point: str, value: int | float | str | None) -> None:
        p, i = self.locate(model_id, point)
        self.regs[i : i + p.size] = encode_raw(p, value)

    # ---- scaled access -----------------------------------------------------------------------
    def sf_of(self, model_id: int, point: str) -> int | None:
        p, _ = self.locate(model_id, point)
        if p.sf is None:
            return 0
        if isinstance(p.sf, int):
            return p.sf
        v = self.get_raw(model_id, p.sf)
        return None if v is None else int(v)

    def get(self, model_id: int, point: str) -> float | None:
        return scale(self.get_raw(model_id, point), self.sf_of(model_id, point))  # type: ignore[arg-type]

    def set(self, model_id: int, point: str, value: float | None) -> None:
        """Set a scaled value, clamped to the point type's range (a real device saturates)."""
        if value is None:
            self.set_raw(model_id, point, None)
            return
        sf = self.sf_of(model_id, point) or 0
        p, _ = self.locate(model_id, point)
        raw = unscale(value, sf)
        lo, hi = raw_range(p.type)
        self.set_raw(model_id, point, min(max(raw, lo), hi))


def raw_range(ptype: str) -> tuple[int, int]:
    """Largest valid raw range of a type, excluding its "not implemented" sentinel."""
    return {
        "int16": (-0x7FFF, 0x7FFF),
        "uint16": (0, 0xFFFE),
        "acc16": (0, 0xFFFF),
        "enum16": (0, 0xFFFE),
        "bitfield16": (0, 0x7FFF),
        "int32": (-0x7FFFFFFF, 0x7FFFFFFF),
        "uint32": (0, 0xFFFFFFFE),
        "acc32": (0, 0xFFFFFFFF),
        "enum32": (0, 0xFFFFFFFE),
        "bitfield32": (0, 0x7FFFFFFF),
    }.get(ptype, (-(1 << 62), 1 << 62))


_raw_range = raw_range  # the earlier private name


def build_image(
    models: Sequence[tuple[int, Mapping[str, int | float | str | None]]],
    base: int = 40000,
) -> RegisterImage:
    """Lay out ``models`` as (model id, {point: RAW value}) after the SunS marker at ``base``.

    Raw values are register integers (scale factors are points like any other: give them as
    raw exponents, e.g. ``{"W_SF": -1}``). The model's ID and L are filled in from the definition.
    """
    regs: list[int] = list(SUNS_MARKER)
    blocks: list[ModelBlock] = []
    for model_id, values in models:
        mdef = load_model(model_id)
        addr = base + len(regs)
        block = [0] * mdef.fixed_size
        for p in mdef.points:
            v: int | float | str | None
            if p.name == "ID":
                v = mdef.id
            elif p.name == "L":
                v = mdef.fixed_length
            else:
                v = values.get(p.name)
            block[p.offset : p.offset + p.size] = encode_raw(p, v)
        unknown = set(values) - {p.name for p in mdef.points}
        if unknown:
            raise KeyError(f"model {model_id} has no points {sorted(unknown)}")
        regs.extend(block)
        blocks.append(ModelBlock(mdef, addr))
    regs.extend([END_MODEL_ID, 0])
    return RegisterImage(base=base, regs=regs, models=blocks)
