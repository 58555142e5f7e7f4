"""The simulated devices over real Modbus TCP, seen by a plain pymodbus client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from drivers.clock import SimClock
from drivers.sunspec.models import END_MODEL_ID, SUNS_MARKER, decode_raw, load_model, scale
from firmware_sim import home as home_mod
from firmware_sim.home import HomeConfig
from firmware_sim.server import SimulatedHome, parse_start, run_home, run_homes, serve

from .conftest import NOON, flat_profiles

EXPECTED = {"inverter": [1, 103, 120, 121, 123], "battery": [1, 124, 802], "meter": [1, 203]}


@contextlib.asynccontextmanager
async def home(clock: SimClock, cfg: HomeConfig | None = None, load: float = 1000,
               pv: float = 4000, **kw: Any) -> Any:
    lp, pp = flat_profiles(load, pv)
    async with run_home(clock, cfg or HomeConfig(), load=lp, pv=pp, **kw) as sim:
        yield sim


async def chain(c: AsyncModbusTcpClient, unit: int, base: int) -> dict[int, int]:
    """Walk the model chain like a SunSpec client: {model id: address of its ID register}."""
    r = await c.read_holding_registers(base, count=2, device_id=unit)
    assert tuple(r.registers) == SUNS_MARKER
    found: dict[int, int] = {}
    addr = base + 2
    for _ in range(20):
        r = await c.read_holding_registers(addr, count=2, device_id=unit)
        mid, length = r.registers
        if mid == END_MODEL_ID:
            return found
        found[mid] = addr
        addr += 2 + length
    raise AssertionError("model chain never ends")


async def read_point(c: AsyncModbusTcpClient, unit: int, where: dict[int, int], mid: int,
                     name: str) -> float | None:
    """Read and scale one point (its scale factor read from the device too)."""
    mdef = load_model(mid)
    r = await c.read_holding_registers(where[mid], count=mdef.fixed_size, device_id=unit)
    assert not r.isError(), r
    regs = list(r.registers)
    p = mdef.point(name)
    raw = decode_raw(p, regs[p.offset : p.offset + p.size])
    sf = 0
    if isinstance(p.sf, str):
        q = mdef.point(p.sf)
        sf = decode_raw(q, regs[q.offset : q.offset + 1])  # type: ignore[assignment]
    return scale(raw, sf)  # type: ignore[arg-type]


async def write_point(c: AsyncModbusTcpClient, unit: int, where: dict[int, int], mid: int,
                      name: str, raw: int) -> Any:
    p = load_model(mid).point(name)
    return await c.write_register(where[mid] + p.offset, raw & 0xFFFF, device_id=unit)


async def connect(sim: SimulatedHome, kind: str, client_for: Any, base: int = 40000,
                  **kw: Any) -> tuple[AsyncModbusTcpClient, int, dict[int, int]]:
    ep = sim.endpoint(kind)
    c = await client_for(ep, **kw)
    return c, ep.unit, await chain(c, ep.unit, base)


# ------------------------------------------------------------------------- discovery, values


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_suns_marker_and_model_chain(fast_clock: SimClock, client_for: Any,
                                           base: int) -> None:
    async with home(fast_clock, base=base, units=(3, 4, 5)) as sim:
        assert [e.kind for e in sim.endpoints] == ["inverter", "battery", "meter"]
        assert [e.unit for e in sim.endpoints] == [3, 4, 5]
        assert len({e.port for e in sim.endpoints}) == 3
        for e in sim.endpoints:
            c = await client_for(e)
            assert list(await chain(c, e.unit, base)) == EXPECTED[e.kind]


async def test_values_follow_the_physics(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock, HomeConfig(pv_kwp=5, soc0_pct=60), load=1000, pv=4000) as sim:
        inv, u, w = await connect(sim, "inverter", client_for)
        assert await read_point(inv, u, w, 103, "W") == pytest.approx(4000, abs=1)
        assert await read_point(inv, u, w, 103, "Hz") == pytest.approx(50.0, abs=0.05)
        assert await read_point(inv, u, w, 120, "WRtg") == 5000
        assert await read_point(inv, u, w, 103, "PPVphAB") is None  # not implemented
        bat, u, w = await connect(sim, "battery", client_for)
        # self-consumption: 3000 W surplus, the battery charges at 3000 W
        assert await read_point(bat, u, w, 802, "W") == pytest.approx(3000, abs=1)
        soc = await read_point(bat, u, w, 124, "ChaState")
        assert soc is not None and 60 <= soc < 70
        met, u, w = await connect(sim, "meter", client_for)
        assert await read_point(met, u, w, 203, "W") == pytest.approx(0, abs=1)
        imp0 = await read_point(met, u, w, 203, "TotWhImp")
        assert imp0 is not None and imp0 >= 3_000_000


async def test_meter_counts_import_over_time(client_for: Any) -> None:
    clock = SimClock(NOON, speed=3600.0)  # an hour per second
    async with home(clock, HomeConfig(pv_kwp=0, battery_wh=0), load=1800, pv=0) as sim:
        met, u, w = await connect(sim, "meter", client_for)
        a = await read_point(met, u, w, 203, "TotWhImp")
        t_a = sim.physics.t
        await clock.sleep(1800)
        b = await read_point(met, u, w, 203, "TotWhImp")
        t_b = sim.physics.t
        assert a is not None and b is not None
        assert b - a == pytest.approx(1800 * (t_b - t_a) / 3600, abs=1.5)


# ------------------------------------------------------------------------------- controls


async def test_wmaxlimpct_write_is_honoured_then_reverted(fast_clock: SimClock,
                                                          client_for: Any) -> None:
    cfg = HomeConfig(battery_wh=0, inverter_ramp_s=2)
    async with home(fast_clock, cfg, load=500, pv=4000) as sim:
        c, u, w = await connect(sim, "inverter", client_for)
        p = load_model(123)
        start = w[123] + p.point("WMaxLimPct").offset
        # WMaxLimPct=30.00 % (SF -2), WinTms 0, RvrtTms 300 s, RmpTms 2 s, Ena 1: one block
        # write. 300 s is 0.5 s real at 600x: room for the reads before the revert.
        r = await c.write_registers(start, [3000, 0, 300, 2, 1], device_id=u)
        assert not r.isError(), r
        assert await read_point(c, u, w, 123, "WMaxLimPct") == pytest.approx(30)
        assert await read_point(c, u, w, 123, "WMaxLim_Ena") == 1
        await fast_clock.sleep(5)  # past the 2 s ramp
        assert await read_point(c, u, w, 103, "W") == pytest.approx(1500, abs=1)
        await fast_clock.sleep(300)  # past the revert time
        assert await read_point(c, u, w, 123, "WMaxLim_Ena") == 0
        assert await read_point(c, u, w, 123, "WMaxLimPct") == pytest.approx(100)
        await fast_clock.sleep(5)
        assert await read_point(c, u, w, 103, "W") == pytest.approx(4000, abs=1)


async def test_battery_window_write_holds_then_reverts(fast_clock: SimClock,
                                                       client_for: Any) -> None:
    async with home(fast_clock, HomeConfig(pv_kwp=0), load=800, pv=0) as sim:
        c, u, w = await connect(sim, "battery", client_for)
        assert await read_point(c, u, w, 802, "W") == pytest.approx(-800, abs=1)
        m = load_model(124)
        # OutWRte=-40 %, InWRte=40 % (SF -2): hold charging at 2000 W; revert after 300 s
        r = await c.write_registers(w[124] + m.point("OutWRte").offset,
                                    [(-4000) & 0xFFFF, 4000, 0, 300], device_id=u)
        assert not r.isError(), r
        r = await write_point(c, u, w, 124, "StorCtl_Mod", 3)
        assert not r.isError(), r
        assert await read_point(c, u, w, 802, "W") == pytest.approx(2000, abs=1)
        met, mu, mw = await connect(sim, "meter", client_for)
        assert await read_point(met, mu, mw, 203, "W") == pytest.approx(2800, abs=1)
        await fast_clock.sleep(305)
        assert await read_point(c, u, w, 124, "StorCtl_Mod") == 0
        assert await read_point(c, u, w, 802, "W") == pytest.approx(-800, abs=1)


@pytest.mark.parametrize(
    ("kind", "mid", "name", "raw", "code"),
    [
        ("inverter", 123, "WMaxLimPct", 15000, 3),  # 150 %
        ("inverter", 123, "WMaxLim_Ena", 2, 3),
        ("inverter", 121, "WMax", 9000, 3),  # above WRtg
        ("inverter", 103, "W", 1234, 2),  # read-only measurement
        ("battery", 124, "InWRte", 20000, 3),  # 200 %
        ("battery", 124, "OutWRte", -15000, 3),  # -150 %
        ("battery", 124, "StorCtl_Mod", 4, 3),  # bit 2 does not exist
        ("battery", 124, "ChaState", 777, 2),  # SoC is read-only (77.7 %, not the SoC now)
        ("meter", 203, "W", 1234, 2),
    ],
)
async def test_invalid_writes_are_rejected(fast_clock: SimClock, client_for: Any, kind: str,
                                           mid: int, name: str, raw: int, code: int) -> None:
    async with home(fast_clock) as sim:
        c, u, w = await connect(sim, kind, client_for)
        before = await read_point(c, u, w, mid, name)
        r = await write_point(c, u, w, mid, name, raw)
        assert r.isError()
        assert r.exception_code == code
        assert sim.devices[kind].rejected == 1
        if name not in ("W", "ChaState"):  # a control point: the refused write left it alone
            assert await read_point(c, u, w, mid, name) == pytest.approx(before)


async def test_marker_and_wrong_unit_are_refused(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock) as sim:
        ep = sim.endpoint("meter")
        c = await client_for(ep)
        r = await c.write_register(40000, 0, device_id=ep.unit)  # the SunS marker
        assert r.isError() and r.exception_code == 2
        r = await c.read_holding_registers(40000, count=2, device_id=ep.unit + 1)
        assert r.isError() and r.exception_code == 0x0B  # gateway target did not respond
        r = await c.read_holding_registers(30000, count=2, device_id=ep.unit)
        assert r.isError() and r.exception_code == 2  # outside the image


# ----------------------------------------------------------------------------------- faults


async def test_fault_timeout(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock) as sim:
        c, u, w = await connect(sim, "meter", client_for, io_timeout=0.3)
        sim.faults["meter"].timeout()
        with pytest.raises(ModbusIOException):
            await c.read_holding_registers(w[203], count=4, device_id=u)
        sim.faults["meter"].clear()
        r = await c.read_holding_registers(w[203], count=4, device_id=u)
        assert not r.isError()


async def test_fault_timeout_expires_in_domain_time(fast_clock: SimClock,
                                                    client_for: Any) -> None:
    async with home(fast_clock) as sim:
        c, u, w = await connect(sim, "meter", client_for, io_timeout=0.3)
        sim.faults["meter"].timeout(duration_s=60)  # 0.1 s real at 600x
        await fast_clock.sleep(61)
        r = await c.read_holding_registers(w[203], count=4, device_id=u)
        assert not r.isError()


async def test_fault_exception(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock) as sim:
        c, u, w = await connect(sim, "battery", client_for)
        sim.faults["battery"].exception(code=6)
        r = await c.read_holding_registers(w[802], count=10, device_id=u)
        assert r.isError() and r.exception_code == 6
        r = await write_point(c, u, w, 124, "StorCtl_Mod", 1)
        assert r.isError() and r.exception_code == 6
        assert sim.physics.storage.mode == 0  # the refused write did nothing
        sim.faults["battery"].clear()
        assert not (await c.read_holding_registers(w[802], count=10, device_id=u)).isError()


async def wait_disconnected(c: AsyncModbusTcpClient) -> None:
    async with asyncio.timeout(3):
        while c.connected:  # noqa: ASYNC110 - the client offers no disconnect event to await
            await asyncio.sleep(0.01)


async def test_fault_drop_closes_the_connection(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock) as sim:
        c, u, _ = await connect(sim, "inverter", client_for)
        assert len(sim.servers["inverter"].active_connections) == 1
        sim.faults["inverter"].drop()
        await wait_disconnected(c)
        assert not sim.servers["inverter"].active_connections
        # a one-shot drop: the device takes new connections at once
        c2 = await client_for(sim.endpoint("inverter"))
        assert not (await c2.read_holding_registers(40000, count=2, device_id=u)).isError()


async def test_fault_drop_window_drops_every_request(fast_clock: SimClock,
                                                     client_for: Any) -> None:
    async with home(fast_clock) as sim:
        ep = sim.endpoint("meter")
        sim.faults["meter"].drop(duration_s=600)
        c = await client_for(ep, io_timeout=0.5)
        with pytest.raises((ModbusIOException, ConnectionException)):
            await c.read_holding_registers(40000, count=2, device_id=ep.unit)
        await wait_disconnected(c)


async def test_fault_frozen(client_for: Any) -> None:
    fast_clock = SimClock(NOON, speed=6000.0)
    async with home(fast_clock, HomeConfig(pv_kwp=0, battery_wh=0), load=2000, pv=0) as sim:
        c, u, w = await connect(sim, "meter", client_for)
        sim.faults["meter"].frozen()
        a = await read_point(c, u, w, 203, "TotWhImp")
        imp_a = sim.physics.state().import_wh
        await fast_clock.sleep(600)
        b = await read_point(c, u, w, 203, "TotWhImp")
        assert sim.physics.state().import_wh - imp_a > 300  # the home moved on
        assert a == b  # the registers did not
        sim.faults["meter"].clear()
        c_ = await read_point(c, u, w, 203, "TotWhImp")
        assert c_ is not None and b is not None and c_ - b > 300


async def test_fault_out_of_range(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock) as sim:
        inv, u, w = await connect(sim, "inverter", client_for)
        bat, bu, bw = await connect(sim, "battery", client_for)
        sim.faults["inverter"].out_of_range()
        sim.faults["battery"].out_of_range(duration_s=300)
        assert await read_point(inv, u, w, 103, "W") == 32767
        assert await read_point(bat, bu, bw, 802, "SoC") == pytest.approx(250)
        assert await read_point(bat, bu, bw, 124, "ChaState") == pytest.approx(250)
        await fast_clock.sleep(301)
        soc = await read_point(bat, bu, bw, 802, "SoC")
        assert soc is not None and soc < 100


async def test_fault_ratings_change(fast_clock: SimClock, client_for: Any) -> None:
    async with home(fast_clock, load=500, pv=4000) as sim:
        c, u, w = await connect(sim, "inverter", client_for)
        sim.faults["inverter"].ratings_change(w_rtg=3000)
        await wait_disconnected(c)  # the device rebooted
        c2 = await client_for(sim.endpoint("inverter"))
        assert await read_point(c2, u, w, 120, "WRtg") == 3000
        assert await read_point(c2, u, w, 121, "WMax") == 3000
        assert await read_point(c2, u, w, 103, "W") == pytest.approx(3000, abs=1)
        bat, bu, bw = await connect(sim, "battery", client_for)
        sim.faults["battery"].ratings_change()  # default: half the charge rate
        await wait_disconnected(bat)
        bat2 = await client_for(sim.endpoint("battery"))
        assert await read_point(bat2, bu, bw, 124, "WChaMax") == 2500
        sim.faults["inverter"].clear()
        assert await read_point(c2, u, w, 120, "WRtg") == 5000


# ---------------------------------------------------------------------------- several homes


@pytest.fixture
def stand_in_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Homes built without explicit profiles get the stand-in ones (this test module only)."""
    lp, pp = flat_profiles(700, 2000)
    monkeypatch.setattr(home_mod, "profiles_for", lambda cfg: (lp, pp))


@pytest.mark.usefixtures("stand_in_data")
async def test_run_homes_are_independent(fast_clock: SimClock, client_for: Any) -> None:
    cfgs = [HomeConfig(home_index=i, pv_kwp=k, battery_wh=b)
            for i, (k, b) in enumerate([(5, 10000), (0, 0), (3, 5000)])]
    async with run_homes(fast_clock, cfgs) as homes:
        assert [len(h.endpoints) for h in homes] == [3, 1, 3]  # no PV/battery, no device
        ports = [e.port for h in homes for e in h.endpoints]
        assert len(set(ports)) == len(ports)
        homes[0].faults["meter"].exception(4)
        c, u, w = await connect(homes[2], "meter", client_for)
        # 2000 W PV, 700 W load: the battery soaks up the surplus, nothing crosses the meter
        assert await read_point(c, u, w, 203, "W") == pytest.approx(0, abs=1)
        c0, u0, w0 = await connect(homes[1], "meter", client_for)
        assert await read_point(c0, u0, w0, 203, "W") == pytest.approx(700, abs=1)


def test_parse_start() -> None:
    assert parse_start("2024-06-03T12:00:00Z") == NOON
    assert parse_start("2024-06-03T12:00:00") == NOON  # naive = UTC
    assert parse_start(str(NOON)) == NOON
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_start("noon")


class LineSink(io.StringIO):
    """A stdout stand-in that signals the first complete line."""

    def __init__(self) -> None:
        super().__init__()
        self.got_line = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if "\n" in self.getvalue():
            self.got_line.set()
        return n


@pytest.mark.usefixtures("stand_in_data")
async def test_serve_prints_one_ready_line_and_stops_cleanly(client_for: Any) -> None:
    out = LineSink()
    task = asyncio.create_task(serve(speed=100.0, start="2024-06-03T12:00:00Z", out=out))
    async with asyncio.timeout(5):
        await out.got_line.wait()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    devices = json.loads(lines[0])["devices"]
    assert [d["kind"] for d in devices] == ["inverter", "battery", "meter"]
    assert set(devices[0]) == {"kind", "host", "port", "unit"}
    for d in devices:
        c = await client_for(type("E", (), d))
        r = await c.read_holding_registers(40000, count=2, device_id=d["unit"])
        assert tuple(r.registers) == SUNS_MARKER
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for d in devices:  # the ports are free again
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((d["host"], d["port"]))
