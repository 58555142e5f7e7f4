"""``hems scan``: discover a SunSpec device and decode every model it maps, as JSON-able data."""

from __future__ import annotations

import math
from typing import Any

from drivers.sunspec.discovery import DEFAULT_BASES, discover
from drivers.sunspec.reader import RegisterLink, SunSpecReader, Value


def _json_value(v: Value) -> Value:
    # NaN/inf are not JSON; a float32 point reading them is as good as not implemented.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


async def scan(link: RegisterLink, bases: tuple[int, ...] = DEFAULT_BASES) -> dict[str, Any]:
    """Discover ``link``'s device and decode all its models.

    Returns ``{"device", "where", "base", "models": [{"id", "name", "address", "length",
    "known", "points": {name: scaled value or None}, "raw": {name: raw} (points with a scale
    factor only), "groups": {group: [{name: value}, ...]}}, ...]}``; unknown (vendor) models
    carry their raw registers as ``"registers"`` instead of points.
    """
    smap = await discover(link, bases)
    reader = SunSpecReader(link, smap)
    known = [m for m in smap.models if m.known]
    decoded = {mv.address: mv for mv in await reader.read_locations(known)}
    models: list[dict[str, Any]] = []
    for loc in smap.models:
        entry: dict[str, Any] = {
            "id": loc.id,
            "name": loc.name,
            "address": loc.address,
            "length": loc.length,
            "known": loc.known,
        }
        mv = decoded.get(loc.address)
        if mv is None:
            entry["registers"] = (
                await link.read_holding(loc.address + 2, loc.length) if loc.length else []
            )
        else:
            entry["points"] = {k: _json_value(v) for k, v in mv.values.items()}
            entry["raw"] = {k: _json_value(mv.raw[k]) for k in mv.sfs}
            if mv.groups:
                entry["groups"] = {
                    g: [{k: _json_value(v) for k, v in inst.items()} for inst in insts]
                    for g, insts in mv.groups.items()
                }
        models.append(entry)
    return {
        "device": link.name,
        "where": link.where,
        "base": smap.base,
        "models": models,
    }
