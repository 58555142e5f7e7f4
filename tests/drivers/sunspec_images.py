"""Register images for the driver tests: realistic devices via ``firmware_sim.image``, and a
low-level chain builder for malformed maps (short blocks, unknown models, no end marker)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from drivers.sunspec.models import END_MODEL_ID, SUNS_MARKER, PointDef, encode_raw, load_model
from firmware_sim.image import RegisterImage, build_image

RawValues = Mapping[str, int | float | str | None]

COMMON: tuple[int, RawValues] = (
    1, {"Mn": "hems", "Md": "test", "SN": "SN0001", "Vr": "1.0", "DA": 1}
)

INVERTER_MODELS: list[tuple[int, RawValues]] = [
    COMMON,
    (103, {
        "A": 123, "AphA": 41, "AphB": 41, "AphC": 41, "A_SF": -1,        # 12.3 A
        "PhVphA": 2301, "PhVphB": 2302, "PhVphC": 2299, "V_SF": -1,      # 230.1 V
        "W": 432, "W_SF": 1,                                             # 4320 W (positive SF)
        "Hz": 5001, "Hz_SF": -2,                                         # 50.01 Hz
        "PF": 950, "PF_SF": None,                                        # sf not implemented
        "WH": 12345678, "WH_SF": 0,
        "DCW": 455, "DCW_SF": 1,                                         # 4550 W
        "DCV": 6001, "DCV_SF": -1,
        "St": 4,
        # VA left unset: holds the int16 "not implemented" sentinel
    }),
    (120, {"DERTyp": 4, "WRtg": 5000, "WRtg_SF": 0, "VARtg": 5000, "VARtg_SF": 0}),
    (121, {"WMax": 500, "WMax_SF": 1}),                                  # 5000 W
    (123, {"WMaxLimPct": 1000, "WMaxLimPct_SF": -1, "WMaxLimPct_RvrtTms": 0,
           "WMaxLim_Ena": 0, "WMaxLimPct_WinTms": 0, "WMaxLimPct_RmpTms": 0}),
]

METER_MODELS: list[tuple[int, RawValues]] = [
    COMMON,
    (203, {
        "W": -1234, "WphA": -400, "WphB": -434, "WphC": -400, "W_SF": 0,  # exporting
        "PhV": 2300, "PhVphA": 2300, "PhVphB": 2301, "PhVphC": 2299, "V_SF": -1,
        "Hz": 4998, "Hz_SF": -2,
        "TotWhImp": 1234, "TotWhExp": 567, "TotWh_SF": 3,                 # kWh registers
        "A": 55, "A_SF": -1,
    }),
]

BATTERY_MODELS: list[tuple[int, RawValues]] = [
    COMMON,
    (124, {
        "WChaMax": 500, "WChaMax_SF": 1,                                 # 5000 W
        "StorCtl_Mod": 0, "MinRsvPct": 10, "MinRsvPct_SF": 0,
        "ChaState": 55, "ChaState_SF": 0,
        "InWRte": 1000, "OutWRte": 1000, "InOutWRte_SF": -1,             # 100.0 %
        "InOutWRte_RvrtTms": 0, "InOutWRte_WinTms": 0, "InOutWRte_RmpTms": 0,
        "WChaDisChaGra_SF": 0, "VAChaMax_SF": 0, "StorAval_SF": 0, "InBatV_SF": 0,
    }),
    (802, {
        "AHRtg": 200, "AHRtg_SF": 0, "WHRtg": 1000, "WHRtg_SF": 1,       # 10 kWh
        "WChaRteMax": 5000, "WDisChaRteMax": 4500, "WChaDisChaMax_SF": 0,
        "SoC": 553, "SoC_SF": -1, "SoH": 98, "SoH_SF": 0,
        "W": -1500, "W_SF": 0, "ChaSt": 3,
        "DisChaRte_SF": 0, "DoD_SF": 0, "V_SF": 0, "CellV_SF": 0, "A_SF": 0, "AMax_SF": 0,
        "V": 400,
    }),
]


def inverter_image(base: int = 40000) -> RegisterImage:
    return build_image(INVERTER_MODELS, base=base)


def meter_image(base: int = 40000) -> RegisterImage:
    return build_image(METER_MODELS, base=base)


def battery_image(base: int = 40000) -> RegisterImage:
    return build_image(BATTERY_MODELS, base=base)


# --------------------------------------------------------------------------- raw chains

def _fill(points: Sequence[PointDef], values: RawValues, regs: list[int], start: int) -> None:
    for p in points:
        if p.name in ("ID", "L"):
            continue
        v = values.get(p.name)
        regs[start + p.offset : start + p.offset + p.size] = encode_raw(p, v)


def block(
    model_id: int,
    values: RawValues | None = None,
    *,
    groups: Sequence[RawValues] = (),
    length: int | None = None,
) -> list[int]:
    """One model block (ID, L, points) from its official definition; ``groups`` are instances
    of its (first) repeating group; ``length`` overrides L (and the block's size)."""
    mdef = load_model(model_id)
    regs = [0] * mdef.fixed_size
    _fill(mdef.points, values or {}, regs, 0)
    for g in groups:
        gd = mdef.groups[0]
        start = len(regs)
        regs.extend([0] * gd.size)
        _fill(gd.points, g, regs, start)
    L = len(regs) - 2 if length is None else length
    regs[0], regs[1] = model_id, L
    size = L + 2
    return (regs + [0] * size)[:size]


def raw_block(model_id: int, payload: Sequence[int]) -> list[int]:
    """A block of any (e.g. vendor) model id with the given payload."""
    return [model_id, len(payload), *payload]


def chain(*blocks: Sequence[int], end: bool = True) -> list[int]:
    """``SunS`` + blocks (+ end marker)."""
    regs: list[int] = list(SUNS_MARKER)
    for b in blocks:
        regs.extend(b)
    if end:
        regs.extend([END_MODEL_ID, 0])
    return regs
