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

from drivers.clock import SimClock, grid_slot
from firmware_sim.home import HomeConfig, HomePhysics
from firmware_sim.profiles import pv_profile
from firmware_sim.server import run_home
from gateway.broker import local_broker
from gateway.config import parse_config
from gateway.daemon import Gateway, run_gateway

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
    planner: bool = True  # forecast -> optimize slow loop (the fast loop follows the plan)


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


def _planner_table(home: HomeConfig, enabled: bool) -> dict[str, Any]:
    """The gateway's ``[planner]`` table for the simulated home's PV array.

    The shipped PV profile is in the site's local standard time, which the simulation treats as
    UTC: the sun is where the data has it if the longitude is shifted by the time zone.
    """
    pvp = pv_profile(home.pv_site, step_s=60, seed=home.pv_seed)
    return {
        "enabled": enabled, "step_s": 900, "horizon_s": 86400, "budget_ms": 1000.0,
        "lat": pvp.lat, "lon": pvp.lon - 15.0 * pvp.tz_hours, "pv_kwp": home.pv_kwp,
        "pv_ac_limit_w": home.inverter_rated_w,
    }


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
            if opts.planner:
                # Import cvxpy (~2 s) before simulated time starts: at x1440 a 2 s stall of the
                # fast loop would be half an hour of the home unobserved.
                import gateway.optimize  # noqa: F401

            clock = SimClock(start=start, speed=opts.speed)
            home = HomeConfig(home_index=opts.home_index)
            async with run_home(clock, home) as sim:
                dso = EnvelopeDemo(SITE, start, broker.url, clock)  # envelope section
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
                    "envelope": dso.config_table(),
                    "planner": _planner_table(home, opts.planner),
                })
                end = clock.now() + opts.sim_hours * 3600.0
                gws: list[Gateway] = []
                window = asyncio.create_task(_observed_window(gws, sim.physics, clock, end))
                async with dso.running(sim, end):
                    stats = await run_gateway(config, clock, until=end, on_ready=gws.append)
                truth = await window
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
        "envelope": dso.report(stats.envelope),
        "planner": _planner_report(stats.planner),
        "broker": broker_kind,
        "wall_s": round(wall, 2),
        "cycles_per_wall_s": round(cycles / max(wall, 1e-9), 1),
    }


async def _observed_window(gws: list[Gateway], physics: HomePhysics, clock: SimClock,
                           end: float) -> dict[str, float]:
    """The simulator's energies over what the gateway observed: from its first cycle to the
    end of the run. Before its first reading a gateway cannot know what flowed (startup takes
    real seconds, minutes of domain time at x720); the shutdown after ``end`` is not its either.
    """
    # The gateway has no event for its first cycle; a 2 ms poll is seconds of domain time
    # at most, a few Wh.
    while (not gws or gws[0].stats.cycles == 0) and clock.now() < end:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    first = physics.totals()
    await clock.sleep_until(end)
    last = physics.totals()
    return {k: last[k] - first[k] for k in last}


def _planner_report(p: dict[str, Any]) -> dict[str, Any]:
    lp = int(p.get("lp", 0))
    return {
        "plans": int(p.get("plans", 0)), "lp": lp, "fallbacks": int(p.get("fallbacks", 0)),
        "errors": int(p.get("errors", 0)),
        "solve_ms_mean": round(float(p.get("solve_ms_sum", 0.0)) / lp, 2) if lp else None,
        "solve_ms_max": p.get("solve_ms_max"),
    }


def format_report(r: dict[str, Any]) -> str:
    """A few lines a person reads."""
    e, t, tel = r["energy_kwh"], r["truth_kwh"], r["telemetry"]
    return "\n".join([
        f"hems demo: {r['homes']} home(s), {r['sim_hours']:g} simulated h in {r['wall_s']} s wall "
        f"(cycle {r['cycle_s']:g} s, speed x{r['speed']:g}, broker: {r['broker']})",
        f"  polls {r['polls']}, poll errors {r['poll_errors']}, late cycles {r['overruns']}",
        f"  planner: {r['planner']['plans']} plans ({r['planner']['lp']} LP, "
        f"{r['planner']['fallbacks']} fallback), solve ms mean {r['planner']['solve_ms_mean']}, "
        f"max {r['planner']['solve_ms_max']}",
        f"  energy kWh (gateway): load {e['load']}, pv {e['pv']}, import {e['import']}, "
        f"export {e['export']}, battery +{e['battery_charge']}/-{e['battery_discharge']}",
        "  energy kWh (simulator): " + ", ".join(f"{k} {v}" for k, v in t.items()),
        f"  telemetry: produced {tel['produced']}, stored {tel['stored']}, published "
        f"{tel['published']}, received by the dashboard {tel['received']}, lost {tel['lost']}",
        f"  Home Assistant discovery configs seen: {r['ha_discovery_configs']}",
        *([f"  envelope: {v['controls']} controls; max export exceedance "
           f"{v['max_export_exceedance_w']} W, import {v['max_import_exceedance_w']} W, "
           f"{v['exceedance_s']} s above tolerance, p99 response {v['p99_response_s']} s"]
          if (v := r.get("envelope")) else []),
    ])


# ============================================================================================
# Envelope section (issue 4): the DSO's stress day next to the gateway, and its compliance
# measured on the simulator's physics (not on what the gateway believes).
# ============================================================================================


@dataclass
class EnvelopeObserver:
    """Samples the simulated home's physics every ``step_s`` domain seconds and measures, against
    the limits the DSO asked for (``limits_at``), how far and how long the site went outside.

    Exceedance = export above the export limit (import above the import limit) by more than
    ``tolerance_w``. The response to an event (a limit change, or a load step larger than the
    tolerance) is the time from the event to the first sample inside the limit (0 if it never
    left)."""

    physics: Any  # firmware_sim.home.HomePhysics
    clock: Any  # drivers.clock.Clock
    limits_at: Any  # Callable[[float], gateway.envelope.Limits]
    tolerance_w: float
    step_s: float = 1.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, site, exceed
    # Samples at t = phase_s + k * step_s (None: from the start). Observers of many homes in one
    # process are spread over the step, not woken all at once.
    phase_s: float | None = None
    # Sample through the physics' probes (HomePhysics.add_probe) instead of a task woken on the
    # grid: cheaper, exact grid times, but samples appear only as something advances the model
    # (a device read): for runs judged at the end, not by a caller reading ``samples`` live.
    by_probe: bool = False

    async def run(self, until: float) -> None:
        """Sample until domain time ``until`` (samples at ``t < until``).

        With ``by_probe`` the samples are taken by the physics' integration as it passes each
        grid time (:meth:`firmware_sim.home.HomePhysics.add_probe`): exact grid times and no task
        woken per sample (in the community demo the observers' wake-ups cost more CPU than the
        homes' physics). Otherwise this task wakes on the grid and samples."""
        if self.by_probe:
            def probe(t: float, flows: tuple[float, float, float, float, float]) -> None:
                if t < until:
                    load, _avail, pv, bat, _lim = flows
                    self._add(t, load - pv + bat, load)

            self.physics.add_probe(self.step_s, probe,
                                   self.clock.now() if self.phase_s is None else self.phase_s)
            await self.clock.sleep_until(until)
            self.physics.advance(until)  # the last samples, if nothing read the home since
            return
        t = grid_slot(self.clock.now(), self.step_s, self.phase_s)
        while t < until:
            await self.clock.sleep_until(t)
            self._add(*self.physics.site_now())
            t += self.step_s
            if t < self.clock.now():  # woke late by a step or more (that was the sample at
                # once): on from the next slot, no burst of catch-up samples
                t = grid_slot(self.clock.now(), self.step_s, self.phase_s) + self.step_s

    def _add(self, ts: float, site_w: float, load_w: float) -> None:
        lim = self.limits_at(ts)
        exp = max(0.0, -site_w - lim.export_w) if lim.export_w is not None else 0.0
        imp = max(0.0, site_w - lim.import_w) if lim.import_w is not None else 0.0
        self.samples.append((ts, site_w, exp if exp >= imp else -imp))
        self._loads.append(load_w)

    def __post_init__(self) -> None:
        self._loads: list[float] = []

    def episodes(self) -> list[tuple[float, float, float]]:
        """Runs of samples above the tolerance: (start, duration to the first sample back
        inside, largest exceedance W)."""
        out: list[tuple[float, float, float]] = []
        start: float | None = None
        peak = 0.0
        for t, _, e in self.samples:
            if abs(e) > self.tolerance_w:
                start = t if start is None else start
                peak = max(peak, abs(e))
            elif start is not None:
                out.append((start, t - start, peak))
                start, peak = None, 0.0
        if start is not None:
            out.append((start, self.samples[-1][0] - start, peak))
        return out

    def report(self, change_times: tuple[float, ...] = ()) -> dict[str, Any]:
        """``max_export_exceedance_w``, ``max_import_exceedance_w``, ``exceedance_s``,
        ``longest_exceedance_s``, ``episodes``, ``events``, ``p99_response_s``,
        ``max_response_s``."""
        import numpy as np

        smp = self.samples
        tol = self.tolerance_w
        over = [abs(e) > tol for _, _, e in smp]
        exceed_s = sum(smp[i + 1][0] - smp[i][0] for i in range(len(smp) - 1) if over[i])
        episodes = self.episodes()
        events = [t for t in change_times if smp and smp[0][0] <= t <= smp[-1][0]]
        loads = self._loads
        events += [smp[i][0] for i in range(1, len(smp)) if abs(loads[i] - loads[i - 1]) > tol]
        responses = []
        ts = [t for t, _, _ in smp]
        for ev in sorted(set(events)):
            i = int(np.searchsorted(ts, ev))
            j = i
            while j < len(smp) and over[j]:
                j += 1
            if i < len(smp) and j < len(smp):
                responses.append(smp[j][0] - ev if j > i else 0.0)
        return {
            "max_export_exceedance_w": round(max([0.0, *(e for _, _, e in smp)]), 1),
            "max_import_exceedance_w": round(max([0.0, *(-e for _, _, e in smp)]), 1),
            "exceedance_s": round(exceed_s, 1),
            "episodes": len(episodes),
            "longest_exceedance_s": round(max((d for _, d, _ in episodes), default=0.0), 1),
            "events": len(responses),
            "p99_response_s": round(float(np.percentile(responses, 99)), 1) if responses
            else 0.0,
            "max_response_s": round(max(responses, default=0.0), 1),
        }


class EnvelopeDemo:
    """The DSO next to the demo's gateway: an ephemeral Ed25519 key, the stress day of the demo's
    day (``community.scenarios.stress_day``) published by :class:`community.dso.DsoPublisher`,
    and an :class:`EnvelopeObserver` on the home's physics. ``report()`` is the demo's
    ``envelope`` section."""

    def __init__(self, site: str, start: float, broker_url: str, clock: Any) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from community.scenarios import stress_day

        self.key = Ed25519PrivateKey.generate()
        self.day = stress_day(site, start - start % 86400.0)
        self.broker_url = broker_url
        self.clock = clock
        self.observer: EnvelopeObserver | None = None
        self.stats: dict[str, Any] = {}
        self.acks: dict[str, int] = {}

    def config_table(self) -> dict[str, Any]:
        """The gateway's ``[envelope]`` table."""
        from gateway.signing import public_key_to_b64

        return {"dso_public_key": public_key_to_b64(self.key.public_key())}

    @contextlib.asynccontextmanager
    async def running(self, sim: Any, until: float) -> Any:
        """Run the publisher and the observer around the gateway's run."""
        from community.dso import DsoPublisher

        stop = asyncio.Event()
        pub = DsoPublisher(self.broker_url, self.key, self.clock, [self.day.schedule()],
                           identifier="hems-demo-dso")
        pub_task = asyncio.create_task(pub.run(stop))
        await asyncio.wait_for(pub.connected.wait(), 10.0)
        # 4 % of the inverter rating or 100 W, whichever is lower (as the gateway's default)
        tol = min(100.0, 0.04 * sim.config.inverter_rated_w)
        self.observer = EnvelopeObserver(sim.physics, self.clock, self.day.limits_at, tol)
        obs_task = asyncio.create_task(self.observer.run(until))
        try:
            yield self
        finally:
            obs_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await obs_task
            await asyncio.sleep(0.2)  # the last acks
            stop.set()
            await pub_task
            self.acks = dict(pub.acks.counts)

    def report(self, gateway_stats: dict[str, Any]) -> dict[str, Any]:
        """``controls`` published, exceedances measured on the physics (W, simulated s), the
        p99 response (simulated s), and the gateway's own counters."""
        assert self.observer is not None
        r = self.observer.report(self.day.change_times())
        return {
            "controls": len(self.day.controls) + 1,  # + the default
            "max_export_exceedance_w": r["max_export_exceedance_w"],
            "exceedance_s": r["exceedance_s"],
            "max_import_exceedance_w": r["max_import_exceedance_w"],
            "p99_response_s": r["p99_response_s"],
            "max_response_s": r["max_response_s"],
            "longest_exceedance_s": r["longest_exceedance_s"],
            "events": r["events"],
            "tolerance_w": self.observer.tolerance_w,
            "acks": self.acks,
            "gateway": {k: gateway_stats.get(k) for k in (
                "accepted", "rejected", "exceedance_events", "exceedance_s",
                "max_episode_cycles", "noncompliant_cycles")},
        }
