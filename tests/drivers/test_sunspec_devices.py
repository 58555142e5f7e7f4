"""Meter, inverter and battery natures over real Modbus; factory; scan."""

from __future__ import annotations

import json

import pytest
from modbus_servers import ServeFn
from sunspec_images import (
    BATTERY_MODELS,
    COMMON,
    RawValues,
    battery_image,
    inverter_image,
    meter_image,
)

from drivers.factory import DeviceSpec, connect_device
from drivers.modbus import ModbusLink, WriteRefused
from drivers.natures import Battery, DeviceError, DeviceRejected, Inverter, Meter
from drivers.sunspec.devices import SunSpecBattery, SunSpecInverter, SunSpecMeter
from drivers.sunspec.discovery import discover
from drivers.sunspec.scan import scan
from firmware_sim.image import build_image


class StepClock:
    """A clock the test moves by hand (domain time for the static-refresh schedule)."""

    speed = 1.0

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)

    async def sleep(self, dt: float) -> None:
        self.t += dt


def link_for(s) -> ModbusLink:  # type: ignore[no-untyped-def]
    return ModbusLink.tcp(s.host, s.port, s.unit, timeout_s=0.5, name="dut")


async def test_meter_reading(serve: ServeFn) -> None:
    s = await serve(meter_image())
    link = link_for(s)
    meter = SunSpecMeter(link, await discover(link), clock=StepClock(123.0))
    assert isinstance(meter, Meter)
    r = await meter.read()
    assert r.ts == 123.0
    assert r.site_w == -1234.0  # exporting: SunSpec meter W is + import / - export, as ours
    assert r.phases_w == (-400.0, -434.0, -400.0)
    assert r.import_wh == 1_234_000.0 and r.export_wh == 567_000.0  # TotWh_SF = 3
    assert r.voltage_v == pytest.approx(230.0)
    assert r.freq_hz == pytest.approx(49.98)
    n = link.requests
    await meter.read()
    assert link.requests - n == 1  # one Modbus request per poll


async def test_inverter_reading_and_limit(serve: ServeFn) -> None:
    img = inverter_image()
    s = await serve(img)
    link = link_for(s)
    inv = SunSpecInverter(link, await discover(link))
    assert isinstance(inv, Inverter)
    r = await inv.read()
    assert (r.ac_w, r.dc_w, r.rated_w, r.max_w) == (4320.0, 4550.0, 5000.0, 5000.0)
    assert r.limit_pct == 100.0 and not r.limit_enabled and r.state == 4
    assert r.energy_wh == 12345678.0

    await inv.set_limit_pct(37.5, revert_s=60)
    r = await inv.read()
    assert r.limit_pct == pytest.approx(37.5) and r.limit_enabled and r.limit_revert_s == 60
    _p, i = img.locate(123, "WMaxLim_Ena")
    assert s.regs[i] == 1
    await inv.clear_limit()
    r = await inv.read()
    assert not r.limit_enabled and s.regs[i] == 0

    n = link.requests
    with pytest.raises(WriteRefused, match=r"limit 120 % outside 0\.\.100"):
        await inv.set_limit_pct(120, 60)
    with pytest.raises(WriteRefused, match="revert time -1 s"):
        await inv.set_limit_pct(50, -1)
    assert link.requests == n


async def test_inverter_poll_reads_static_models_only_when_due(serve: ServeFn) -> None:
    img = inverter_image()
    s = await serve(img)
    link = link_for(s)
    clock = StepClock()
    inv = SunSpecInverter(link, await discover(link), clock=clock, static_refresh_s=600)
    assert (await inv.read()).rated_w == 5000.0
    # the device comes back with another nameplate: not re-read before the refresh is due ...
    _p, i = img.locate(120, "WRtg")
    s.regs[i] = 3680
    clock.t += 599
    n = link.requests
    assert (await inv.read()).rated_w == 5000.0
    assert link.requests - n == 2  # 103, 123 only (120/121 lie between: 138 registers > 125)
    # ... and noticed once it is
    clock.t += 1
    assert (await inv.read()).rated_w == 3680.0


async def test_battery_reading_set_power_release(serve: ServeFn) -> None:
    img = battery_image()
    s = await serve(img)
    link = link_for(s)
    bat = SunSpecBattery(link, await discover(link))
    assert isinstance(bat, Battery)
    r = await bat.read()
    assert r.w == -1500.0  # 802 W, device convention + into the battery (= ours)
    assert r.soc_pct == pytest.approx(55.3)  # 802 SoC, SoC_SF -1
    assert r.capacity_wh == 10000.0  # 802 WHRtg, SF 1
    assert (r.max_charge_w, r.max_discharge_w) == (5000.0, 4500.0)
    assert r.reserve_pct == 10.0 and r.ctl_mode == 0 and r.soh_pct == 98.0
    n = link.requests
    await bat.read()
    assert link.requests - n == 1  # 124 + 802 in one read

    await bat.set_power(2000, revert_s=30)  # charge at 2 kW of WChaMax 5 kW = 40 %
    r = await bat.read()
    assert r.ctl_mode == 3
    assert r.in_rate_pct == pytest.approx(40.0) and r.out_rate_pct == pytest.approx(-40.0)
    assert r.revert_s == 30.0

    await bat.set_power(-1250, revert_s=30)  # discharge 25 %
    r = await bat.read()
    assert r.in_rate_pct == pytest.approx(-25.0) and r.out_rate_pct == pytest.approx(25.0)

    await bat.set_power(-99999, revert_s=30)  # beyond the rating: 100 %, the device clamps
    r = await bat.read()
    assert r.out_rate_pct == 100.0 and r.in_rate_pct == -100.0

    await bat.release()
    assert (await bat.read()).ctl_mode == 0


async def test_battery_rejects_a_window_it_does_not_hold(serve: ServeFn) -> None:
    img = battery_image()
    _p, idx = img.locate(124, "InWRte")
    target = img.base + idx

    async def ignore_in_rate(fc, start, addr, count, regs, values):
        if values is not None and addr <= target < addr + count:
            values[target - addr] = regs[target - start]  # keep the old value
        return None

    s = await serve(img, action=ignore_in_rate)
    link = link_for(s)
    bat = SunSpecBattery(link, await discover(link))
    with pytest.raises(DeviceRejected, match=r"InWRte did not read back: wrote 40.0, read 100.0"):
        await bat.set_power(2000, 30)


async def test_battery_sign_convention_flag(serve: ServeFn) -> None:
    s = await serve(battery_image())
    link = link_for(s)
    bat = SunSpecBattery(link, await discover(link), w_charge_positive=False)
    assert (await bat.read()).w == 1500.0


async def test_battery_without_802_uses_124_and_the_storage_inverter(serve: ServeFn) -> None:
    models: list[tuple[int, RawValues]] = [
        COMMON, (103, {"W": 800, "W_SF": 0}), (120, {"WHRtg": 96, "WHRtg_SF": 2}),
        BATTERY_MODELS[1],
    ]
    s = await serve(build_image(models))
    link = link_for(s)
    bat = SunSpecBattery(link, await discover(link))
    r = await bat.read()
    assert r.w == -800.0  # AC output of the storage inverter = discharge
    assert r.soc_pct == 55.0  # 124 ChaState
    assert r.capacity_wh == 9600.0  # 120 WHRtg
    assert r.max_charge_w == r.max_discharge_w == 5000.0  # 124 WChaMax
    assert r.soh_pct is None


async def test_wrong_models_for_the_nature(serve: ServeFn) -> None:
    s = await serve(meter_image())
    link = link_for(s)
    smap = await discover(link)
    with pytest.raises(DeviceError, match=r"no SunSpec inverter model .* \[1, 203\]"):
        SunSpecInverter(link, smap)
    with pytest.raises(DeviceError, match=r"no SunSpec storage model"):
        SunSpecBattery(link, smap)


# --------------------------------------------------------------------------- factory

async def test_connect_device_by_kind(serve: ServeFn) -> None:
    sm, si, sb = (await serve(meter_image()), await serve(inverter_image(0)),
                  await serve(battery_image(50000)))
    m = await connect_device(DeviceSpec("meter", host=sm.host, port=sm.port, name="grid"))
    i = await connect_device(DeviceSpec("inverter", host=si.host, port=si.port))
    b = await connect_device(DeviceSpec("battery", host=sb.host, port=sb.port))
    assert isinstance(m, SunSpecMeter) and m.name == "grid"
    assert isinstance(i, SunSpecInverter) and isinstance(b, SunSpecBattery)
    assert (await m.read()).site_w == -1234.0
    assert (await i.read()).ac_w == 4320.0
    assert (await b.read()).soc_pct == pytest.approx(55.3)


async def test_connect_device_kind_mismatch(serve: ServeFn) -> None:
    s = await serve(inverter_image())
    with pytest.raises(DeviceError) as ei:
        await connect_device(DeviceSpec("battery", host=s.host, port=s.port, name="bat1"))
    msg = str(ei.value)
    assert msg.startswith("bat1: configured as a battery but its SunSpec models")
    assert "looks like: inverter" in msg


async def test_connect_device_rtu_over_tcp(serve: ServeFn) -> None:
    s = await serve(meter_image(), framer="rtu", unit=4)
    m = await connect_device(DeviceSpec("meter", "rtu-over-tcp", host=s.host, port=s.port, unit=4))
    assert (await m.read()).site_w == -1234.0  # type: ignore[union-attr]


def test_device_spec_validation() -> None:
    with pytest.raises(ValueError, match="transport rtu needs serial_port"):
        DeviceSpec("meter", "rtu")
    with pytest.raises(ValueError, match="needs host"):
        DeviceSpec("meter", "tcp")
    with pytest.raises(ValueError, match="kind must be"):
        DeviceSpec("heatpump", host="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit must be"):
        DeviceSpec("meter", host="x", unit=256)


# --------------------------------------------------------------------------- scan

async def test_scan_is_json_and_complete(serve: ServeFn) -> None:
    s = await serve(battery_image())
    out = await scan(link_for(s))
    text = json.dumps(out, allow_nan=False)  # strictly JSON
    back = json.loads(text)
    assert back["base"] == 40000
    assert [m["id"] for m in back["models"]] == [1, 124, 802]
    m802 = back["models"][2]
    assert m802["name"] == "battery" and m802["address"] == 40096 and m802["length"] == 62
    assert m802["points"]["SoC"] == pytest.approx(55.3) and m802["raw"]["SoC"] == 553
    assert m802["points"]["DoD"] is None  # sentinel
