"""Decoding (scale factors, sentinels, groups), coalesced reads, and verified writes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modbus_servers import ServeFn
from pymodbus.constants import ExcCodes
from sunspec_images import RawValues, battery_image, block, chain, inverter_image

from drivers.modbus import ModbusLink, WriteRefused
from drivers.natures import DeviceError, DeviceRejected
from drivers.sunspec.discovery import ModelLocation, discover
from drivers.sunspec.models import decode_raw, load_model
from drivers.sunspec.reader import (
    SF_MAX,
    SF_MIN,
    SunSpecReader,
    apply_sf,
    decode_model,
    plan_reads,
)


async def reader_for(s) -> SunSpecReader:  # type: ignore[no-untyped-def]
    link = ModbusLink.tcp(s.host, s.port, s.unit, timeout_s=0.5, name="dut")
    return SunSpecReader(link, await discover(link))


# --------------------------------------------------------------------------- decoding

async def test_scale_factors_and_sentinels(serve: ServeFn) -> None:
    r = await reader_for(await serve(inverter_image()))
    m = (await r.read(103))[103]
    assert m.values["W"] == 4320.0  # W=432, W_SF=+1
    assert m.raw["W"] == 432
    assert m.values["A"] == pytest.approx(12.3)  # A=123, A_SF=-1
    assert m.values["Hz"] == pytest.approx(50.01)  # Hz_SF=-2
    assert m.values["WH"] == 12345678.0  # acc32, SF 0
    assert m.values["St"] == 4  # enum: raw, unscaled
    assert m.values["VA"] is None  # int16 0x8000 "not implemented"
    assert m.values["PF"] is None and m.raw["PF"] == 950  # value present, its SF is not
    assert m.sfs["PF"] is None and m.sfs["W"] == 1
    assert m.values["W_SF"] == 1  # scale factors themselves are raw exponents
    common = (await r.read(1))[1]
    assert common.values["Mn"] == "hems" and common.values["SN"] == "SN0001"
    assert common.values["Opt"] is None  # all-zero string = not implemented


async def test_sentinels_of_each_type_decode_to_none(serve: ServeFn) -> None:
    img = inverter_image()
    s = await serve(img)
    r = await reader_for(s)
    regs = s.regs
    for point, sentinel in [("W", [0x8000]), ("PhVphA", [0xFFFF]), ("WH", [0, 0]),
                            ("Evt1", [0xFFFF, 0xFFFF]), ("St", [0xFFFF])]:
        _p, i = img.locate(103, point)
        for k, v in enumerate(sentinel):
            regs[i + k] = v
    m = (await r.read(103))[103]
    assert m.values["W"] is None
    assert m.values["PhVphA"] is None
    assert m.values["WH"] is None
    assert m.values["Evt1"] is None
    assert m.values["St"] is None
    assert m.values["PhVphB"] == pytest.approx(230.2)  # neighbours untouched


def test_repeating_groups_decode() -> None:
    a: RawValues = {"ID": 1, "IDStr": "string A", "DCA": 812, "DCV": 3500, "DCW": 2842,
                    "DCWH": 1000}
    b: RawValues = {"ID": 2, "IDStr": "string B", "DCA": 0x7FFF, "DCV": None, "DCW": 17}
    regs = block(
        160,
        {"DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 0, "N": 2},
        groups=[a, b],
    )
    loc = ModelLocation(160, 40100, len(regs) - 2)
    m = decode_model(loc, regs)
    mods = m.groups["module"]
    assert len(mods) == 2
    assert mods[0]["IDStr"] == "string A"
    assert mods[0]["DCA"] == pytest.approx(8.12)
    assert mods[0]["DCV"] == pytest.approx(350.0)
    assert mods[0]["DCW"] == 2842.0
    assert mods[1]["DCV"] is None  # uint16 sentinel in a group instance
    assert mods[1]["DCW"] == 17.0


async def test_repeating_groups_over_the_wire_and_in_scan(serve: ServeFn) -> None:
    from drivers.sunspec.scan import scan

    g: RawValues = {"ID": 1, "IDStr": "pv1", "DCA": 100, "DCV": 400, "DCW": 40, "DCWH": 5}
    regs = chain(block(1), block(160, {"DCA_SF": -1, "DCV_SF": 0, "DCW_SF": 1, "DCWH_SF": 3,
                                       "N": 3}, groups=[g, g, g]))
    s = await serve(regs, base=40000)
    link = ModbusLink.tcp(s.host, s.port, 1, timeout_s=0.5)
    out = await scan(link)
    mppt = out["models"][1]
    assert mppt["id"] == 160 and mppt["length"] == 8 + 3 * 20
    assert [m["DCW"] for m in mppt["groups"]["module"]] == [400.0, 400.0, 400.0]
    assert mppt["groups"]["module"][0]["DCWH"] == 5000.0


# --------------------------------------------------------------------------- coalescing

def test_plan_reads_coalesces_within_125_registers() -> None:
    a = ModelLocation(103, 40070, 50)  # 52 regs
    b = ModelLocation(120, 40122, 26)  # 28
    c = ModelLocation(121, 40150, 30)  # 32
    d = ModelLocation(123, 40182, 24)  # 26: a..d = 138 > 125
    assert plan_reads([a, b]) == [(40070, 80, [a, b])]
    assert plan_reads([d, a, c]) == [(40070, 112, [a, c]), (40182, 26, [d])]  # gap included
    big = ModelLocation(701, 40000, 153)
    assert plan_reads([big]) == [(40000, 155, [big])]  # one model > 125: the link splits it


async def test_polls_are_coalesced_on_the_wire(serve: ServeFn) -> None:
    r = await reader_for(await serve(battery_image()))
    before = r.link.requests  # type: ignore[attr-defined]
    ms = await r.read(124, 802)
    assert set(ms) == {124, 802}
    assert r.link.requests - before == 1  # type: ignore[attr-defined]
    r2 = await reader_for(await serve(inverter_image()))
    before = r2.link.requests  # type: ignore[attr-defined]
    await r2.read(103, 120, 121, 123)
    assert r2.link.requests - before == 2  # type: ignore[attr-defined]


async def test_map_changed_under_us(serve: ServeFn) -> None:
    s = await serve(inverter_image())
    r = await reader_for(s)
    s.regs[2] = 101  # the ID register of the first model after SunS... now a different model
    with pytest.raises(DeviceError, match=r"expected at 40002 .* found id 101.*rediscover"):
        await r.read(1)


async def test_missing_model_is_named(serve: ServeFn) -> None:
    r = await reader_for(await serve(inverter_image()))
    with pytest.raises(DeviceError, match=r"has no SunSpec model 124 \(models: \[1, 103"):
        await r.read(124)


# --------------------------------------------------------------------------- writes

async def test_write_scaled_and_read_back(serve: ServeFn) -> None:
    img = inverter_image()
    s = await serve(img)
    r = await reader_for(s)
    back = await r.write(123, {"WMaxLimPct": 42.5, "WMaxLimPct_RvrtTms": 30, "WMaxLim_Ena": 1})
    assert back.values["WMaxLimPct"] == pytest.approx(42.5)
    _p, i = img.locate(123, "WMaxLimPct")
    assert s.regs[i] == 425  # SF -1 on the wire
    assert back.values["WMaxLim_Ena"] == 1


async def test_write_silently_altered_is_rejected(serve: ServeFn) -> None:
    img = inverter_image()
    _p, idx = img.locate(123, "WMaxLimPct")
    target = img.base + idx

    async def clamp(fc, start, addr, count, regs, values):
        # the device accepts the write but clamps the limit to 80.0 %
        if values is not None and addr <= target < addr + count:
            values[target - addr] = min(values[target - addr], 800)
        return None

    r = await reader_for(await serve(img, action=clamp))
    await r.write(123, {"WMaxLimPct": 60})  # within the clamp: fine
    with pytest.raises(DeviceRejected) as ei:
        await r.write(123, {"WMaxLimPct": 95})
    msg = str(ei.value)
    assert "WMaxLimPct did not read back" in msg
    assert "wrote 95" in msg and "read 80.0" in msg


async def test_write_answered_with_illegal_value(serve: ServeFn) -> None:
    async def refuse(fc, start, addr, count, regs, values):
        return ExcCodes.ILLEGAL_VALUE if values is not None else None

    r = await reader_for(await serve(battery_image(), action=refuse))
    with pytest.raises(DeviceRejected) as ei:
        await r.write(124, {"StorCtl_Mod": 3})
    msg = str(ei.value)
    assert "StorCtl_Mod rejected" in msg and "ILLEGAL DATA VALUE (3)" in msg


async def test_refusals_before_the_wire(serve: ServeFn) -> None:
    r = await reader_for(await serve(inverter_image()))
    await r.read(103, 123)
    n = r.link.requests  # type: ignore[attr-defined]
    with pytest.raises(WriteRefused, match="point W is read-only"):
        await r.write(103, {"W": 100})
    with pytest.raises(WriteRefused, match=r"WMaxLimPct: 7000 % WMax out of range 0..6553.4"):
        await r.write(123, {"WMaxLimPct": 7000})  # 70000 raw > uint16 at SF -1
    with pytest.raises(WriteRefused, match=r"WMaxLim_Ena: 7 is not one of its values"):
        await r.write(123, {"WMaxLim_Ena": 7})
    with pytest.raises(WriteRefused, match="has no point 'Nope'"):
        await r.write(123, {"Nope": 1})
    with pytest.raises(WriteRefused, match="not a finite number"):
        await r.write(123, {"WMaxLimPct": float("nan")})
    assert r.link.requests == n  # type: ignore[attr-defined]  # nothing went on the wire


async def test_write_with_unimplemented_scale_factor_is_refused(serve: ServeFn) -> None:
    img = inverter_image()
    img.set_raw(123, "WMaxLimPct_SF", None)
    r = await reader_for(await serve(img))
    with pytest.raises(WriteRefused, match="scale factor WMaxLimPct_SF is not implemented"):
        await r.write(123, {"WMaxLimPct": 50})


def test_partial_decode_matches_full_decode() -> None:
    from drivers.sunspec.devices import POLL_POINTS

    img = inverter_image()
    for mid in (103, 120, 121, 123):
        blk = img.model(mid)
        i = blk.address - img.base
        loc = ModelLocation(mid, blk.address, blk.mdef.fixed_length)
        regs = img.regs[i : i + loc.size]
        full = decode_model(loc, regs)
        part = decode_model(loc, regs, POLL_POINTS[mid])
        assert set(POLL_POINTS[mid]) <= set(part.values)
        assert len(part.values) < len(full.values)
        for name in POLL_POINTS[mid]:
            assert part.values[name] == full.values[name], (mid, name)
    with pytest.raises(ValueError, match=r"model 103 has no points \['Bogus'\]"):
        decode_model(ModelLocation(103, 40070, 50), [103, 50] + [0] * 50, ["Bogus"])


# The integer fast path of the decoder against the generic per-point decoder, on registers
# biased towards the sentinels and sign boundaries; integer, float, string and 64-bit points,
# scale factors in and out of range, repeating groups.
_WORDS = st.one_of(st.sampled_from([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 0xFFF6, 10]),
                   st.integers(0, 0xFFFF))


@settings(max_examples=300, deadline=None)
@given(mid=st.sampled_from([1, 103, 111, 122, 124, 160, 203, 213, 701, 704, 802]),
       data=st.data(), selected=st.booleans())
def test_fast_decode_equals_the_generic_decoder(mid: int, data: st.DataObject,
                                                selected: bool) -> None:
    mdef = load_model(mid)
    group_regs = sum(g.size for g in mdef.groups) * 2
    regs = data.draw(st.lists(_WORDS, min_size=mdef.fixed_size + group_regs,
                              max_size=mdef.fixed_size + group_regs))
    loc = ModelLocation(mid, 40000, mdef.fixed_size + group_regs - 2)
    only = None
    if selected:
        only = data.draw(st.sets(st.sampled_from([p.name for p in mdef.points]), min_size=1))
    try:
        mv = decode_model(loc, regs, only)
    except ValueError as e:  # only an out-of-range scale factor may refuse the block
        assert "scale factor" in str(e)
        assert any(p.type == "sunssf" and (r := decode_raw(p, regs[p.offset: p.offset + 1]))
                   is not None and not SF_MIN <= int(r) <= SF_MAX for p in mdef.points)
        return
    for name, got in mv.raw.items():
        p = next(q for q in mdef.points if q.name == name)
        assert got == decode_raw(p, regs[p.offset: p.offset + p.size]), name
    for name, v in mv.values.items():
        p = next(q for q in mdef.points if q.name == name)
        r, sf = mv.raw[name], mv.sfs.get(name, 0)
        if p.sf is None or p.type == "sunssf":
            assert v == r, name
        elif r is None or sf is None or isinstance(r, str):
            assert v is None, name
        else:
            assert v == apply_sf(r, sf), name
    off = mdef.fixed_size
    for g in mdef.groups if only is None else ():
        for inst in mv.groups[g.name]:
            for p in g.points:
                if p.sf is None:
                    assert inst[p.name] == decode_raw(p, regs[off + p.offset:
                                                              off + p.offset + p.size])
            off += g.size
