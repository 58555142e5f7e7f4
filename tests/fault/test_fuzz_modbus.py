"""Modbus responses from a misbehaving device, fuzzed (hypothesis).

The natures (:mod:`drivers.sunspec.devices`, :class:`drivers.regmap.MappedMeter`) read through a
link; here the link is a register image the test controls (:class:`ImageLink`, the same
``read_holding``/``read_input`` contract as :class:`drivers.modbus.ModbusLink`, which has already
turned timeouts, exceptions and short frames into ``DeviceError``s). Register values are
hypothesis-generated: "not implemented" sentinels, int16/uint16 saturation, scale factors out of
the SunSpec range (-32768 is the sentinel; 32767, +-11 are garbage), float32 NaN/inf bit patterns,
garbage model ids and lengths in the discovery chain.

Whatever the registers say, a read either

* returns a reading whose every number is finite (or None), which the gateway's plausibility
  guard then accepts or refuses (it never raises on it), or
* raises a :class:`~drivers.natures.DeviceError` whose message names what was wrong,

and never raises anything else, and never hands NaN/inf over as a value. One test does the same
over a real pymodbus server (a scale factor of 32767 on the meter's W).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import struct
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest
from broker_process import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.factory import DeviceSpec, connect_device
from drivers.natures import BatteryReading, DeviceError, InverterReading, MeterReading
from drivers.regmap import TYPES, MappedMeter, decode_value, load_map
from drivers.sunspec.devices import SunSpecBattery, SunSpecInverter, SunSpecMeter
from drivers.sunspec.discovery import DiscoveryError, ModelLocation, discover
from drivers.sunspec.models import ModelDefinitionError, load_model
from drivers.sunspec.reader import SF_MAX, SF_MIN, decode_model
from firmware_sim.image import RegisterImage, build_image
from gateway.plausibility import ReadingGuard

pytestmark = pytest.mark.fault

BASE = 40000
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class ImageLink:
    """A device that answers from register tables (absent registers read 0)."""

    name = "fuzzed"
    where = "image"

    def __init__(self, holding: dict[int, int], inputs: dict[int, int] | None = None) -> None:
        self.holding = holding
        self.inputs = inputs or {}
        self.reconnects = 0

    def _read(self, table: dict[int, int], address: int, count: int) -> list[int]:
        # ModbusLink refuses a span outside the address space with ValueError: a caller that
        # asked for one would fail here too.
        if count <= 0 or address < 0 or address + count > 0x10000:
            raise ValueError(f"registers {address}+{count} outside 0..65535")
        return [table.get(a, 0) for a in range(address, address + count)]

    async def read_holding(self, address: int, count: int) -> list[int]:
        return self._read(self.holding, address, count)

    async def read_input(self, address: int, count: int) -> list[int]:
        return self._read(self.inputs, address, count)

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        raise AssertionError("reads only")

    async def close(self) -> None:
        pass


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a read to completion: the image link never suspends."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise AssertionError("suspended on an image link")


class StillClock:
    speed = 1.0

    def now(self) -> float:
        return 1_750_000_000.0

    async def sleep_until(self, t: float) -> None:  # pragma: no cover
        pass

    async def sleep(self, dt: float) -> None:  # pragma: no cover
        pass


# ---------------------------------------------------------------- devices as images

COMMON = (1, {"Mn": "hems", "Md": "fuzz", "SN": "1", "DA": 1})
DEVICES: dict[str, list[tuple[int, dict[str, Any]]]] = {
    "meter": [COMMON, (203, {
        "W": -1234, "WphA": -400, "WphB": -434, "WphC": -400, "W_SF": 0,
        "PhV": 2300, "PhVphA": 2300, "V_SF": -1, "Hz": 4998, "Hz_SF": -2,
        "TotWhImp": 1234, "TotWhExp": 567, "TotWh_SF": 3})],
    "meter_float": [COMMON, (213, {
        "W": -1234.0, "WphA": -400.0, "WphB": -434.0, "WphC": -400.0, "PhV": 230.0,
        "Hz": 49.98, "TotWhImp": 1234000.0, "TotWhExp": 567000.0})],
    "inverter": [COMMON, (103, {"W": 432, "W_SF": 1, "WH": 12345678, "WH_SF": 0,
                                "DCW": 455, "DCW_SF": 1, "St": 4}),
                 (120, {"DERTyp": 4, "WRtg": 5000, "WRtg_SF": 0}),
                 (121, {"WMax": 500, "WMax_SF": 1}),
                 (123, {"WMaxLimPct": 1000, "WMaxLimPct_SF": -1, "WMaxLimPct_RvrtTms": 0,
                        "WMaxLim_Ena": 0})],
    "battery": [COMMON, (124, {"WChaMax": 500, "WChaMax_SF": 1, "StorCtl_Mod": 0,
                               "MinRsvPct": 10, "MinRsvPct_SF": 0, "ChaState": 55,
                               "ChaState_SF": 0, "InWRte": 1000, "OutWRte": 1000,
                               "InOutWRte_SF": -1, "InOutWRte_RvrtTms": 0}),
                (802, {"WHRtg": 1000, "WHRtg_SF": 1, "WChaRteMax": 5000,
                       "WDisChaRteMax": 4500, "WChaDisChaMax_SF": 0, "SoC": 553,
                       "SoC_SF": -1, "SoH": 98, "SoH_SF": 0, "W": -1500, "W_SF": 0})],
}
NATURE: dict[str, Any] = {"meter": SunSpecMeter, "meter_float": SunSpecMeter,
                          "inverter": SunSpecInverter, "battery": SunSpecBattery}
IMAGES: dict[str, RegisterImage] = {k: build_image(v, BASE) for k, v in DEVICES.items()}


def point_index(img: RegisterImage, model_id: int, point: str) -> int:
    return img.locate(model_id, point)[1]


def sf_points(kind: str) -> list[tuple[int, str]]:
    """(model, sunssf point) of the image, for the points the nature polls."""
    out = []
    for mid, values in DEVICES[kind]:
        for p in load_model(mid).points:
            if p.type == "sunssf" and p.name in values:
                out.append((mid, p.name))
    return out


# Words a broken device answers: sentinels, saturation, garbage scale factors, float32 NaN/inf
# halves (0x7F80 0x0000 is +inf, 0xFF80 -inf, 0x7FC0 NaN), and anything at all.
SPECIAL = [0x0000, 0x0001, 0x8000, 0x8001, 0x7FFF, 0xFFFF, 0xFFFE, 0x7F80, 0xFF80, 0x7FC0,
           0x000A, 0x000B, 0xFFF6, 0xFFF5]
WORD = st.one_of(st.sampled_from(SPECIAL), st.integers(0, 0xFFFF))
SF_WORD = st.sampled_from([0x8000, 0x7FFF, 11, 0x10000 - 11, 10, 0x10000 - 10, 0, 300])


def check_reading(kind: str, r: Any) -> None:
    """Every number finite or None; the plausibility guard judges it without raising."""
    assert isinstance(r, MeterReading | InverterReading | BatteryReading)
    for f in dataclasses.fields(r):
        v = getattr(r, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, float):
                assert math.isfinite(x), (f.name, x)
    verdict = ReadingGuard().check(kind.split("_")[0], r, 1_750_000_000.0)
    assert verdict.reject is None or verdict.reject.startswith("implausible")


def read_nature(kind: str, holding: dict[int, int]) -> Any:
    """Discover and read the nature ``kind`` over ``holding``: a reading, or a DeviceError."""
    link = ImageLink(holding)
    try:
        smap = run(discover(link))
        dev = NATURE[kind](link, smap, clock=StillClock())
        r = run(dev.read())
    except DeviceError as e:
        assert e.reason and e.device, e
        return e
    check_reading(kind, r)
    return r


def regs_of(img: RegisterImage) -> dict[int, int]:
    return {img.base + i: v for i, v in enumerate(img.regs)}


# ---------------------------------------------------------------- SunSpec natures


@FUZZ
@given(data=st.data(), kind=st.sampled_from(sorted(DEVICES)))
def test_hostile_registers_give_a_finite_reading_or_a_device_error(data: Any, kind: str) -> None:
    img = IMAGES[kind]
    holding = regs_of(img)
    body = [i for i in range(2, len(img.regs) - 2)]  # SunS and the end marker kept
    for _ in range(data.draw(st.integers(1, 12))):
        i = data.draw(st.sampled_from(body))
        holding[img.base + i] = data.draw(WORD)
    # And the scale factors in particular, often garbage.
    sfs = sf_points(kind)  # none in the float32 meter
    for mid, sf in data.draw(st.lists(st.sampled_from(sfs), max_size=3)) if sfs else []:
        holding[img.base + point_index(img, mid, sf)] = data.draw(SF_WORD)
    read_nature(kind, holding)


@pytest.mark.parametrize(("kind", "model", "sf"), [
    (k, m, s) for k in ("meter", "inverter", "battery") for m, s in sf_points(k)])
@pytest.mark.parametrize("word", [0x7FFF, 11, 0x10000 - 11, 0x10000 - 32767])
def test_a_scale_factor_out_of_range_is_a_device_error_naming_it(kind: str, model: int,
                                                                 sf: str, word: int) -> None:
    # Before: 10.0 ** 32767 raised OverflowError out of the read (not a DeviceError), and
    # +-11..308 scaled values into absurd or infinite floats.
    img = IMAGES[kind]
    holding = regs_of(img)
    holding[img.base + point_index(img, model, sf)] = word
    got = read_nature(kind, holding)
    assert isinstance(got, DeviceError), got
    assert sf in got.reason and f"{SF_MIN}..{SF_MAX}" in got.reason, got.reason


@pytest.mark.parametrize(("point", "hi"), [("W", 0x7F80), ("W", 0xFF80), ("W", 0x7FC0),
                                           ("TotWhImp", 0x7F80), ("WphA", 0xFF80)])
def test_float32_inf_or_nan_never_reads_as_a_value(point: str, hi: int) -> None:
    # Before: +-inf in a float32 meter (213) decoded as inf and reached the reading (only NaN
    # was the "not implemented" sentinel); an inf energy counter passed plausibility.
    img = IMAGES["meter_float"]
    holding = regs_of(img)
    i = img.base + point_index(img, 213, point)
    holding[i], holding[i + 1] = hi, 0
    got = read_nature("meter_float", holding)
    if point == "W":
        assert isinstance(got, DeviceError) and "point W" in got.reason, got
    else:
        assert isinstance(got, MeterReading)
        assert got.import_wh is None if point == "TotWhImp" else got.phases_w[0] is None


def test_saturated_registers_with_a_large_valid_scale_are_refused_by_plausibility() -> None:
    img = IMAGES["meter"]
    holding = regs_of(img)
    holding[img.base + point_index(img, 203, "W")] = 0x7FFF
    holding[img.base + point_index(img, 203, "W_SF")] = 10
    got = read_nature("meter", holding)
    assert isinstance(got, MeterReading) and got.site_w == 32767e10
    assert ReadingGuard().check("meter", got, 0.0).reject is not None


# ---------------------------------------------------------------- decoding, every model

LOADABLE = []
for _mid in [*range(1, 20), *range(101, 104), *range(111, 114), *range(120, 161),
             *range(201, 205), *range(211, 215), 220, 302, 304, 401, 402, 403, 404, 501, 502,
             *range(701, 716), *range(801, 805), 64001, 64020]:
    try:
        load_model(_mid)
        LOADABLE.append(_mid)
    except ModelDefinitionError:
        pass


@settings(FUZZ, max_examples=300)
@given(data=st.data(), model_id=st.sampled_from(LOADABLE))
def test_every_model_decodes_hostile_blocks_to_finite_values_or_a_value_error(
        data: Any, model_id: int) -> None:
    mdef = load_model(model_id)
    length = mdef.fixed_length + data.draw(st.sampled_from([0, 0, 1, 7, 60, 200]))
    regs = [model_id, length, *data.draw(st.lists(WORD, min_size=length, max_size=length))]
    try:
        mv = decode_model(ModelLocation(model_id, BASE, length), regs)
    except ValueError as e:  # SunSpecReader turns it into a DeviceError naming the model
        assert f"model {model_id}" in str(e), e
        return
    values = [*mv.values.values(), *(v for g in mv.groups.values() for inst in g
                                     for v in inst.values())]
    for v in values:
        assert not isinstance(v, float) or math.isfinite(v), (model_id, v)


# ---------------------------------------------------------------- discovery chains

MODEL_ID = st.one_of(st.sampled_from([1, 103, 120, 121, 123, 124, 203, 213, 802, 705, 64410,
                                      0, 0xFFFE, 0x5375]), st.integers(0, 0xFFFE))
LENGTH = st.one_of(st.integers(0, 120), st.sampled_from([0xFFFF, 0xFFFE, 25000, 65000]))


@FUZZ
@given(chain=st.lists(st.tuples(MODEL_ID, LENGTH), max_size=12), ended=st.booleans(),
       kind=st.sampled_from(["meter", "inverter", "battery"]),
       filler=st.lists(WORD, min_size=8, max_size=8))
def test_garbage_discovery_chains_give_a_map_or_a_discovery_error(
        chain: list[tuple[int, int]], ended: bool, kind: str, filler: list[int]) -> None:
    holding: dict[int, int] = {BASE: 0x5375, BASE + 1: 0x6E53}
    addr = BASE + 2
    for mid, length in chain:
        if addr + 2 > 0x10000:
            break
        holding[addr], holding[addr + 1] = mid, length
        for k, w in enumerate(filler):  # some garbage in the block
            holding[addr + 2 + k] = w
        addr += 2 + length
    if ended and addr + 2 <= 0x10000:
        holding[addr], holding[addr + 1] = 0xFFFF, 0
    link = ImageLink(holding)
    try:
        smap = run(discover(link))
    except DiscoveryError as e:
        assert e.reason
        return
    prev_end = BASE + 2
    for m in smap.models:
        assert m.address == prev_end and m.end <= 0x10000
        if m.known:
            assert m.length >= load_model(m.id).fixed_length
        prev_end = m.end
    # And a nature on that map: refused, or read to a finite reading, or a DeviceError.
    try:
        dev = NATURE[kind](link, smap, clock=StillClock())
    except DeviceError:
        return
    try:
        r = run(dev.read())
    except DeviceError as e:
        assert e.reason
        return
    check_reading(kind, r)


# ---------------------------------------------------------------- TOML register map (SDM630)

SDM630 = load_map("sdm630")
FLOAT_HALF = st.sampled_from([0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0xFF7F, 0x0080, 0x0000])


@settings(FUZZ, max_examples=300)
@given(regs=st.lists(WORD, min_size=2, max_size=2), ptype=st.sampled_from(sorted(TYPES)),
       order=st.sampled_from(["big", "little"]))
def test_regmap_decode_is_finite_or_none(regs: list[int], ptype: str, order: str) -> None:
    v = decode_value(regs[:TYPES[ptype]], ptype, order)
    assert v is None or math.isfinite(v)
    if v is None:
        assert ptype == "float32"


@FUZZ
@given(data=st.data())
def test_sdm630_hostile_input_registers_give_a_finite_reading_or_a_device_error(
        data: Any) -> None:
    inputs: dict[int, int] = {}
    for p in SDM630.points.values():
        hi = data.draw(st.one_of(FLOAT_HALF, WORD))
        lo = data.draw(WORD)
        inputs[p.address], inputs[p.address + 1] = hi, lo
    link = ImageLink({}, inputs)
    try:
        r = run(MappedMeter(link, SDM630, clock=StillClock()).read())
    except DeviceError as e:
        assert "site_w" in e.reason
        hi, lo = inputs[SDM630.points["site_w"].address], inputs[
            SDM630.points["site_w"].address + 1]
        assert not math.isfinite(struct.unpack(">f", struct.pack(">HH", hi, lo))[0])
        return
    check_reading("meter", r)


# ---------------------------------------------------------------- one real Modbus round trip


async def test_a_garbage_scale_factor_over_real_modbus_is_a_device_error() -> None:
    from pymodbus.framer import FramerType
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    img = IMAGES["meter"]
    regs = list(img.regs)
    regs[point_index(img, 203, "W_SF")] = 0x7FFF
    device = SimDevice(id=1, simdata=[SimData(address=img.base, values=regs,
                                              datatype=DataType.REGISTERS)])
    port = free_port()
    server = ModbusTcpServer(context=device, address=("127.0.0.1", port),
                             framer=FramerType.SOCKET)
    await server.serve_forever(background=True)
    try:
        meter = await connect_device(DeviceSpec("meter", host="127.0.0.1", port=port,
                                                timeout_s=2.0, name="grid"))
        try:
            with pytest.raises(DeviceError, match=r"W_SF = 32767 outside -10\.\.10"):
                await meter.read()
        finally:
            await meter.close()
    finally:
        await server.shutdown()
        await asyncio.sleep(0)
