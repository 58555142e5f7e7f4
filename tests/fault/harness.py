"""Fault-suite harness: one simulated home over real Modbus TCP, a real Mosquitto, the DSO's
signed envelope publisher and the in-process gateway (``run_gateway``) on an accelerated clock,
plus an independent observer of the *physics* (the truth, not what the gateway believes).

The site is set up so that the DSO's export limit binds all the time: steady sun (PV ~3.5 kW on
a 5 kW inverter), a steady 700 W load and a battery that may charge at only 1 kW, against a
500 W export default. Every cycle the gateway must curtail PV to hold it, so a fault that made it
loosen anything shows up at once as an exceedance in the physics.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from community.demo import EnvelopeObserver
from community.dso import DsoPublisher, SiteSchedule
from drivers.clock import Clock, SimClock
from firmware_sim.home import HomeConfig, StepProfile
from firmware_sim.server import SimulatedHome, run_home
from gateway.config import Config, parse_config
from gateway.daemon import Gateway, GatewayStats, run_gateway
from gateway.envelope import Control, DefaultControl, Limits
from gateway.signing import public_key_to_b64

SITE = "home-1"
START = 1_750_000_000.0  # 2025-06-15 15:06 UTC
EXPORT_W = 500.0  # the DSO default all the time
TOLERANCE_W = 100.0  # the agent's default measurement tolerance
HOME = HomeConfig(inverter_rated_w=5000.0, battery_wh=10000.0, battery_max_charge_w=1000.0,
                  battery_max_discharge_w=1000.0, soc0_pct=50.0, reserve_pct=10.0)


def steady_profiles(load_w: float = 700.0, pv_w: float = 3500.0) -> tuple[StepProfile,
                                                                          StepProfile]:
    """A constant load and constant sun all year: the site's truth never moves by itself."""
    n = 365 * 24
    return StepProfile(np.full(n, load_w), 3600), StepProfile(np.full(n, pv_w), 3600)


def default_schedule(created: float, export_w: float = EXPORT_W,
                     controls: tuple[Control, ...] = ()) -> SiteSchedule:
    return SiteSchedule(SITE, DefaultControl(id="def", site=SITE, created=created,
                                             export_w=export_w), controls)


async def wait_until(pred: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``pred`` until true; fail naming ``what`` after a generous real-time bound."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or pred}")
        await asyncio.sleep(0.02)


def gateway_config(sim: SimulatedHome, broker_url: str, db: str, pub_b64: str,
                   **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "site_id": SITE,
        "devices": [{"kind": e.kind, "name": e.kind, "host": e.host, "port": e.port,
                     "unit": e.unit, "timeout_s": 0.25} for e in sim.endpoints],
        "broker": {"url": broker_url, "keepalive_s": 5, "connect_timeout_s": 2.0},
        "store": {"path": db, "telemetry_interval_s": 10.0, "commit_interval_s": 10.0},
        "mqtt": {"state_interval_s": 30.0},
        # At x40 a real-time read timeout of 0.25 s is 10 domain seconds: the revert time is
        # chosen so that, as at real time (2 s timeouts, 60 s revert), a cycle stalled on a
        # dead device still re-sends the limits well within it.
        "control": {"cycle_s": 1.0, "revert_s": 120.0, "startup_grace_s": 1.0,
                    "read_timeout_s": 0.25},
        "envelope": {"dso_public_key": pub_b64, "fallback_export_w": 300.0},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


@dataclass
class Site:
    """A running fault-test site. ``gw`` is the live gateway object (in this process)."""

    clock: SimClock  # the devices' (true) clock
    sim: SimulatedHome
    gw: Gateway
    task: asyncio.Task[GatewayStats]
    stop: asyncio.Event
    pub: DsoPublisher
    pub_task: asyncio.Task[None]
    pub_stop: asyncio.Event
    db: Path
    observer: EnvelopeObserver
    setpoints: list[tuple[float, float | None, float | None]] = field(default_factory=list)

    async def finish(self) -> GatewayStats:
        self.stop.set()
        return await asyncio.wait_for(self.task, 30)

    async def settle(self, domain_s: float) -> None:
        await self.clock.sleep_until(self.clock.now() + domain_s)

    def curtailed(self) -> bool:
        """The gateway holds PV below its rating (the export limit is being enforced)."""
        ph = self.sim.physics
        ph.advance()
        return ph.inverter.enabled and ph.inverter.pct < 95.0

    def events(self, kind: str | None = None) -> list[tuple[float, str, str, str]]:
        """(ts, level, kind, message) of stored and still-pending events."""
        rows: list[tuple[float, str, str, str]] = []
        if self.db.exists():
            conn = sqlite3.connect(self.db)
            try:
                rows = [(float(a), str(b), str(c), str(d)) for a, b, c, d in conn.execute(
                    "SELECT ts, level, kind, message FROM events ORDER BY id")]
            finally:
                conn.close()
        rows += [(e.ts, e.level, e.kind, e.message) for e in self.gw.pending.events]
        return [r for r in rows if kind is None or r[2] == kind]


async def export_held(site: Site, limit_w: float, domain_s: float = 10.0) -> None:
    """After the loop has had time to settle, the true export stays within ``limit_w``."""
    await site.settle(15.0)
    t_end = site.clock.now() + domain_s
    while site.clock.now() < t_end:
        st = site.sim.physics.state()
        assert -st.site_w <= limit_w + TOLERANCE_W, (st.t, st.site_w, limit_w)
        await site.settle(1.0)


def telemetry_rows(db: Path) -> list[tuple[int, float]]:
    conn = sqlite3.connect(db)
    try:
        return [(int(s), float(t)) for s, t in conn.execute(
            "SELECT seq, ts FROM telemetry ORDER BY seq")]
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def running_site(mosquitto: Any, tmp_path: Path, *, speed: float = 40.0,
                       home: HomeConfig = HOME,
                       gateway_clock: Callable[[SimClock], Clock] | None = None,
                       schedule: Callable[[float], SiteSchedule] | None = None,
                       on_ready: Callable[[Gateway], None] | None = None,
                       **sections: dict[str, Any]) -> AsyncIterator[Site]:
    """Start devices, the DSO publisher and the gateway; yield once the export limit binds.

    ``gateway_clock(devices_clock)`` (default: the devices' clock itself) lets a test give the
    gateway a clock of its own (one that jumps). The physics observer samples the truth every
    domain second."""
    clock = SimClock(START, speed)
    key = Ed25519PrivateKey.generate()
    load, pv = steady_profiles()
    stop_pub = asyncio.Event()
    async with run_home(clock, home, load=load, pv=pv) as sim:
        sched = schedule(START) if schedule is not None else default_schedule(START - 100)
        pub = DsoPublisher(mosquitto.url, key, clock, [sched], identifier="dso-fault")
        pub_task = asyncio.create_task(pub.run(stop_pub))
        db = tmp_path / "g.db"
        cfg = gateway_config(sim, mosquitto.url, str(db), public_key_to_b64(key.public_key()),
                             **sections)
        box: list[Gateway] = []

        def ready(g: Gateway) -> None:
            box.append(g)
            if on_ready is not None:
                on_ready(g)

        stop = asyncio.Event()
        gw_clock = gateway_clock(clock) if gateway_clock is not None else clock
        task = asyncio.create_task(run_gateway(cfg, gw_clock, stop=stop, on_ready=ready))
        obs_task: asyncio.Task[None] | None = None
        sp_task: asyncio.Task[None] | None = None
        try:
            await wait_until(lambda: bool(box) or task.done(), 10, "gateway start")
            if task.done():
                task.result()
            gw = box[0]
            observer = EnvelopeObserver(sim.physics, clock, lambda _t: Limits(
                export_w=sched.default.export_w if sched.default else None), TOLERANCE_W)
            site = Site(clock, sim, gw, task, stop, pub, pub_task, stop_pub, db, observer)
            await wait_until(lambda: gw.envelope is not None and gw.envelope.stats.accepted >= 1,
                             20, "the DSO default")
            await wait_until(site.curtailed, 20, "PV curtailed to the export limit")
            await site.settle(10.0)  # let the loop settle on the limit
            obs_task = asyncio.create_task(observer.run(START + 10 * 86400))

            async def watch_setpoints() -> None:
                while True:
                    # stamped with the cycle that decided it (set with it, no await between):
                    # the poll may see a setpoint late, after a later read's event
                    sp, live = gw.setpoint, gw.live
                    if sp is not None and live is not None:
                        site.setpoints.append((live.ts, sp.battery_w, sp.inverter_limit_pct))
                    await asyncio.sleep(0.02)

            sp_task = asyncio.create_task(watch_setpoints())
            yield site
        finally:
            for t in (obs_task, sp_task):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            if not task.done():
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30)
            stop_pub.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pub_task, 10)
