"""The simulated home/community demo: the README's main command (``hems demo``).

It runs the real gateway daemon (:func:`gateway.daemon.run_gateway`: the same supervisor, fast
loop, store and MQTT session as ``hems run``) against the simulated devices (real pymodbus
servers from ``firmware_sim``) over Modbus TCP, and a local broker (Mosquitto when installed,
else the embedded amqtt broker), on an accelerated :class:`~drivers.clock.SimClock`. An
independent MQTT subscriber plays the dashboard: it counts the telemetry sequence numbers that
actually arrive, so ``telemetry.lost`` is measured at the consumer, not claimed by the producer.

The result is one report dictionary; later issues add sections to it (envelope, market, costs,
reliability).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt

from drivers.clock import SimClock
from firmware_sim.home import HomeConfig
from firmware_sim.server import run_home
from gateway.broker import local_broker
from gateway.config import parse_config
from gateway.daemon import run_gateway

log = logging.getLogger(__name__)
SITE = "demo-home"


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
    broker: str = "auto"  # auto | mosquitto | amqtt


@dataclass
class _Dashboard:
    """Counts the telemetry sequence numbers a subscriber receives (QoS 1)."""

    seqs: list[int] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    discovery: int = 0

    async def run(self, host: str, port: int, site: str) -> None:
        while True:
            try:
                async with aiomqtt.Client(host, port, identifier="hems-demo-dashboard",
                                          clean_session=False) as c:
                    await c.subscribe(f"hems/v1/{site}/telemetry", qos=1)
                    await c.subscribe("homeassistant/#", qos=1)
                    self.ready.set()
                    async for m in c.messages:
                        if m.topic.matches("homeassistant/#"):
                            self.discovery += 1
                            continue
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            self.seqs.append(int(json.loads(m.payload)["seq"]))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


def _parse_start(start: str | None) -> float:
    if not start:
        return time.time()
    return datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC).timestamp()


async def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo and return the report (see ``hems demo --json``)."""
    if opts.homes != 1:
        # The community demo (several gateways, market operator, DSO) is issue 6's work.
        raise ValueError("hems demo runs one home for now (--homes 1)")
    start = _parse_start(opts.start)
    wall0 = time.monotonic()
    with contextlib.ExitStack() as es:
        out = Path(opts.out_dir) if opts.out_dir else Path(es.enter_context(
            tempfile.TemporaryDirectory(prefix="hems-demo-")))
        out.mkdir(parents=True, exist_ok=True)
        db = out / "gateway.db"
        for p in out.glob("gateway.db*"):  # a demo starts from an empty store
            p.unlink()
        async with local_broker(prefer=opts.broker) as broker:
            dash = _Dashboard()
            dash_task = asyncio.create_task(dash.run(broker.host, broker.port, SITE))
            await asyncio.wait_for(dash.ready.wait(), 10.0)
            clock = SimClock(start=start, speed=opts.speed)
            async with run_home(clock, HomeConfig(home_index=opts.home_index)) as sim:
                config = parse_config({
                    "site_id": SITE,
                    "devices": [{"kind": e.kind, "name": f"sim-{e.kind}", "host": e.host,
                                 "port": e.port, "unit": e.unit, "timeout_s": 1.0}
                                for e in sim.endpoints],
                    "broker": {"url": broker.url, "keepalive_s": 10, "connect_timeout_s": 5.0},
                    "store": {"path": str(db), "telemetry_interval_s": 60.0,
                              "commit_interval_s": 300.0},
                    "mqtt": {"state_interval_s": 60.0},
                    "control": {"cycle_s": opts.cycle_s, "startup_grace_s": 5.0},
                })
                end = clock.now() + opts.sim_hours * 3600.0
                stats = await run_gateway(config, clock, until=end)
                truth = sim.physics.totals()
            # let the dashboard take the last QoS 1 messages off the broker (bounded wait)
            deadline = time.monotonic() + 5.0
            while len(set(dash.seqs)) < stats.telemetry_published:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            dash_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dash_task
            broker_kind = broker.kind

    received = sorted(set(dash.seqs))
    produced = stats.telemetry_produced
    e = stats.energy_wh
    wall = time.monotonic() - wall0
    cycles = max(1, stats.cycles)
    return {
        "ok": stats.polls > 0 and stats.telemetry_lost == 0,
        "sim_hours": opts.sim_hours,
        "homes": opts.homes,
        "cycle_s": opts.cycle_s,
        "speed": opts.speed,
        "polls": stats.polls,
        "poll_errors": stats.poll_errors,
        "overruns": stats.overruns,
        "energy_kwh": {
            "load": round(e.get("load", 0.0) / 1000.0, 3),
            "pv": round(e.get("pv", 0.0) / 1000.0, 3),
            "import": round(e.get("import", 0.0) / 1000.0, 3),
            "export": round(e.get("export", 0.0) / 1000.0, 3),
            "battery_charge": round(e.get("charge", 0.0) / 1000.0, 3),
            "battery_discharge": round(e.get("discharge", 0.0) / 1000.0, 3),
        },
        "truth_kwh": {k: round(float(v), 3) for k, v in truth.items()},
        "telemetry": {
            "produced": produced,
            "stored": stats.telemetry_stored,
            "published": stats.telemetry_published,
            "received": len(received),
            "lost": stats.telemetry_lost,
            "in_order": received == list(range(received[0], received[0] + len(received)))
            if received else True,
        },
        "ha_discovery_configs": dash.discovery,
        "broker": broker_kind,
        "wall_s": round(wall, 2),
        "cycles_per_wall_s": round(cycles / max(wall, 1e-9), 1),
    }


def format_report(r: dict[str, Any]) -> str:
    """A few lines a person reads."""
    e, t, tel = r["energy_kwh"], r["truth_kwh"], r["telemetry"]
    return "\n".join([
        f"hems demo: {r['homes']} home(s), {r['sim_hours']:g} simulated h in {r['wall_s']} s wall "
        f"(cycle {r['cycle_s']:g} s, speed x{r['speed']:g}, broker: {r['broker']})",
        f"  polls {r['polls']}, poll errors {r['poll_errors']}, late cycles {r['overruns']}",
        f"  energy kWh (gateway): load {e['load']}, pv {e['pv']}, import {e['import']}, "
        f"export {e['export']}, battery +{e['battery_charge']}/-{e['battery_discharge']}",
        "  energy kWh (simulator): " + ", ".join(f"{k} {v}" for k, v in t.items()),
        f"  telemetry: produced {tel['produced']}, stored {tel['stored']}, published "
        f"{tel['published']}, received by the dashboard {tel['received']}, lost {tel['lost']}",
        f"  Home Assistant discovery configs seen: {r['ha_discovery_configs']}",
    ])
