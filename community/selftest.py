"""``hems selftest``: a short built-in fault run of the real gateway, with a reliability report.

One simulated home (real pymodbus servers, :func:`firmware_sim.server.run_home`), a local broker
(:func:`gateway.broker.local_broker`), the DSO's signed publisher (:class:`community.dso.
DsoPublisher`) with an export limit that binds all the time (steady sun, a battery that may only
charge 1 kW, a 500 W export limit: the gateway must curtail PV every cycle), and the real daemon
(:func:`gateway.daemon.run_gateway`) on an accelerated :class:`~drivers.clock.SimClock`. Then a
schedule of faults, one at a time:

* for each device (meter, inverter, battery): a timeout, a Modbus exception, a dropped
  connection, frozen registers, out-of-range values (:class:`firmware_sim.faults.DeviceFaults`);
* a broker outage: the gateway reaches the broker through a small TCP relay that this module cuts
  and restores (``local_broker`` cannot restart its broker; for the gateway a cut link and a
  restarted broker with persistence look the same: the connection drops, the session reconnects
  and publishes its backlog);
* the DSO silent past the end of its control: the publisher stops; the held control must run to
  its end and the DSO's default apply.

A fault is *survived* when, after it is cleared, the fast loop cycles again, the device reads
again (or the broker link is back and the backlog drained, or the default applies), no task
restarted, and the site's true power (the simulator's physics, sampled every cycle by
:class:`community.demo.EnvelopeObserver`) went above the export limit + tolerance on at most one
sample during the fault's window. Per fault the report also says whether the gateway ``detected``
it (an error event about the device during the fault: a frozen inverter or battery is not
detected by design, the loop is closed on the meter; a frozen meter needs 30 domain s) and how
long after the clear it read again.

Bad inputs go over MQTT to the running gateway: malformed / oversized / out-of-range / retained /
unknown commands, and unsigned / tampered / wrong-key / other-site / replayed / junk envelopes.
Each one is sent alone and judged from the gateway's own counters (``GatewayStats.
commands_rejected``, the envelope agent's ``rejected``); a valid command and a valid DSO control
go along as controls: they must be *accepted* (and are not bad inputs).

``rows_lost``: telemetry sequence numbers produced but missing from the gateway's SQLite store or
never received by an independent QoS-1 subscriber (:class:`community.demo._Dashboard`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from community.demo import EnvelopeObserver, _Dashboard
from community.dso import DsoPublisher, SiteSchedule
from drivers.clock import SimClock
from firmware_sim.home import HomeConfig, StepProfile
from firmware_sim.server import SimulatedHome, run_home
from gateway.broker import local_broker
from gateway.config import parse_config
from gateway.daemon import Gateway, GatewayStats, run_gateway
from gateway.envelope import Control, DefaultControl, Limits
from gateway.signing import public_key_to_b64, sign

log = logging.getLogger(__name__)

SITE = "selftest"
START = 1_750_000_000.0  # 2025-06-15 15:06 UTC (the profiles are steady: the hour is moot)
EXPORT_W = 500.0  # the DSO's default export limit, all the time
CONTROL_EXPORT_W = 300.0  # the control that the DSO then goes silent on
CONTROL_S = 120.0
TOLERANCE_W = 100.0  # the gateway's default measurement tolerance (min(100 W, 4 % of 5 kW))
HOME = HomeConfig(inverter_rated_w=5000.0, battery_wh=10000.0, battery_max_charge_w=1000.0,
                  battery_max_discharge_w=1000.0, soc0_pct=50.0, reserve_pct=10.0)
DEVICES = ("meter", "inverter", "battery")
FAULTS = ("timeout", "exception", "drop", "frozen", "out_of_range")


@dataclass
class SelftestOptions:
    """What to run. The defaults are the full schedule (~45 s of wall time on 2 cores)."""

    speed: float = 40.0  # domain seconds per real second
    cycle_s: float = 1.0
    devices: tuple[str, ...] = DEVICES
    faults: tuple[str, ...] = FAULTS
    fault_s: float = 40.0  # domain seconds each device fault lasts (and >= 4 cycles)
    broker_outage_s: float | None = 2.0  # real seconds; None = skip
    dso_silent: bool = True
    bad_inputs: bool = True
    broker: str = "auto"  # local_broker(prefer=...)
    out_dir: str | None = None  # keep the database here (default: a temporary directory)
    # Extra (command name, payload) pairs counted as bad inputs: lets a test check that an input
    # the gateway accepts is reported as not rejected (and the run as failed).
    extra_bad_commands: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        for d in self.devices:
            if d not in DEVICES:
                raise ValueError(f"unknown device {d!r}; known: {', '.join(DEVICES)}")
        for f in self.faults:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; known: {', '.join(FAULTS)}")
        if not (self.speed > 0 and self.cycle_s > 0 and self.fault_s > 0):
            raise ValueError("speed, cycle_s and fault_s must be > 0")


# ============================================================================================
# Small parts: the DSO's limits as asked, a cuttable TCP relay, waiting
# ============================================================================================


@dataclass
class _AskedLimits:
    """The export limit the DSO asked for at ``t`` (the default, or the tightest control)."""

    default_w: float
    controls: list[Control] = field(default_factory=list)

    def at(self, t: float) -> Limits:
        w = [c.export_w for c in self.controls if c.start <= t < c.end and c.export_w is not None]
        return Limits(export_w=min([self.default_w, *w]))


class _Relay:
    """A TCP relay in front of the broker for the gateway: :meth:`cut` drops every connection
    and refuses new ones until :meth:`restore` (a broker outage as the gateway sees it)."""

    def __init__(self, host: str, port: int) -> None:
        self.up = (host, port)
        self.cut_now = False
        self.cuts = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def cut(self) -> None:
        self.cut_now = True
        self.cuts += 1
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def restore(self) -> None:
        self.cut_now = False

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.cut_now:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.up), 5.0)
        except (OSError, TimeoutError):
            w.transport.abort()
            return
        self._conns.update((w, uw))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self._conns.discard(w)
        self._conns.discard(uw)


async def _wait(pred: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``pred`` (real time, bounded); True if it became true."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _steady(w: float) -> StepProfile:
    return StepProfile(np.full(366 * 24, w), 3600)


# ============================================================================================
# The run
# ============================================================================================


@dataclass
class _Run:
    """Everything live during one self-test; the phases are its methods."""

    opts: SelftestOptions
    clock: SimClock
    sim: SimulatedHome
    gw: Gateway
    db: Path
    relay: _Relay
    pub: DsoPublisher
    pub_task: asyncio.Task[None]
    pub_stop: asyncio.Event
    key: Ed25519PrivateKey
    asked: _AskedLimits
    observer: EnvelopeObserver
    attacker: aiomqtt.Client
    results: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)
    ctl: Control | None = None

    async def settle(self, domain_s: float) -> None:
        await self.clock.sleep_until(self.clock.now() + domain_s)

    # ---- judging ---------------------------------------------------------------------------

    def _window(self, since: int) -> dict[str, Any]:
        """Envelope exceedance on the physics in the observer's samples from index ``since``."""
        smp = self.observer.samples[since:]
        over = [e for _, _, e in smp if abs(e) > TOLERANCE_W]
        return {"samples": len(smp), "exceed_samples": len(over),
                "max_exceedance_w": round(max([0.0, *(abs(e) for _, _, e in smp)]), 1)}

    def _events(self, since_ts: float) -> list[tuple[str, str, str]]:
        """(level, kind, message) of the gateway's events since ``since_ts`` (stored+pending)."""
        rows: list[tuple[float, str, str, str]] = []
        if self.db.exists():
            with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as c:
                rows = [(float(a), str(b), str(k), str(m)) for a, b, k, m in c.execute(
                    "SELECT ts, level, kind, message FROM events WHERE ts >= ?", (since_ts,))]
        rows += [(e.ts, e.level, e.kind, e.message) for e in self.gw.pending.events
                 if e.ts >= since_ts]
        return [(lv, k, m) for _, lv, k, m in rows]

    def _judge(self, name: str, cls: str, since: int, c0: int, restarts0: int, back: bool,
               extra: dict[str, Any]) -> dict[str, Any]:
        win = self._window(since)
        cycles = self.gw.stats.cycles - c0
        restarts = self.gw.stats.task_restarts - restarts0
        why = [w for w, bad in (("did not recover", not back),
                                ("fast loop stalled", cycles < 4),
                                (f"a task restarted ({restarts})", restarts > 0),
                                (f"export above limit + {TOLERANCE_W:g} W on "
                                 f"{win['exceed_samples']} samples", win["exceed_samples"] > 1))
               if bad]
        r = {"fault": name, "class": cls, "survived": not why, "why": "; ".join(why) or None,
             "cycles": cycles, **win, **extra}
        self.results.append(r)
        log.info("selftest: %s %s", name, "survived" if not why else f"NOT survived: {r['why']}")
        return r

    # ---- device faults ---------------------------------------------------------------------

    async def device_fault(self, device: str, kind: str) -> dict[str, Any]:
        gw, o = self.gw, self.opts
        n0, c0, t0, r0 = (len(self.observer.samples), gw.stats.cycles, self.clock.now(),
                          gw.stats.task_restarts)
        faults = self.sim.faults[device]
        faults.inject(kind, duration_s=3600.0)  # cleared below
        # A device that does not answer costs a cycle its real-time read timeout: the fault
        # lasts fault_s domain seconds AND at least 4 cycles.
        await self.settle(o.fault_s)
        await _wait(lambda: gw.stats.cycles >= c0 + 4, 20.0)
        faults.clear()
        t_clear, c_clear = self.clock.now(), gw.stats.cycles

        def back() -> bool:
            live = gw.live
            return (not gw.slots[device].failing and live is not None
                    and getattr(live, device) is not None and live.ts > t_clear
                    and gw.stats.cycles >= c_clear + 2)

        ok = await _wait(back, 30.0)
        back_s = self.clock.now() - t_clear
        await self.settle(10.0)
        evs = self._events(t0)
        detected = any(lv == "error" and k == "device" and m.startswith(device)
                       for lv, k, m in evs)
        return self._judge(f"{device}:{kind}", kind, n0, c0, r0, ok, {
            "detected": detected, "recovered_after_s": round(back_s, 1) if ok else None})

    # ---- broker outage ---------------------------------------------------------------------

    async def broker_outage(self, real_s: float) -> dict[str, Any]:
        gw = self.gw
        assert gw.mqtt is not None
        mq = gw.mqtt
        n0, c0, r0 = len(self.observer.samples), gw.stats.cycles, gw.stats.task_restarts
        connects0 = mq.stats.connects
        self.relay.cut()
        await asyncio.sleep(real_s / 2)
        stale = None
        if self.opts.bad_inputs:
            # A retained command waiting on the broker is delivered (retain flag set) at every
            # (re)subscribe: a stale order re-applied on each reconnect. Publish it while the
            # gateway is away; it must be rejected when the gateway comes back.
            stale = self._cmd_counts()
            await self.attacker.publish(gw.topics.cmd("mode"), b'{"mode": "idle"}', qos=1,
                                        retain=True)
        await asyncio.sleep(real_s / 2)
        cycles_during = gw.stats.cycles - c0
        self.relay.restore()
        top = gw._committed_seq  # what was stored by the end of the outage must be published
        ok = await _wait(lambda: mq.connected.is_set() and mq.stats.connects > connects0
                         and gw.published_seq() >= top, 30.0)
        if stale is not None:
            await self._record_command("retained_stale", stale, self._cmd_counts() != stale)
            await self.attacker.publish(gw.topics.cmd("mode"), b"", qos=1, retain=True)
        await self.settle(10.0)
        return self._judge("broker:outage", "broker_outage", n0, c0, r0, ok, {
            "outage_real_s": real_s, "cycles_during": cycles_during,
            "reconnected": mq.stats.connects > connects0, "backlog_drained": ok})

    # ---- DSO --------------------------------------------------------------------------------

    async def add_control(self) -> bool:
        """The DSO schedules a tighter control 30 s ahead; True once the gateway holds it."""
        agent = self.gw.envelope
        assert agent is not None
        now = self.clock.now()
        self.ctl = Control(id="selftest-ctl", site=SITE, created=now, start=now + 30.0,
                           duration_s=CONTROL_S, export_w=CONTROL_EXPORT_W)
        a0 = agent.stats.accepted
        self.asked.controls.append(self.ctl)
        self.pub.add_control(self.ctl)
        ok = await _wait(lambda: agent.stats.accepted > a0, 10.0)
        self.controls.append({"name": "envelope:valid_control", "accepted": ok})
        return ok

    async def dso_silent(self) -> dict[str, Any]:
        gw, agent = self.gw, self.gw.envelope
        assert agent is not None
        if self.ctl is None:
            await self.add_control()
        assert self.ctl is not None
        ctl = self.ctl
        await self.clock.sleep_until(ctl.start + 10.0)
        held = agent.target is not None and agent.target.source == "control"
        n0, c0, r0 = len(self.observer.samples), gw.stats.cycles, gw.stats.task_restarts
        self.pub_stop.set()  # the DSO dies; the broker (and its retained documents) stay
        await asyncio.wait_for(self.pub_task, 10.0)
        await self.clock.sleep_until(ctl.end)
        ok = await _wait(lambda: agent.target is not None and agent.target.source == "default",
                         20.0)
        await self.settle(15.0)
        ok = ok and agent.target is not None and agent.target.source == "default"
        return self._judge("dso:silent_past_expiry", "dso_silent", n0, c0, r0, held and ok, {
            "control_held": held,
            "after_expiry": agent.target.source if agent.target is not None else None})

    # ---- bad inputs -------------------------------------------------------------------------

    def _cmd_counts(self) -> tuple[int, dict[str, int]]:
        s = self.gw.stats
        return s.commands_applied, dict(s.commands_rejected)

    async def _command(self, name: str, label: str, payload: bytes, *,
                       control: bool = False) -> None:
        before = self._cmd_counts()
        await self.attacker.publish(self.gw.topics.cmd(name), payload, qos=1, retain=False)
        answered = await _wait(lambda: self._cmd_counts() != before, 5.0)
        await self._record_command(label, before, answered, control=control)

    async def _record_command(self, label: str, before: tuple[int, dict[str, int]],
                              answered: bool, *, control: bool = False) -> None:
        """Judge one command from the gateway's counters (``before`` it was sent)."""
        applied0, rej0 = before
        a, r = self._cmd_counts()
        codes = [k for k in r if r[k] != rej0.get(k, 0)]
        if control:
            self.controls.append({"name": f"command:{label}", "accepted": a > applied0})
        else:
            self.inputs.append({"name": f"command:{label}", "answered": answered,
                                "rejected": bool(codes), "code": codes[0] if codes else None})

    async def _envelope(self, label: str, doc: Any, *, default: bool = False,
                        raw: bytes | None = None) -> None:
        agent = self.gw.envelope
        assert agent is not None
        st = agent.stats
        m0, rej0, acc0 = st.messages, dict(st.rejected), st.accepted
        payload = raw if raw is not None else json.dumps(doc).encode()
        topic = agent.topic_default if default else agent.topic_controls
        await self.attacker.publish(topic, payload, qos=1, retain=False)
        answered = await _wait(lambda: st.messages > m0, 5.0)
        codes = [k for k in st.rejected if st.rejected[k] != rej0.get(k, 0)]
        self.inputs.append({"name": f"envelope:{label}", "answered": answered,
                            "rejected": bool(codes), "code": codes[0] if codes else None,
                            "accepted_changes": st.accepted - acc0})

    async def bad_inputs(self) -> dict[str, Any]:
        gw, agent = self.gw, self.gw.envelope
        assert agent is not None and agent.target is not None
        n0 = len(self.observer.samples)
        limit0 = agent.target.limits.export_w
        first_controls, legit_default = self.pub.published(SITE)
        assert first_controls is not None and legit_default is not None
        now = self.clock.now()
        # --- commands on <root>/<site>/cmd/<name> ---
        pad = "x" * (gw.cfg.mqtt.max_command_bytes + 100)
        cmds: list[tuple[str, str, bytes]] = [
            ("mode", "oversize", json.dumps({"mode": "idle", "pad": pad}).encode()),
            ("mode", "truncated_json", b'{"mode": "idle"'),
            ("mode", "not_utf8", b"\xff\xfe\x00mode"),
            ("reserve", "deeply_nested", b"[" * 1500 + b"]" * 1500),
            ("selfdestruct", "unknown_command", b'{"now": true}'),
            ("mode", "unknown_mode", b'{"mode": "turbo"}'),
            ("mode", "wrong_type", b'{"mode": 5}'),
            ("reserve", "out_of_range", b'{"soc_pct": 150}'),
            ("reserve", "nan", b'{"soc_pct": NaN}'),
            ("mode", "over_battery_limit",
             b'{"mode": "force_discharge", "power_w": 50000, "duration_s": 600}'),
            ("mode", "end_in_the_past",
             b'{"mode": "force_charge", "power_w": 500, "until": 1000}'),
            ("mode", "extra_field", b'{"mode": "idle", "power_w": 100}'),
        ]
        for name, label, payload in cmds:
            await self._command(name, label, payload)
        for i, (name, payload) in enumerate(self.opts.extra_bad_commands):
            await self._command(name, f"extra_{i}", payload)
        # The control: a valid command must be applied (it changes nothing: auto is the mode).
        await self._command("mode", "valid_control", b'{"mode": "auto", "id": "selftest"}',
                            control=True)
        # --- envelopes on <root>/<site>/dso/{controls,default} ---
        # Well-formed but for the one defect each is about: a default lifting the export limit.
        loose = {**legit_default["default"], "id": "evil", "created": now,
                 "export_w": 1_000_000.0}
        body = {"v": 1, "site": SITE, "issued": now, "default": loose}
        other = Ed25519PrivateKey.generate()
        tampered = json.loads(json.dumps(legit_default))
        tampered["default"]["export_w"] = 1_000_000.0
        await self._envelope("not_json", None, default=True, raw=b"\x00not json{")
        await self._envelope("oversize", None, default=True,
                             raw=b'{"pad":"' + b"x" * (agent.settings.max_bytes + 10) + b'"}')
        await self._envelope("unsigned", body, default=True)
        await self._envelope("tampered", tampered, default=True)
        await self._envelope("wrong_key", sign(body, other), default=True)
        await self._envelope("other_site", sign({**body, "site": "other-home"}, self.key),
                             default=True)
        await self._envelope("bad_version", sign({**body, "v": 2}, self.key), default=True)
        await self._envelope("unknown_field", sign({**body, "why": "x"}, self.key), default=True)
        await self._envelope("controls_not_a_list",
                             sign({"v": 1, "site": SITE, "issued": now, "controls": {}},
                                  self.key))
        # Replay: the DSO's first (empty) controls document again, after a newer one holding a
        # tighter control: accepted, it would cancel that control.
        ok = await self.add_control()
        if ok:
            await self._envelope("replayed", first_controls)
        # Signed with the DSO's key but absurd. Last: its newer ``issued`` moves the replay mark.
        await self._envelope("absurd_limit",
                             sign({**body, "issued": self.clock.now(),
                                   "default": {**loose, "export_w": -500.0}}, self.key),
                             default=True)
        await self.settle(5.0)
        limit1 = agent.target.limits.export_w if agent.target is not None else None
        win = self._window(n0)
        return {"export_limit_before_w": limit0, "export_limit_after_w": limit1,
                "never_loosened": limit1 is not None and limit0 is not None
                and limit1 <= limit0, **win}


async def run_selftest(opts: SelftestOptions) -> dict[str, Any]:
    """Run the self-test and return the report (see ``hems selftest --json``)."""
    wall0 = time.monotonic()
    key = Ed25519PrivateKey.generate()
    asked = _AskedLimits(EXPORT_W)
    bad_phase: dict[str, Any] = {}
    run: _Run | None = None
    with contextlib.ExitStack() as es:
        out = Path(opts.out_dir) if opts.out_dir else Path(es.enter_context(
            tempfile.TemporaryDirectory(prefix="hems-selftest-")))
        out.mkdir(parents=True, exist_ok=True)
        db = out / "gateway.db"
        for p in out.glob("gateway.db*"):
            p.unlink()
        async with local_broker(prefer=opts.broker) as broker:
            broker_kind = broker.kind
            dash = _Dashboard()
            dash_task = asyncio.create_task(dash.run(broker.host, broker.port, SITE))
            relay = _Relay(broker.host, broker.port)
            await relay.start()
            try:
                await asyncio.wait_for(dash.ready.wait(), 10.0)
                clock = SimClock(START, opts.speed)
                async with run_home(clock, HOME, load=_steady(700.0), pv=_steady(3500.0)) as sim:
                    sched = SiteSchedule(SITE, DefaultControl(id="selftest-default", site=SITE,
                                                              created=START - 100.0,
                                                              export_w=EXPORT_W))
                    pub_stop = asyncio.Event()
                    pub = DsoPublisher(broker.url, key, clock, [sched],
                                       identifier="hems-selftest-dso")
                    pub_task = asyncio.create_task(pub.run(pub_stop))
                    cfg = parse_config({
                        "site_id": SITE,
                        "devices": [{"kind": e.kind, "name": e.kind, "host": e.host,
                                     "port": e.port, "unit": e.unit, "timeout_s": 0.25}
                                    for e in sim.endpoints],
                        "broker": {"url": f"mqtt://127.0.0.1:{relay.port}", "keepalive_s": 5,
                                   "connect_timeout_s": 2.0},
                        "store": {"path": str(db), "telemetry_interval_s": 10.0,
                                  "commit_interval_s": 10.0},
                        "mqtt": {"state_interval_s": 30.0},
                        # A 0.25 s real read timeout is 10 domain s at x40: the revert time
                        # covers a cycle stalled on a dead device (as 60 s covers 2 s at x1).
                        "control": {"cycle_s": opts.cycle_s, "revert_s": 3.0 * opts.speed,
                                    "startup_grace_s": 1.0, "read_timeout_s": 0.25},
                        "envelope": {"dso_public_key": public_key_to_b64(key.public_key()),
                                     "fallback_export_w": 300.0},
                    })
                    box: list[Gateway] = []
                    stop = asyncio.Event()
                    gw_task = asyncio.create_task(run_gateway(cfg, clock, stop=stop,
                                                              on_ready=box.append))
                    obs_task: asyncio.Task[None] | None = None
                    observer = EnvelopeObserver(sim.physics, clock, asked.at, TOLERANCE_W,
                                                step_s=opts.cycle_s)
                    try:
                        await _start(box, gw_task, sim)
                        gw = box[0]
                        obs_task = asyncio.create_task(observer.run(START + 365 * 86400.0))
                        async with aiomqtt.Client(broker.host, broker.port,
                                                  identifier="hems-selftest-attacker") as att:
                            run = _Run(opts, clock, sim, gw, db, relay, pub, pub_task, pub_stop,
                                       key, asked, observer, att)
                            for dev in opts.devices:
                                for kind in opts.faults:
                                    await run.device_fault(dev, kind)
                            if opts.broker_outage_s:
                                await run.broker_outage(opts.broker_outage_s)
                            if opts.bad_inputs:
                                bad_phase = await run.bad_inputs()
                            if opts.dso_silent:
                                await run.dso_silent()
                    finally:
                        if obs_task is not None:
                            obs_task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await obs_task
                        stop.set()
                        stats: GatewayStats = await asyncio.wait_for(gw_task, 30.0)
                        pub_stop.set()
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(pub_task, 10.0)
                # the dashboard takes the last QoS 1 messages off the broker (bounded wait)
                want = set(range(1, stats.telemetry_produced + 1))
                await _wait(lambda: want <= set(dash.seqs), 10.0)
            finally:
                dash_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dash_task
                await relay.close()
        stored = _stored_seqs(db)
    assert run is not None
    return _report(opts, run, stats, stored, set(dash.seqs), observer, asked, bad_phase,
                   broker_kind, time.monotonic() - wall0)


async def _start(box: list[Gateway], task: asyncio.Task[GatewayStats],
                 sim: SimulatedHome) -> None:
    """Wait for the gateway to hold the DSO's default and curtail PV to it."""
    await _wait(lambda: bool(box) or task.done(), 10.0)
    if task.done():
        task.result()  # raises what stopped it
    if not box:
        raise RuntimeError("selftest: the gateway did not start within 10 s")
    gw = box[0]

    def curtailed() -> bool:
        ph = sim.physics
        ph.advance()
        return ph.inverter.enabled and ph.inverter.pct < 95.0

    if not await _wait(lambda: gw.envelope is not None and gw.envelope.stats.accepted >= 1, 20):
        raise RuntimeError("selftest: the gateway did not receive the DSO's default in 20 s")
    if not await _wait(curtailed, 20.0):
        raise RuntimeError("selftest: the gateway did not curtail PV to the export limit")
    await sim.physics.clock.sleep_until(sim.physics.clock.now() + 10.0)  # settle on the limit


def _stored_seqs(db: Path) -> set[int]:
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as c:
        return {int(s) for (s,) in c.execute("SELECT seq FROM telemetry")}


def _report(opts: SelftestOptions, run: _Run, stats: GatewayStats, stored: set[int],
            received: set[int], observer: EnvelopeObserver, asked: _AskedLimits,
            bad_phase: dict[str, Any], broker_kind: str, wall: float) -> dict[str, Any]:
    produced = stats.telemetry_produced
    want = set(range(1, produced + 1))
    missing_store = want - stored
    missing_dash = want - received
    rows_lost = len(missing_store | missing_dash)
    survived = sum(1 for r in run.results if r["survived"])
    rejected = sum(1 for i in run.inputs if i["rejected"])
    by_class: dict[str, dict[str, int]] = {}
    for r in run.results:
        c = by_class.setdefault(r["class"], {"injected": 0, "survived": 0})
        c["injected"] += 1
        c["survived"] += int(r["survived"])
    by_channel: dict[str, dict[str, int]] = {}
    for i in run.inputs:
        c = by_channel.setdefault(i["name"].split(":", 1)[0], {"tried": 0, "rejected": 0})
        c["tried"] += 1
        c["rejected"] += int(i["rejected"])
    controls_ok = all(c["accepted"] for c in run.controls)
    env = observer.report(tuple(t for c in asked.controls for t in (c.start, c.end)))
    reliability = {
        "faults_injected": len(run.results),
        "faults_survived": survived,
        "bad_inputs_tried": len(run.inputs),
        "bad_inputs_rejected": rejected,
        "rows_lost": rows_lost,
        "faults_by_class": by_class,
        "bad_inputs_by_channel": by_channel,
        "controls_accepted": sum(1 for c in run.controls if c["accepted"]),
        "controls_sent": len(run.controls),
        "not_survived": [r["fault"] for r in run.results if not r["survived"]],
        "not_rejected": [i["name"] for i in run.inputs if not i["rejected"]],
    }
    ok = (survived == len(run.results) and rejected == len(run.inputs) and rows_lost == 0
          and controls_ok)
    return {
        "ok": ok,
        "reliability": reliability,
        "faults": run.results,
        "bad_inputs": run.inputs,
        "controls": run.controls,
        "bad_input_phase": bad_phase,
        "telemetry": {"produced": produced, "stored": len(stored & want),
                      "received": len(received & want), "missing_in_store": len(missing_store),
                      "missing_at_subscriber": len(missing_dash),
                      "gateway_lost": stats.telemetry_lost},
        "envelope": {"export_limit_w": EXPORT_W, "control_export_w": CONTROL_EXPORT_W,
                     "tolerance_w": TOLERANCE_W, **env,
                     "gateway": {k: stats.envelope.get(k) for k in (
                         "accepted", "rejected", "duplicates", "exceedance_events",
                         "exceedance_s", "max_episode_cycles", "noncompliant_cycles")}},
        "gateway": {"cycles": stats.cycles, "overruns": stats.overruns,
                    "poll_errors": stats.poll_errors, "write_errors": stats.write_errors,
                    "task_restarts": stats.task_restarts,
                    "broker_connects": stats.broker_connects,
                    "commands_applied": stats.commands_applied,
                    "commands_rejected": stats.commands_rejected},
        "sim_s": round(stats.sim_hours * 3600.0, 1),
        "speed": opts.speed,
        "cycle_s": opts.cycle_s,
        "broker": broker_kind,
        "wall_s": round(wall, 2),
    }


def format_report(r: dict[str, Any]) -> str:
    """The lines a person reads (the JSON has every figure)."""
    rel, tel, env, g = r["reliability"], r["telemetry"], r["envelope"], r["gateway"]
    lines = [
        f"hems selftest: {'PASS' if r['ok'] else 'FAIL'} in {r['wall_s']} s wall "
        f"({r['sim_s']:g} simulated s at x{r['speed']:g}, cycle {r['cycle_s']:g} s, broker "
        f"{r['broker']})",
        f"  faults survived {rel['faults_survived']}/{rel['faults_injected']}: "
        + ", ".join(f"{k} {v['survived']}/{v['injected']}"
                    for k, v in rel["faults_by_class"].items()),
    ]
    for f in r["faults"]:
        if not f["survived"]:
            lines.append(f"    NOT survived {f['fault']}: {f['why']}")
    lines.append(
        f"  bad inputs rejected {rel['bad_inputs_rejected']}/{rel['bad_inputs_tried']} ("
        + ", ".join(f"{k} {v['rejected']}/{v['tried']}"
                    for k, v in rel["bad_inputs_by_channel"].items())
        + f"); valid controls accepted {rel['controls_accepted']}/{rel['controls_sent']}")
    for i in r["bad_inputs"]:
        if not i["rejected"]:
            lines.append(f"    NOT rejected {i['name']}")
    lines += [
        f"  telemetry rows lost {rel['rows_lost']} (produced {tel['produced']}, stored "
        f"{tel['stored']}, received by a subscriber {tel['received']})",
        f"  envelope on the physics: max export exceedance {env['max_export_exceedance_w']} W "
        f"above the limit, {env['exceedance_s']} s above tolerance ({env['tolerance_w']:g} W), "
        f"longest {env['longest_exceedance_s']} s (limit steps included; p99 response "
        f"{env['p99_response_s']} s)",
        f"  gateway: {g['cycles']} cycles, {g['poll_errors']} poll errors, {g['overruns']} late "
        f"cycles, {g['task_restarts']} task restarts, {g['broker_connects']} broker connects",
    ]
    return "\n".join(lines)


# ============================================================================================
# Command line (wired as ``hems selftest`` in gateway/cli.py)
# ============================================================================================


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``hems selftest``."""
    p.add_argument("--speed", type=float, default=40.0, help="simulated seconds per real second")
    p.add_argument("--devices", type=_csv, default=DEVICES,
                   help=f"comma-separated devices to fault (default: {','.join(DEVICES)})")
    p.add_argument("--faults", type=_csv, default=FAULTS,
                   help=f"comma-separated fault kinds (default: {','.join(FAULTS)})")
    p.add_argument("--fault-s", type=float, default=40.0,
                   help="simulated seconds each device fault lasts")
    p.add_argument("--broker-outage-s", type=float, default=2.0,
                   help="real seconds of broker outage (0 = skip)")
    p.add_argument("--no-dso-silent", action="store_true", help="skip the silent-DSO fault")
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the hostile messages")
    p.add_argument("--broker", default="auto", help="auto | mosquitto | amqtt")
    p.add_argument("--out", default=None, help="keep the gateway's database in this directory")
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON line (the last line of stdout)")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``hems selftest`` with parsed ``args``: 0 when every fault was survived, every bad
    input rejected and no telemetry row lost; 1 otherwise; 2 for bad options / no broker."""
    pm = logging.getLogger("pymodbus")
    pm_level = pm.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # The faults are deliberate: pymodbus's own ERROR lines (with frame dumps) for every
        # dropped connection are noise here; the gateway logs each device fault once itself.
        pm.setLevel(logging.CRITICAL)
    try:
        opts = SelftestOptions(
            speed=args.speed, devices=tuple(args.devices), faults=tuple(args.faults),
            fault_s=args.fault_s, broker_outage_s=args.broker_outage_s or None,
            dso_silent=not args.no_dso_silent, bad_inputs=not args.no_bad_inputs,
            broker=args.broker, out_dir=args.out)
        report = asyncio.run(run_selftest(opts))
    except (ValueError, RuntimeError) as e:  # bad options, no broker, gateway did not start
        print(f"hems selftest: {e}", file=sys.stderr)
        return 2
    finally:
        pm.setLevel(pm_level)
    text = format_report(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, separators=(",", ":"), allow_nan=False))
    else:
        print(text)
    return 0 if report["ok"] else 1


