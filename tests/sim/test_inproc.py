"""The in-process transport (drivers.inproc) answers as the Modbus TCP server does.

The same simulated device is served both ways at once, on a clock that stands still, and the
same requests through :class:`drivers.modbus.ModbusLink` must give the same registers or the
same error; then the gateway's own discovery and natures read the same values both ways, and
faults keep their meaning (no reply = timeout, drop = lost connection, exceptions named).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from drivers import inproc
from drivers.factory import DeviceSpec, connect_device
from drivers.modbus import ModbusLink
from drivers.natures import DeviceError, DeviceRejected, DeviceTimeout
from firmware_sim.home import HomeConfig
from firmware_sim.server import SimulatedHome, run_home
from gateway.daemon import _Slot

from .conftest import NOON, ManualClock, day_profiles


@contextlib.asynccontextmanager
async def both(clock: Any, name: str = "t") -> AsyncIterator[SimulatedHome]:
    """One home on Modbus TCP whose devices are also served in process as ``<name>-<kind>``."""
    lp, pp = day_profiles()
    async with run_home(clock, HomeConfig(), load=lp, pv=pp) as sim:
        for kind, dev in sim.devices.items():
            inproc.serve(f"{name}-{kind}", dev)
        try:
            yield sim
        finally:
            for kind in sim.devices:
                inproc.unserve(f"{name}-{kind}")


async def outcome(link: ModbusLink, op: str, address: int, arg: Any) -> Any:
    try:
        if op == "read":
            return ("ok", await link.read_holding(address, arg))
        if op == "input":
            return ("ok", await link.read_input(address, arg))
        await link.write_registers(address, arg)
        return ("ok", None)
    except DeviceRejected as e:  # the message names the link: compare the exception part
        return ("rejected", e.reason.split(" reading")[0].split(" writing")[0])


REQUESTS: list[tuple[str, int, Any]] = [
    ("read", 40000, 2), ("read", 40000, 125), ("input", 40002, 66), ("read", 39999, 2),
    ("read", 40000 + 400, 2), ("write", 40000, [0]),  # the SunS marker is not writable
    ("read", 40002, 70), ("read", 40070, 50),
]


@pytest.mark.parametrize("kind", ["meter", "inverter", "battery"])
async def test_same_answers_as_modbus_tcp(kind: str) -> None:
    clock = ManualClock(NOON)
    async with both(clock) as sim:
        ep = sim.endpoint(kind)
        async with ModbusLink.tcp(ep.host, ep.port, ep.unit) as tcp, \
                ModbusLink.inproc(f"t-{kind}", ep.unit) as mem:
            for op, addr, arg in REQUESTS:
                assert await outcome(mem, op, addr, arg) == await outcome(tcp, op, addr, arg), \
                    (op, addr, arg)
        async with ModbusLink.tcp(ep.host, ep.port, ep.unit + 1) as tcp, \
                ModbusLink.inproc(f"t-{kind}", ep.unit + 1) as mem:
            want = await outcome(tcp, "read", 40000, 2)
            assert want[0] == "rejected" and "GATEWAY TARGET" in want[1]
            assert await outcome(mem, "read", 40000, 2) == want


async def test_gateway_natures_read_the_same_values_and_writes_act() -> None:
    clock = ManualClock(NOON)
    async with both(clock) as sim:
        got = {}
        for transport in ("tcp", "inproc"):
            devs = {}
            for kind in ("meter", "inverter", "battery"):
                ep = sim.endpoint(kind)
                spec = DeviceSpec(kind=kind, transport=transport,  # type: ignore[arg-type]
                                  host=ep.host if transport == "tcp" else f"t-{kind}",
                                  port=ep.port, unit=ep.unit)
                devs[kind] = await connect_device(spec, clock=clock)
            got[transport] = {
                "meter": (await devs["meter"].read()).site_w,  # type: ignore[union-attr]
                "inverter": (await devs["inverter"].read()).ac_w,  # type: ignore[union-attr]
                "battery": (await devs["battery"].read()).soc_pct,  # type: ignore[union-attr]
            }
            # the gateway arms no timer of its own around an in-process device's reads
            assert all(_Slot(k, None, dev=d).self_bounded == (transport == "inproc")
                       for k, d in devs.items())
            if transport == "inproc":
                await devs["inverter"].set_limit_pct(40.0, 600.0)  # type: ignore[union-attr]
                assert sim.physics.inverter.r_target == pytest.approx(40.0)
            for d in devs.values():
                await d.close()
        assert got["tcp"] == got["inproc"]
        assert got["tcp"]["inverter"] > 0


async def test_faults_keep_their_meaning() -> None:
    clock = ManualClock(NOON)
    async with both(clock) as sim:
        faults = sim.faults["meter"]
        async with ModbusLink.inproc("t-meter", 1, timeout_s=0.2) as link:
            assert len(await link.read_holding(40000, 2)) == 2
            faults.exception(code=6)
            with pytest.raises(DeviceRejected, match=r"SERVER DEVICE BUSY \(6\)"):
                await link.read_holding(40000, 2)
            faults.clear()
            faults.timeout()
            t0 = time.monotonic()
            with pytest.raises(DeviceTimeout, match="no reply"):
                await link.read_holding(40000, 2)
            assert time.monotonic() - t0 >= 0.2  # the client waited its timeout out
            faults.clear()
            assert len(await link.read_holding(40000, 2)) == 2
            faults.drop()  # one-shot: the connection goes, the next request reconnects
            assert not link.connected
            assert len(await link.read_holding(40000, 2)) == 2
            faults.drop(duration_s=60)  # a window: every request is dropped
            with pytest.raises(DeviceError, match="dropped"):
                await link.read_holding(40000, 2)


async def test_an_unknown_name_is_a_refused_connection() -> None:
    link = ModbusLink.inproc("nobody-home", 1, timeout_s=0.2)
    with pytest.raises(DeviceError, match="cannot connect"):
        await link.read_holding(40000, 2)
    with pytest.raises(ValueError, match="already served"):
        async with both(ManualClock(NOON), "dup"):
            inproc.serve("dup-meter", object())  # type: ignore[arg-type]


async def test_in_process_homes_register_and_unregister() -> None:
    clock = ManualClock(NOON)
    async with run_home(clock, HomeConfig(), transport="inproc", name="h7") as sim:
        assert {e.host for e in sim.endpoints} <= set(inproc.served())
        assert all(e.transport == "inproc" for e in sim.endpoints)
    assert not [n for n in inproc.served() if n.startswith("h7-")]
    with pytest.raises(ValueError, match="needs a name"):
        async with run_home(clock, HomeConfig(), transport="inproc"):
            pass


async def test_in_process_requests_arm_no_timer() -> None:
    """A fleet simulation makes thousands of requests a second: the in-process link answers
    them without a timer (a Modbus TCP link, for contrast, arms at least one per request)."""
    loop = asyncio.get_running_loop()
    armed: list[Any] = []
    real_call_at = loop.call_at

    def spy(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        armed.append(callback)
        return real_call_at(when, callback, *args, **kw)

    async with both(ManualClock(NOON)) as sim:
        meter = sim.endpoint("meter")
        async with ModbusLink.inproc("t-meter", 1, timeout_s=0.2) as fast, \
                ModbusLink.tcp(meter.host, meter.port, meter.unit, timeout_s=0.5) as wire:
            for link in (fast, wire):  # connected before counting
                await link.read_holding(40000, 2)
            counts = {}
            for label, link in (("inproc", fast), ("tcp", wire)):
                armed.clear()
                loop.call_at = spy  # type: ignore[method-assign]
                try:
                    for _ in range(10):
                        assert len(await link.read_holding(40002, 66)) == 66
                finally:
                    del loop.call_at  # the bound method of the class again
                counts[label] = len(armed)
    assert counts["inproc"] == 0 and counts["tcp"] >= 10, counts
