"""Declarative register maps: validation with clear errors, and the shipped SDM630 map served
by a real pymodbus server (input registers, float32)."""

from __future__ import annotations

import struct
import tomllib
from pathlib import Path

import pytest
from modbus_servers import ServeFn, live_block

from drivers.factory import DeviceSpec, connect_device
from drivers.modbus import ModbusLink, WriteRefused
from drivers.natures import Meter
from drivers.regmap import (
    MappedMeter,
    RegisterMapError,
    decode_value,
    encode_value,
    load_map,
    parse_map,
    plan_map_reads,
    shipped_maps,
)


def f32(v: float) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(">f", v)))


def sdm630_input_regs(values: dict[int, float]) -> list[int]:
    """Input registers 0x0000..0x004F of an SDM630; ``values`` {address: float}."""
    regs = [0] * 0x50
    for addr, v in values.items():
        regs[addr : addr + 2] = f32(v)
    return regs


SDM = {
    0x0000: 231.0, 0x0002: 229.5, 0x0004: 230.2,     # phase voltages
    0x000C: -812.5, 0x000E: 100.0, 0x0010: -290.0,   # phase powers
    0x002A: 230.23,                                  # average L-N voltage
    0x0034: -1002.5,                                 # total system power (export)
    0x0046: 50.02,                                   # Hz
    0x0048: 12345.6, 0x004A: 789.125,                # import / export kWh
}


async def serve_sdm630(serve: ServeFn, demand_min: float = 60.0):  # type: ignore[no-untyped-def]
    holding = [0] * 16
    holding[2:4] = f32(demand_min)
    return await serve(holding, base=0, input_regs=(0, sdm630_input_regs(SDM)))


def test_shipped_map_loads() -> None:
    assert "sdm630" in shipped_maps()
    m = load_map("sdm630")
    assert m.kind == "meter" and m.max_read == 80
    assert m.points["site_w"].address == 0x34 and m.points["site_w"].function == "input"
    assert m.points["import_wh"].scale == 1000.0
    assert m.writes["demand_period_min"].function == "holding"
    # every point of the SDM630 in one read of <= 80 registers
    assert [(f, s, c) for f, s, c, _ in plan_map_reads(list(m.points.values()), 80, 40)] == [
        ("input", 0x0C, 0x4C - 0x0C)
    ]


async def test_mapped_meter_reads_sdm630(serve: ServeFn) -> None:
    s = await serve_sdm630(serve)
    link = ModbusLink.tcp(s.host, s.port, 1, timeout_s=0.5)
    meter = MappedMeter(link, load_map("sdm630"))
    assert isinstance(meter, Meter)
    r = await meter.read()
    assert r.site_w == -1002.5
    assert r.phases_w == (-812.5, 100.0, -290.0)
    assert r.import_wh == pytest.approx(12_345_600.0, rel=1e-6)  # float32 kWh -> Wh
    assert r.export_wh == pytest.approx(789_125.0)
    assert r.voltage_v == pytest.approx(230.23, rel=1e-6)
    assert r.freq_hz == pytest.approx(50.02, rel=1e-6)
    assert link.requests == 1  # one FC04 read


async def test_mapped_write_with_read_back(serve: ServeFn) -> None:
    s = await serve_sdm630(serve)
    link = ModbusLink.tcp(s.host, s.port, 1, timeout_s=0.5)
    meter = MappedMeter(link, load_map("sdm630"))
    assert await meter.write("demand_period_min", 15) == 15.0
    start, holding = live_block(s.server, 1, "h")
    assert holding[2 - start : 4 - start] == f32(15.0)
    n = link.requests
    with pytest.raises(WriteRefused, match=r"demand_period_min: 90 outside 0\.0\.\.60\.0"):
        await meter.write("demand_period_min", 90)
    with pytest.raises(WriteRefused, match="no write point 'reset'"):
        await meter.write("reset", 1)
    assert link.requests == n


async def test_factory_builds_a_mapped_meter(serve: ServeFn) -> None:
    s = await serve_sdm630(serve)
    m = await connect_device(DeviceSpec("meter", host=s.host, port=s.port, register_map="sdm630"))
    assert isinstance(m, MappedMeter)
    assert (await m.read()).site_w == -1002.5
    with pytest.raises(RegisterMapError, match=r"a meter map, but .* configured as a inverter"):
        await connect_device(DeviceSpec("inverter", host=s.host, port=s.port,
                                        register_map="sdm630"))


def test_codec_word_orders_and_types() -> None:
    assert decode_value(f32(1.5), "float32") == 1.5
    assert decode_value(list(reversed(f32(1.5))), "float32", "little") == 1.5
    assert decode_value([0xFFFF], "int16") == -1.0
    assert decode_value([0xFFFF, 0xFFFE], "int32") == -2.0
    assert decode_value([0x0001, 0x0000], "uint32", "little") == 1.0
    assert decode_value([0x7FC0, 0], "float32") is None  # NaN
    assert encode_value(-2, "int32", "little") == [0xFFFE, 0xFFFF]
    with pytest.raises(ValueError, match="does not fit uint16"):
        encode_value(70000, "uint16")


# --------------------------------------------------------------------------- validation

BASE = """
[device]
kind = "meter"
function = "input"
[points.site_w]
address = 52
type = "float32"
"""


def bad(extra: str, base: str = BASE) -> str:
    with pytest.raises(RegisterMapError) as ei:
        parse_map(tomllib.loads(base + extra), "mymeter.toml")
    return str(ei.value)


def test_validation_names_file_table_and_key() -> None:
    assert parse_map(tomllib.loads(BASE)).points["site_w"].address == 52
    assert bad('[points.import_wh]\naddress = 72\ntype = "float64"\n') == (
        "mymeter.toml: [points.import_wh] key 'type': 'float64' is not one of "
        "int16, uint16, int32, uint32, float32"
    )
    assert "[points.export_wh] key 'address': missing" in bad(
        '[points.export_wh]\ntype = "int16"\n')
    assert "[points.freq_hz] key 'address': must be 0..65534, got 70000" in bad(
        '[points.freq_hz]\naddress = 70000\ntype = "float32"\n')
    assert "[points.heat_w]: not a meter field" in bad(
        '[points.heat_w]\naddress = 1\ntype = "int16"\n')
    assert "[points.freq_hz] key 'sacle': unknown key" in bad(
        '[points.freq_hz]\naddress = 70\ntype = "float32"\nsacle = 2\n')
    assert "[points.freq_hz] key 'scale': must not be 0" in bad(
        '[points.freq_hz]\naddress = 70\ntype = "float32"\nscale = 0\n')
    assert "freq_hz at input 53 overlaps site_w at 52" in bad(
        '[points.freq_hz]\naddress = 53\ntype = "float32"\n')
    assert "[device] key 'word_order': 'middle' is not one of big, little" in bad(
        "", BASE.replace('function = "input"', 'function = "input"\nword_order = "middle"'))
    assert "[points.site_w]: missing: a meter needs site_w" in bad(
        "", '[device]\nkind = "meter"\n[points.freq_hz]\naddress = 1\ntype = "int16"\n')
    assert "[device] key 'kind': 'boiler' is not one of meter" in bad(
        "", BASE.replace('kind = "meter"', 'kind = "boiler"'))
    assert "[writes.x] key 'min': min 5 > max 1" in bad(
        '[writes.x]\naddress = 2\ntype = "int16"\nmin = 5\nmax = 1\n')


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        RegisterMapError, match=r"nope.toml: no such register map \(shipped maps: .*sdm630"
    ):
        load_map(str(tmp_path / "nope.toml"))
    p = tmp_path / "broken.toml"
    p.write_text("[device\nkind=", encoding="utf-8")
    with pytest.raises(RegisterMapError, match=r"broken\.toml: not valid TOML"):
        load_map(str(p))
