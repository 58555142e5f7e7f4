"""The simulated home/community demo: the README's main command (``hems demo``).

It starts the simulated devices (real pymodbus servers from ``firmware_sim``), connects to them
over Modbus TCP exactly as the gateway does in the field, runs the control loop on an accelerated
:class:`~drivers.clock.SimClock`, and returns one report dictionary. Later issues add sections
to the same report (telemetry, envelope, market, costs, reliability).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from drivers.clock import SimClock
from drivers.factory import DeviceSpec, Kind, connect_device
from drivers.natures import Battery, DeviceError, Inverter, Meter
from firmware_sim.home import HomeConfig
from firmware_sim.server import run_home

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    """What to simulate. Defaults: one home, one simulated day, 5 s cycle, ~1 min of wall time."""

    sim_hours: float = 24.0
    homes: int = 1
    speed: float = 1440.0
    cycle_s: float = 5.0
    start: str | None = "2026-06-21T00:00:00Z"
    out_dir: str | None = None
    home_index: int = 0


@dataclass
class _Counters:
    polls: int = 0
    poll_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    battery_charge_wh: float = 0.0
    battery_discharge_wh: float = 0.0
    cycle_cpu_s: float = 0.0


def _parse_start(start: str | None) -> float:
    if not start:
        return time.time()
    return datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC).timestamp()


async def _poll_loop(
    clock: SimClock,
    meter: Meter,
    inverter: Inverter,
    battery: Battery,
    end: float,
    cycle_s: float,
    c: _Counters,
) -> None:
    """The issue-2 gateway loop: poll the three natures every cycle and keep counters.

    Energies come from the devices' own counters (meter import/export, inverter lifetime Wh);
    battery throughput is integrated from its polled power, as the device has no counter in
    the models we read.
    """
    next_t = clock.now()
    prev_bat: tuple[float, float] | None = None
    while clock.now() < end:
        t_cpu = time.process_time()
        try:
            m, i, b = await asyncio.gather(meter.read(), inverter.read(), battery.read())
        except DeviceError as e:
            c.poll_errors += 1
            c.errors[type(e).__name__] = c.errors.get(type(e).__name__, 0) + 1
            log.warning("poll failed: %s", e)
        else:
            c.polls += 1
            vals = {
                "import_wh": m.import_wh,
                "export_wh": m.export_wh,
                "pv_wh": i.energy_wh,
            }
            for k, v in vals.items():
                if v is None:
                    continue
                c.first.setdefault(k, v)
                c.last[k] = v
            if prev_bat is not None:
                dt_h = (b.ts - prev_bat[0]) / 3600.0
                w = prev_bat[1]
                if w > 0:
                    c.battery_charge_wh += w * dt_h
                else:
                    c.battery_discharge_wh += -w * dt_h
            prev_bat = (b.ts, b.w)
        c.cycle_cpu_s += time.process_time() - t_cpu
        next_t += cycle_s
        now = clock.now()
        if next_t < now:  # fell behind: skip missed cycles instead of bursting
            next_t = now
        await clock.sleep_until(next_t)


async def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo and return the report (see ``hems demo --json``)."""
    if opts.homes != 1:
        # The community demo (several gateways, market operator, DSO) is issue 6's work.
        raise ValueError("hems demo runs one home for now (--homes 1)")
    start = _parse_start(opts.start)
    clock = SimClock(start=start, speed=opts.speed)
    wall0 = time.monotonic()
    c = _Counters()
    home = HomeConfig(home_index=opts.home_index)
    async with run_home(clock, home) as sim:
        natures: dict[str, Any] = {}
        for ep in sim.endpoints:
            spec = DeviceSpec(
                kind=cast(Kind, ep.kind), transport="tcp", host=ep.host, port=ep.port, unit=ep.unit,
                name=f"sim-{ep.kind}",
            )
            natures[ep.kind] = await connect_device(spec, clock=clock)
        end = clock.now() + opts.sim_hours * 3600.0
        try:
            await _poll_loop(
                clock, natures["meter"], natures["inverter"], natures["battery"], end,
                opts.cycle_s, c,
            )
        finally:
            for n in natures.values():
                with contextlib.suppress(Exception):
                    await n.close()
        truth = sim.physics.totals() if hasattr(sim.physics, "totals") else {}

    def delta(k: str) -> float:
        return (c.last.get(k, 0.0) - c.first.get(k, 0.0)) / 1000.0

    imp, exp, pv = delta("import_wh"), delta("export_wh"), delta("pv_wh")
    bat_c, bat_d = c.battery_charge_wh / 1000.0, c.battery_discharge_wh / 1000.0
    # Energy balance at the site: load = import - export + pv - charge + discharge.
    load = imp - exp + pv - bat_c + bat_d
    wall = time.monotonic() - wall0
    report: dict[str, Any] = {
        "ok": c.polls > 0,
        "sim_hours": opts.sim_hours,
        "homes": opts.homes,
        "cycle_s": opts.cycle_s,
        "speed": opts.speed,
        "polls": c.polls,
        "poll_errors": c.poll_errors,
        "energy_kwh": {
            "load": round(load, 3),
            "pv": round(pv, 3),
            "import": round(imp, 3),
            "export": round(exp, 3),
            "battery_charge": round(bat_c, 3),
            "battery_discharge": round(bat_d, 3),
        },
        "wall_s": round(wall, 2),
        "cpu_ms_per_cycle": round(1000.0 * c.cycle_cpu_s / max(1, c.polls + c.poll_errors), 3),
    }
    if truth:
        report["truth_kwh"] = {k: round(float(v), 3) for k, v in truth.items()}
    return report


def format_report(r: dict[str, Any]) -> str:
    """A few lines a person reads."""
    e = r["energy_kwh"]
    lines = [
        f"hems demo: {r['homes']} home(s), {r['sim_hours']:g} simulated h in {r['wall_s']} s wall "
        f"(cycle {r['cycle_s']:g} s, speed x{r['speed']:g})",
        f"  polls {r['polls']}, poll errors {r['poll_errors']}, "
        f"CPU {r['cpu_ms_per_cycle']} ms/cycle (gateway side)",
        f"  energy kWh: load {e['load']}, pv {e['pv']}, import {e['import']}, "
        f"export {e['export']}, "
        f"battery +{e['battery_charge']}/-{e['battery_discharge']}",
    ]
    if "truth_kwh" in r:
        t = r["truth_kwh"]
        lines.append("  simulator truth kWh: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return "\n".join(lines)
