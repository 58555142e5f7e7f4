"""The gateway daemon: wiring of devices, store, MQTT and the fast loop under one supervisor.

``hems run --config FILE`` calls :func:`main_run`; ``hems demo`` and the tests call
:func:`run_gateway` — the same code path, on an injected clock.

Tasks (all in one asyncio process, see :mod:`gateway.supervisor`):

* ``fast-loop``: every ``control.cycle_s`` (domain time): read meter/inverter/battery in
  parallel (bounded real-time timeouts), compute setpoints through ONE policy function
  (:func:`gateway.commands.rule_setpoints` today; plan-following + envelope enforcement later),
  write them with the devices' revert timers (re-sent within half the revert time), fold the
  readings into the telemetry aggregator and beat the watchdog heart. With an envelope, a meter
  lost for ``control.meter_loss_cycles`` cycles puts it in the failsafe (zero load assumed,
  :meth:`Gateway._meter_failsafe`); a device whose values froze still gets its last setpoint
  re-sent (it takes writes, and its revert timer must not lift a limit on stale readings).
* ``store-writer``: commits the buffered records/events once per ``store.commit_interval_s``
  (batched: few writes on the SD card), runs retention hourly.
* ``mqtt``: :class:`gateway.mqtt.MqttSession` (store-and-forward publisher, state, commands).
* ``systemd``: READY=1 when devices and broker are up (or after ``startup_grace_s``, degraded),
  WATCHDOG=1 while the fast loop's heart beats.
* ``slow-loop``: the ``slow_loop`` argument of :func:`run_gateway`, for forecast -> optimize ->
  bids; :func:`gateway.planner.planner_loop` when ``[planner] enabled`` (the fast loop then
  follows the plan in auto mode through :meth:`Gateway.plan_setpoint`); absent by default.

Stopping (SIGTERM or ``stop``): the fast loop finishes its cycle and leaves the devices safe;
the store writer commits what is buffered; the MQTT session drains (bounded), publishes
``offline`` and disconnects; then the process exits 0.

Safe state on stop (a decision, documented in docs/mqtt.md and systemd/README.md):
the battery is ``release()``-d to its own mode at once; the inverter's active-power limit is NOT
cleared but left to lapse by the device's own revert timer (<= ``control.revert_s``). Clearing it
would loosen a DSO export limit the moment the gateway stops; leaving it lets the device fall
back to its commissioned (compliant) settings by itself, which is also what happens if the
gateway dies without a chance to clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from drivers.clock import Clock, WallClock, grid_slot
from drivers.natures import (
    Battery,
    BatteryReading,
    DeviceError,
    Inverter,
    InverterReading,
    Meter,
    MeterReading,
)
from gateway import messages
from gateway.commands import ModeState, Setpoints, SiteState, handle_command, rule_setpoints
from gateway.config import Config, ConfigError, DeviceConfig, load_config
from gateway.enforce import EnforceInputError, Failsafe, meter_loss_failsafe, resume_limit_pct
from gateway.envelope_agent import EnvelopeAgent, agent_settings
from gateway.messages import Topics
from gateway.mqtt import MqttSession
from gateway.plausibility import ReadingGuard
from gateway.recent_rows import RecentRows
from gateway.sdnotify import Notifier
from gateway.store import Aggregator, Batch, Counters, Event, OutboxRow, Store, StoreError
from gateway.supervisor import Supervisor, TaskSpec, Unrecoverable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from gateway.market_agent import MarketAgent
    from gateway.optimize.inputs import StepLimits
    from gateway.planner import Planner

log = logging.getLogger("gateway.daemon")  # also when run as __main__
T = TypeVar("T")

Device = Meter | Inverter | Battery
Policy = Callable[[SiteState, ModeState], Setpoints]

EXIT_OK = 0
EXIT_FAILURE = 1  # unrecoverable runtime failure: systemd restarts us
EXIT_CONFIG = 2  # bad config file: a restart will not help
EXIT_STORE = 3  # database unusable (corrupt, locked, not writable): a restart will not help

MAX_PENDING_RECORDS = 20_000  # in-memory buffer while the disk is full/locked (~2 weeks at 1/min)


@dataclass
class GatewayStats:
    """What one run did. ``polls`` counts cycles; ``poll_errors`` failed device reads."""

    sim_hours: float = 0.0
    cycles: int = 0
    polls: int = 0
    poll_errors: int = 0
    overruns: int = 0  # cycles that started late by more than a cycle
    setpoint_writes: int = 0
    write_errors: int = 0
    telemetry_produced: int = 0
    telemetry_stored: int = 0
    telemetry_published: int = 0  # distinct seqs acknowledged by the broker in this run
    telemetry_lost: int = 0
    backlog: int = 0  # stored but not yet acknowledged at exit
    commands_applied: int = 0
    commands_rejected: dict[str, int] = field(default_factory=dict)
    store_commits: int = 0
    store_errors: int = 0
    task_restarts: int = 0
    broker_connects: int = 0
    broker_failures: int = 0
    energy_wh: dict[str, float] = field(default_factory=dict)
    planner: dict[str, Any] = field(default_factory=dict)  # PlannerStats when it ran
    inverter_writes: int = 0  # Modbus limit writes (a cost: only when changed or due)
    battery_writes: int = 0
    envelope: dict[str, Any] = field(default_factory=dict)  # AgentStats with [envelope]
    market: dict[str, Any] = field(default_factory=dict)  # MarketStats with [market]
    pv_forecast: dict[str, Any] = field(default_factory=dict)  # external forecasts over MQTT
    meter_failsafe_entries: int = 0  # times the meter-loss failsafe took over
    meter_failsafe_cycles: int = 0  # cycles run under it

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["energy_wh"] = {k: round(v, 1) for k, v in self.energy_wh.items()}
        d["sim_hours"] = round(self.sim_hours, 4)
        return d


@dataclass
class _Slot:
    """One configured device and its connection state."""

    kind: str
    cfg: DeviceConfig | None
    dev: Any = None
    failing: bool = False
    last_error: str | None = None
    retry_at: float = 0.0  # real monotonic
    backoff_s: float = 1.0
    injected: bool = False
    frozen: bool = False  # failing because its values froze: it still takes writes

    @property
    def self_bounded(self) -> bool:
        """The device's link bounds every request itself (in-process devices)."""
        return bool(getattr(getattr(self.dev, "link", None), "bounds_its_wait", False))


class Gateway:
    """All state of one running gateway. Built by :func:`run_gateway`."""

    def __init__(self, config: Config, clock: Clock, *,
                 devices: Mapping[str, Device] | None = None,
                 notifier: Notifier | None = None, policy: Policy = rule_setpoints) -> None:
        self.cfg = config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.policy = policy
        self.topics = Topics(config.mqtt.topic_root, config.site_id)
        self.stats = GatewayStats()
        self.slots: dict[str, _Slot] = {}
        for kind in ("meter", "inverter", "battery"):
            dc = config.device(kind)
            if devices is not None and kind in devices:
                self.slots[kind] = _Slot(kind, dc, dev=devices[kind], injected=True)
            elif devices is None and dc is not None:
                self.slots[kind] = _Slot(kind, dc)
        self.store: Store | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hems-store")
        self.mode = ModeState(mode=config.control.default_mode,
                              reserve_soc_pct=config.control.reserve_soc_pct)
        self.agg = Aggregator(config.store.telemetry_interval_s)
        self.live: SiteState | None = None
        self.setpoint: Setpoints | None = None
        self._sent_bat: tuple[float, float] | None = None  # (w, domain ts) last written
        self._sent_inv: tuple[float, float] | None = None
        self._meter_missing = 0  # consecutive cycles without a usable meter reading
        self._failsafe: Failsafe | None = None  # in force: the meter is lost (gateway.enforce)
        self._resume: tuple[float, float] | None = None  # (pct, ts): PV limit ramping back up
        self.pending = Batch()
        self._next_seq = 1
        self._committed_seq = 0
        self._published_seq = 0
        self._persisted_published = 0
        self._recent = RecentRows(0)  # what the publisher reads back, without the store's thread
        self._energy_base: dict[str, float] = {"import": 0.0, "export": 0.0, "pv": 0.0}
        self.new_rows = asyncio.Event()
        self.commit_now = asyncio.Event()
        self.stop = asyncio.Event()
        self._sleeping: set[asyncio.Task[Any]] = set()  # in _sleep_or_stop
        self._woken: set[asyncio.Task[Any]] = set()  # cancelled there by the stop watcher
        self._stop_watch: asyncio.Task[None] | None = None
        self.loop_done = asyncio.Event()
        self.store_done = asyncio.Event()
        self.heartbeat = time.monotonic()
        self._store_error: str | None = None
        self._start_ts = clock.now()
        self.mqtt: MqttSession | None = None
        self.planner: Planner | None = None  # set by gateway.planner.planner_loop
        self.envelope: EnvelopeAgent | None = None
        self.guard = ReadingGuard()  # plausibility of readings (gateway.plausibility)
        if config.envelope is not None:
            # The DSO's limit is the outer bound of whatever the policy or the plan wants.
            self.envelope = EnvelopeAgent(
                config.site_id, agent_settings(config.envelope, config.control.cycle_s),
                root=config.mqtt.topic_root,
                cycle_s=config.control.cycle_s,
                telemetry_interval_s=config.store.telemetry_interval_s,
                on_event=self.event, on_persist=self._persist_envelope)
        self.market: MarketAgent | None = None
        self.replan = asyncio.Event()  # set: the slow loop plans again now (e.g. a new award)
        if config.market.enabled:
            from gateway.market_agent import make_agent

            self.market = make_agent(self)

    # ------------------------------------------------------------------ plan following

    def plan_setpoint(self, now: float, measured: SiteState) -> float | None:
        """The plan's desired battery power now (W, + charge), followed on measured values.

        ``None`` when the fast loop must not follow a plan: planner off or no plan yet, plan
        older than two intervals, mode other than ``auto``, or no meter/battery reading this
        cycle. Device limits, the reserve and the DSO envelope are NOT applied here.
        """
        if self.planner is None or self.mode.current(now).mode != "auto":
            return None
        return self.planner.desired_battery_w(now, measured)

    def limits_for_horizon(self, start: float, n: int, step_s: float) -> StepLimits | None:
        """The DSO envelope for ``n`` planning steps from ``start`` (None: unlimited).

        Hook for the envelope: the planner calls it each round; an exception skips the round.
        """
        if self.envelope is None:
            return None
        import numpy as np

        from gateway.optimize.inputs import StepLimits

        cols = self.envelope.horizon_limits(start, n, step_s)
        return StepLimits(*(np.array(c, dtype=float) for c in cols))

    def awards_for_horizon(self, start: float, n: int, step_s: float
                           ) -> npt.NDArray[np.float64] | None:
        """Market commitments (``award_w``, W, + sold) for ``n`` planning steps from ``start``
        (None: no market agent). The planner calls it each round."""
        if self.market is None:
            return None
        from gateway.market_agent import awards_array

        return awards_array(self.market, start, n, step_s)

    def _counters(self, state: SiteState) -> Counters:
        """The devices' energy registers this cycle; an absent device's stands still at 0."""
        m, i, b = state.meter, state.inverter, state.battery

        def have(kind: str, v: float | None) -> float | None:
            return v if kind in self.slots else 0.0

        return Counters(
            import_wh=m.import_wh if m else None, export_wh=m.export_wh if m else None,
            pv_wh=have("inverter", i.energy_wh if i else None),
            stored_wh=have("battery", b.soc_pct * b.capacity_wh / 100.0 if b else None))

    def energy_counters(self) -> tuple[float, float]:
        """Lifetime (import, export) Wh integrated from the meter's power (persisted)."""
        open_wh = self.agg.open_wh
        return (self._energy_base["import"] + open_wh["import"],
                self._energy_base["export"] + open_wh["export"])

    def _persist_envelope(self, snapshot: str) -> None:
        self.pending.kv["envelope"] = snapshot
        self.commit_now.set()

    # ------------------------------------------------------------------ store plumbing

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def open(self) -> None:
        """Open the store, restore sequence numbers, energies and the persisted mode."""
        self.store = await self._in_db(Store.open, self.cfg.store.path)
        st = self.store
        self._committed_seq = await self._in_db(st.last_seq)
        self._next_seq = self._committed_seq + 1
        self._recent = RecentRows(self._committed_seq)
        self._published_seq = self._persisted_published = await self._in_db(st.published_seq)
        if self.envelope is not None:
            # Before the fast loop's first write: a restart resumes the limits it held.
            self.envelope.restore(await self._in_db(st.kv_get, "envelope"), self.clock.now())
        if self.market is not None:
            # Awards are commitments: the first plan after a restart must honour them.
            self.market.restore(await self._in_db(st.market_rows, self.clock.now() - 86400.0),
                                self.clock.now())
        saved = await self._in_db(st.kv_json, "mode")
        if isinstance(saved, dict):
            self.mode = ModeState.from_json(saved, self.mode)
        energy = await self._in_db(st.kv_json, "energy_wh")
        if isinstance(energy, dict):
            for k in self._energy_base:
                with contextlib.suppress(TypeError, ValueError):
                    self._energy_base[k] = float(energy.get(k, 0.0))
        self.event("info", "start", f"gateway started (seq {self._next_seq}, mode "
                                    f"{self.mode.mode})")

    def event(self, level: str, kind: str, message: str,
              data: dict[str, Any] | None = None) -> None:
        self.pending.events.append(Event(self.clock.now(), level, kind, message, data))

    # Outbox protocol for the MQTT session --------------------------------------------------

    def published_seq(self) -> int:
        return self._published_seq

    async def fetch(self, after_seq: int, limit: int) -> list[OutboxRow]:
        assert self.store is not None
        rows = self._recent.get(after_seq, limit)  # what was just committed, or nothing new
        if rows is not None:
            return rows
        return await self._in_db(self.store.unpublished, after_seq, limit)

    def acked(self, seq: int) -> None:
        self._recent.published(seq)
        if seq > self._published_seq:
            self.stats.telemetry_published += seq - self._published_seq
            self._published_seq = seq

    # ------------------------------------------------------------------ fast loop

    async def fast_loop(self) -> None:
        cycle = self.cfg.control.cycle_s
        next_t = self._anchor(self.clock.now())
        # real time as the clock counts it: a simulation's held timeline is no clock step
        real = getattr(self.clock, "monotonic", time.monotonic)
        mono, dom = real(), next_t
        while not self.stop.is_set():
            await self.cycle()
            self.heartbeat = time.monotonic()
            next_t += cycle
            now = self.clock.now()
            # The clock itself stepped (NTP after an RTC-less boot, an operator): domain time
            # moved unlike real time. Backwards, the next cycle would be a whole jump away (the
            # loop would stall, the devices revert); forwards, it would count as an overrun.
            m = real()
            jump = (now - dom) - (m - mono) * self.clock.speed
            mono, dom = m, now
            if abs(jump) > max(2 * cycle, 5.0):
                log.warning("clock jumped by %+.1f s; control cycles re-anchored", jump)
                self.event("warning", "clock", f"clock jumped by {jump:+.1f} s; control cycles "
                                               "re-anchored", {"jump_s": round(jump, 3)})
                next_t = self._anchor(now)
            elif now > next_t + cycle:
                # Late by more than a cycle: re-anchor rather than burst to catch up.
                self.stats.overruns += 1
                next_t = self._anchor(now)
            await self._sleep_until(next_t)
        await self.wind_down()

    def _anchor(self, now: float) -> float:
        """The cycle slot to count from at ``now``: ``now`` itself, or with ``control.phase_s``
        the latest slot at or before it (the cycle due then runs at once, the next on the
        grid)."""
        return grid_slot(now, self.cfg.control.cycle_s, self.cfg.control.phase_s)

    async def _sleep_until(self, t: float, wake: asyncio.Event | None = None) -> None:
        """Until domain time ``t``, or sooner when ``stop`` (or ``wake``) is set."""
        if wake is None:
            await self._sleep_or_stop(t)
            return
        sleeper = asyncio.ensure_future(self.clock.sleep_until(t))
        stopper = asyncio.ensure_future(self.stop.wait())
        waits = {sleeper, stopper}
        if wake is not None:
            waits.add(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _sleep_or_stop(self, t: float) -> None:
        # Every control cycle of every home sleeps here (a fleet simulation: thousands of times
        # a second), so no task per wait: the clock's own sleep runs in this task, and one
        # watcher of ``stop`` cancels the sleeping tasks it finds (a cancellation this method
        # takes back, so it stays invisible to the caller). Two tasks and an asyncio.wait per
        # cycle cost more than the cycle's decisions.
        if self.stop.is_set():
            return
        task = asyncio.current_task()
        assert task is not None
        if self._stop_watch is None:
            self._stop_watch = asyncio.get_running_loop().create_task(
                self._wake_sleepers(), name="stop-watch")
        self._sleeping.add(task)
        try:
            await self.clock.sleep_until(t)
        except asyncio.CancelledError:
            # ours (stop) and nobody else's: swallow; anyone else's cancellation goes on
            if task in self._woken and task.uncancel() == 0:
                return
            raise
        finally:
            self._sleeping.discard(task)
            self._woken.discard(task)

    async def _wake_sleepers(self) -> None:
        await self.stop.wait()
        for task in list(self._sleeping):
            self._woken.add(task)
            task.cancel()

    def _reads_in_turn(self) -> bool:
        return all(s.dev is not None and s.self_bounded for s in self.slots.values())

    async def _read(self, kind: str) -> Any:
        slot = self.slots.get(kind)
        if slot is None:
            return None
        if slot.dev is None:
            if time.monotonic() < slot.retry_at:
                self.stats.poll_errors += 1
                return None
            if not await self._connect(slot):
                self.stats.poll_errors += 1
                return None
        try:
            if slot.self_bounded:
                # Each request answers at once or fails within the device's timeout, and a read
                # stops at its first failure: no timer to arm (and leave in the loop's heap)
                reading = await slot.dev.read()
            else:
                # asyncio.timeout, not wait_for: no task per read (three reads a cycle)
                async with asyncio.timeout(self.cfg.control.read_timeout_s):
                    reading = await slot.dev.read()
        except (DeviceError, TimeoutError, OSError) as e:
            self.stats.poll_errors += 1
            self._device_failed(slot, e)
            slot.frozen = False
            self.guard.after_io(kind, slot.dev, None)
            return None
        self.guard.after_io(kind, slot.dev, reading)
        verdict = self.guard.check(kind, reading, self.clock.now())
        if verdict.reject is not None:
            # An absurd or frozen reading could loosen a limit: handle it as a failed read.
            self.stats.poll_errors += 1
            self._device_failed(slot, DeviceError(getattr(slot.dev, "name", kind),
                                                  verdict.reject))
            slot.frozen = verdict.frozen
            return None
        slot.frozen = False
        if verdict.note is not None:
            log.warning("device %s", verdict.note)
            self.event("warning", "device", verdict.note)
        if slot.failing:
            slot.failing = False
            log.info("device %s (%s) reads again", slot.kind, getattr(slot.dev, "name", "?"))
            self.event("info", "device", f"{slot.kind} reads again")
        return reading

    def _device_failed(self, slot: _Slot, e: BaseException) -> None:
        msg = str(e) or f"no reply within {self.cfg.control.read_timeout_s:g} s"
        if not slot.failing or msg != slot.last_error:
            log.error("device %s: %s", slot.kind, msg)
            self.event("error", "device", f"{slot.kind}: {msg}")
        slot.failing = True
        slot.last_error = msg

    async def _connect(self, slot: _Slot) -> bool:
        from drivers.factory import DeviceSpec, connect_device

        c = slot.cfg
        assert c is not None
        try:
            spec = DeviceSpec(kind=c.kind, transport=c.transport,  # type: ignore[arg-type]
                              host=c.host, port=c.port, unit=c.unit, serial_port=c.serial_port,
                              baudrate=c.baudrate, parity=c.parity,  # type: ignore[arg-type]
                              stopbits=c.stopbits, timeout_s=c.timeout_s,
                              register_map=c.register_map, name=c.name)
            slot.dev = await asyncio.wait_for(connect_device(spec, clock=self.clock),
                                              timeout=max(5.0, 10 * c.timeout_s))
        except (DeviceError, TimeoutError, OSError, ValueError) as e:
            self._device_failed(slot, e)
            slot.retry_at = time.monotonic() + slot.backoff_s
            slot.backoff_s = min(slot.backoff_s * 2, 60.0)
            return False
        slot.backoff_s = 1.0
        log.info("device %s connected: %r", slot.kind, slot.dev)
        return True

    async def cycle(self) -> None:
        """One control cycle: read, decide, write, aggregate."""
        t = self.clock.now()
        if self._reads_in_turn():
            # In-process devices answer without I/O: reading them concurrently would only cost
            # three tasks and a gather per cycle (a simulated timeout fault then delays the
            # reads after it by its timeout, as a serial bus would)
            meter = await self._read("meter")
            inv = await self._read("inverter")
            bat = await self._read("battery")
        else:
            meter, inv, bat = await asyncio.gather(self._read("meter"), self._read("inverter"),
                                                   self._read("battery"))
        state = SiteState(t, meter if isinstance(meter, MeterReading) else None,
                          inv if isinstance(inv, InverterReading) else None,
                          bat if isinstance(bat, BatteryReading) else None)
        self.stats.cycles += 1
        self.stats.polls += 1
        mode = self.mode.current(t)
        if mode != self.mode:
            self._set_mode(mode, f"{self.mode.mode} ended; back to {mode.mode}")
        planned = self.plan_setpoint(t, state)
        if planned is not None and self.planner is not None:
            sp = self.planner.setpoints(state, mode, planned)
        else:
            sp = self.policy(state, mode)
        if self.envelope is not None:
            connected = self.mqtt is not None and self.mqtt.connected.is_set()
            sp = self.envelope.step(state, sp, connected)
            sp = self._meter_failsafe(state, sp, t)
        await self._apply(sp, state, t)
        self.setpoint = sp
        self.live = state
        errors = sum(1 for k, r in (("meter", meter), ("inverter", inv), ("battery", bat))
                     if k in self.slots and r is None)
        rec = self.agg.add(t, state.meter.site_w if state.meter else None,
                           state.inverter.ac_w if state.inverter else None,
                           state.battery.w if state.battery else None,
                           state.battery.soc_pct if state.battery else None, errors, mode.mode,
                           self._counters(state))
        if rec is not None:
            if self.envelope is not None:
                rec.update(self.envelope.window_record(rec["start"]))
            self._emit(rec)
        if self.market is not None:
            # After _emit: a closed window's energy has moved into the lifetime base by now.
            self.market.observe(t, state.meter, *self.energy_counters())

    async def _apply(self, sp: Setpoints, state: SiteState, t: float) -> None:
        revert = self.cfg.control.revert_s
        # Re-send no later than half the revert time (the check runs once per cycle).
        resend = max(revert / 2 - self.cfg.control.cycle_s, self.cfg.control.cycle_s)
        slot = self.slots.get("battery")
        if (slot is not None and slot.dev is not None and state.battery is None and slot.frozen
                and self._sent_bat is not None and t - self._sent_bat[1] >= resend):
            # Frozen values, but it still takes writes: hold the last setpoint (re-sent, so its
            # revert timer does not hand it back to its own mode on stale information).
            w = self._sent_bat[0]
            if await self._write(slot, slot.dev.set_power(w, revert), "battery power (held)"):
                self._sent_bat = (w, t)
                self.stats.battery_writes += 1
        if slot is not None and slot.dev is not None and state.battery is not None:
            bat: Battery = slot.dev
            if sp.battery_w is None:
                if self._sent_bat is not None:
                    await self._write(slot, bat.release(), "battery release")
                    self._sent_bat = None
            else:
                b = state.battery
                deadband = max(20.0, 0.005 * max(b.max_charge_w, b.max_discharge_w))
                last = self._sent_bat
                due = (last is None or abs(sp.battery_w - last[0]) > deadband
                       or t - last[1] >= resend)
                if due and await self._write(
                        slot, bat.set_power(sp.battery_w, revert), "battery power"):
                    self._sent_bat = (sp.battery_w, t)
                    self.stats.battery_writes += 1
        islot = self.slots.get("inverter")
        if (islot is not None and islot.dev is not None and state.inverter is None
                and islot.frozen and self._sent_inv is not None
                and t - self._sent_inv[1] >= resend):
            # Frozen, still taking writes: the held limit is re-sent, or its revert timer would
            # lift it (a looser limit) while we cannot see its output.
            pct = self._sent_inv[0]
            if await self._write(islot, islot.dev.set_limit_pct(pct, revert),
                                 "inverter limit (held)"):
                self._sent_inv = (pct, t)
                self.stats.inverter_writes += 1
        if (islot is not None and islot.dev is not None and state.inverter is not None
                and sp.inverter_limit_pct is not None):
            inv: Inverter = islot.dev
            pct = sp.inverter_limit_pct
            last = self._sent_inv
            due = last is None or abs(pct - last[0]) > 0.5 or t - last[1] >= resend
            if pct >= 100.0 and (last is None or last[0] >= 100.0):
                # Nothing to hold: 100 % is what the inverter does without us, and what its
                # revert timer returns it to. (Reaching 100 % from below is written once.)
                due = False
            if due and await self._write(islot, inv.set_limit_pct(pct, revert),
                                         "inverter limit"):
                self._sent_inv = (pct, t)
                self.stats.inverter_writes += 1

    def _meter_failsafe(self, state: SiteState, sp: Setpoints, t: float) -> Setpoints:
        """Without the meter for ``control.meter_loss_cycles`` cycles, assume zero load and
        curtail PV to the export limit (+ the battery's charge): a load switching off during the
        outage can then not push the export over it (:func:`gateway.enforce.meter_loss_failsafe`).
        When the meter reads again, the curtailment is lifted at the envelope's ramp rate
        (:func:`gateway.enforce.resume_limit_pct`). One event each way."""
        env = self.envelope
        assert env is not None
        if state.meter is None:
            self._meter_missing += 1
            self._resume = None
            if self._meter_missing < self.cfg.control.meter_loss_cycles or env.active is None:
                return sp
            try:
                fs = meter_loss_failsafe(state.inverter, state.battery, env.active.limits,
                                         sp.battery_w, sp.inverter_limit_pct, env.enforce_config)
            except EnforceInputError as e:
                log.warning("meter failsafe: cannot compute this cycle: %s", e)
                return sp
            if fs is None:  # no export limit: nothing to protect
                if self._failsafe is not None:
                    self._failsafe = None
                    self.event("info", "failsafe", "meter still lost, but no export limit is "
                                                   "in force: failsafe curtailment ended")
                return sp
            if self._failsafe is None:
                self.stats.meter_failsafe_entries += 1
                msg = f"meter lost: failsafe curtailment to {fs.pv_cap_w:.0f} W"
                log.warning("%s (%s)", msg, fs.reason)
                self.event("warning", "failsafe", msg,
                           {"pv_cap_w": round(fs.pv_cap_w, 1), "reason": fs.reason,
                            "cycles": self._meter_missing})
            self._failsafe = fs
            self.stats.meter_failsafe_cycles += 1
            return Setpoints(
                battery_w=sp.battery_w if fs.battery_w is None else round(fs.battery_w, 1),
                inverter_limit_pct=(sp.inverter_limit_pct if fs.inverter_limit_pct is None
                                    else fs.inverter_limit_pct))
        self._meter_missing = 0
        if self._failsafe is not None:
            fs, self._failsafe = self._failsafe, None
            if fs.inverter_limit_pct is not None:
                self._resume = (fs.inverter_limit_pct, t)
            msg = (f"meter reads again: failsafe ended, PV limit ramps up from "
                   f"{fs.pv_cap_w:.0f} W")
            log.info("%s", msg)
            self.event("info", "failsafe", msg)
        if self._resume is None:
            return sp
        pct = sp.inverter_limit_pct
        if pct is None:
            self._resume = None
            return sp
        from_pct, t0 = self._resume
        cycle = self.cfg.control.cycle_s
        # Bounded: a clock step must not complete the ramp at once.
        dt = min(max(0.0, t - t0), 5 * cycle)
        need = -float("inf")
        last, lim = env.last, env.active.limits if env.active is not None else None
        if (last is not None and lim is not None and lim.import_w is not None
                and state.inverter is not None and sp.battery_w is not None):
            need = (last.load_w + sp.battery_w - lim.import_w) / state.inverter.max_w * 100.0
        new = resume_limit_pct(pct, from_pct, dt, env.settings.ramp_pct_per_min, need)
        if new >= pct:
            self._resume = None  # caught up with normal control
            return sp
        self._resume = (new, t)
        return replace(sp, inverter_limit_pct=round(new, 2))

    async def _write(self, slot: _Slot, aw: Awaitable[None], what: str) -> bool:
        try:
            if slot.self_bounded:  # as in _read: each request bounds itself
                await aw
            else:
                async with asyncio.timeout(self.cfg.control.read_timeout_s * 2):
                    await aw
        except (DeviceError, TimeoutError, OSError) as e:
            self.stats.write_errors += 1
            log.warning("write %s failed: %s", what, e or "timeout")
            return False
        self.stats.setpoint_writes += 1
        return True

    def _emit(self, rec: dict[str, Any]) -> None:
        seq = self._next_seq
        self._next_seq += 1
        rec = {"seq": seq, **rec}
        payload = {"v": 1, "site": self.cfg.site_id, **rec}
        self.pending.telemetry.append(rec)
        self.pending.outbox.append(OutboxRow(seq, self.topics.telemetry,
                                             messages.dumps(payload), 1, rec["ts"]))
        self.stats.telemetry_produced += 1
        for k in ("import", "export", "pv"):
            v = rec.get(f"{k}_wh")
            if v is not None:
                self._energy_base[k] += v
        self.pending.kv["energy_wh"] = messages.dumps(
            {k: round(v, 3) for k, v in self._energy_base.items()}).decode()
        if len(self.pending.telemetry) > MAX_PENDING_RECORDS:
            # The disk has refused writes for a long time: keep the newest, count the loss.
            drop = len(self.pending.telemetry) - MAX_PENDING_RECORDS
            del self.pending.telemetry[:drop]
            del self.pending.outbox[:drop]
            self.stats.telemetry_lost += drop

    async def wind_down(self) -> None:
        """Leave devices safe, flush the partial telemetry window."""
        slot = self.slots.get("battery")
        if slot is not None and slot.dev is not None:
            # Release even if we believe we never commanded it: a previous run may have.
            if await self._write(slot, slot.dev.release(), "battery release"):
                log.info("battery released to its own control")
            self._sent_bat = None
        rec = self.agg.close()
        if rec is not None:
            if self.envelope is not None:
                rec.update(self.envelope.window_record(rec["start"]))
            self._emit(rec)
        self.event("info", "stop", "gateway stopping")
        self.loop_done.set()

    # ------------------------------------------------------------------ mode / commands

    def _set_mode(self, mode: ModeState, why: str) -> None:
        self.mode = mode
        self.pending.kv["mode"] = messages.dumps(mode.to_json()).decode()
        self.event("info", "mode", why, mode.to_json())
        self.commit_now.set()
        log.info("mode: %s", why)

    async def on_command(self, name: str, payload: bytes, retained: bool) -> tuple[str, bytes]:
        now = self.clock.now()
        bat = self.live.battery if self.live is not None else None
        if retained:
            from gateway.commands import CommandOutcome

            out = CommandOutcome(name, None, False, "retained command ignored: commands must "
                                 "not be published with retain (clear the retained message)",
                                 "invalid")
        else:
            out = handle_command(name, payload, self.mode.current(now), bat, now,
                                 self.cfg.mqtt.max_command_bytes)
        if out.applied:
            assert out.state is not None
            self.stats.commands_applied += 1
            self._set_mode(out.state, f"command {name} applied (id {out.cmd_id}): "
                                      f"{payload[:200].decode('utf-8', 'replace')}")
        else:
            c = self.stats.commands_rejected
            c[out.category] = c.get(out.category, 0) + 1
            log.warning("command %s rejected: %s", name[:64], out.reason)
            self.event("warning", "command", f"{name[:64]} rejected: {out.reason}")
        result = messages.command_result(self.cfg.site_id, name, out.cmd_id,
                                         "applied" if out.applied else "rejected",
                                         out.reason, now)
        return self.topics.cmd_result(name[:64].replace("#", "").replace("+", "")), \
            messages.dumps(result)

    # ------------------------------------------------------------------ state payload

    def state_payload(self) -> bytes | None:
        s = self.live
        if s is None:
            return None
        now = self.clock.now()
        mode = self.mode.current(now)
        m, i, b = s.meter, s.inverter, s.battery
        load = None if m is None else m.site_w + (i.ac_w if i else 0.0) - (b.w if b else 0.0)
        degraded = any(sl.failing or sl.dev is None for sl in self.slots.values())
        # Lifetime counters include the open window, so HA sees energy move every update.
        open_wh = self.agg.open_wh
        payload = {
            "v": 1, "site": self.cfg.site_id, "ts": round(now, 3),
            "status": "degraded" if degraded else "ok",
            "mode": mode.mode, "mode_until": mode.until, "reserve_soc_pct": mode.reserve_soc_pct,
            "site_w": messages.rounded(m.site_w if m else None),
            "pv_w": messages.rounded(i.ac_w if i else None),
            "battery_w": messages.rounded(b.w if b else None),
            "load_w": messages.rounded(load),
            "soc_pct": messages.rounded(b.soc_pct if b else None),
            "battery_setpoint_w": self.setpoint.battery_w if self.setpoint else None,
            "import_kwh": round((self._energy_base["import"] + open_wh["import"]) / 1000, 4),
            "export_kwh": round((self._energy_base["export"] + open_wh["export"]) / 1000, 4),
            "pv_kwh": round((self._energy_base["pv"] + open_wh["pv"]) / 1000, 4),
            "last_seq": self._committed_seq,
            "backlog": max(0, self._committed_seq - self._published_seq),
        }
        return messages.dumps(payload)

    async def state_period(self) -> None:
        """Wait until the next state publication is due (domain time, >= 0.1 s real)."""
        t = self.clock.now() + self.cfg.mqtt.state_interval_s
        await asyncio.gather(self.clock.sleep_until(t), asyncio.sleep(0.1))

    # ------------------------------------------------------------------ store writer

    async def store_writer(self) -> None:
        interval = self.cfg.store.commit_interval_s
        next_retention = self.clock.now() + 60.0
        while True:
            done = self.loop_done.is_set()
            if not done:
                waiter = asyncio.ensure_future(self.clock.sleep(interval))
                trig = asyncio.ensure_future(self.commit_now.wait())
                fin = asyncio.ensure_future(self.loop_done.wait())
                try:
                    await asyncio.wait({waiter, trig, fin}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for f in (waiter, trig, fin):
                        f.cancel()
                self.commit_now.clear()
            await self.commit()
            if self.clock.now() >= next_retention and not done:
                next_retention = self.clock.now() + 3600.0
                await self._retention()
            if done:
                break
        self.store_done.set()

    async def commit(self) -> bool:
        """Write the pending batch. On failure keep it in memory and say why (once)."""
        assert self.store is not None
        batch, self.pending = self.pending, Batch()
        if self._published_seq > self._persisted_published:
            batch.published_seq = self._published_seq
        if not batch:
            return True
        try:
            await self._in_db(self.store.write, batch)
        except StoreError as e:
            self.stats.store_errors += 1
            # Put it back in front of whatever arrived meanwhile; nothing is dropped here.
            merged = Batch(telemetry=batch.telemetry + self.pending.telemetry,
                           outbox=batch.outbox + self.pending.outbox,
                           events=(batch.events + self.pending.events)[-1000:],
                           kv={**batch.kv, **self.pending.kv})
            self.pending = merged
            if str(e) != self._store_error:
                log.error("store: %s; keeping %d records in memory and retrying",
                          e, len(merged.telemetry))
                self._store_error = str(e)
            return False
        if self._store_error is not None:
            log.info("store: writing again (%s resolved)", self._store_error)
            self._store_error = None
        if batch.published_seq is not None:
            self._persisted_published = batch.published_seq
        self.stats.store_commits += 1
        if batch.outbox:
            self._committed_seq = batch.outbox[-1].seq
            self._recent.committed(batch.outbox)
            self.stats.telemetry_stored += len(batch.telemetry)
            log.debug("store: committed up to seq %d", self._committed_seq)
            self.new_rows.set()
        return True

    async def _retention(self) -> None:
        assert self.store is not None
        s = self.cfg.store
        try:
            out = await self._in_db(self.store.retention, self.clock.now(), s.retention_days,
                                    s.event_retention_days, s.outbox_retention_days,
                                    s.outbox_max_rows)
        except StoreError as e:
            log.error("store retention: %s", e)
            return
        if out.get("lost"):
            self._recent.forget(self._committed_seq)
            self.stats.telemetry_lost += out["lost"]
            log.error("store: outbox over %d rows; dropped the %d oldest unpublished (they stay "
                      "in the telemetry table)", s.outbox_max_rows, out["lost"])

    # ------------------------------------------------------------------ systemd

    async def systemd_task(self) -> None:
        n = self.notifier
        started = time.monotonic()
        ready = False
        wd = n.watchdog_s
        tick = min(wd / 4, 1.0) if wd else 0.5
        while not self.loop_done.is_set():
            if not ready:
                meter = self.slots.get("meter")
                devices_up = meter is not None and meter.dev is not None and not meter.failing \
                    and self.stats.cycles > 0
                broker_up = self.mqtt is not None and self.mqtt.connected.is_set()
                if devices_up and broker_up:
                    n.ready("running")
                    ready = True
                    log.info("ready: devices and broker up")
                elif time.monotonic() - started > self.cfg.control.startup_grace_s:
                    why = ", ".join(w for w, ok in (("meter not reading", devices_up),
                                                    ("broker not connected", broker_up))
                                    if not ok)
                    n.ready(f"degraded: {why}")
                    ready = True
                    log.warning("ready (degraded): %s", why)
            if wd and time.monotonic() - self.heartbeat < wd / 2:
                # Only a beating fast loop feeds the watchdog: a hung loop gets us restarted.
                n.watchdog()
            if ready and not wd:
                # Nothing left to tell systemd: no wake-up twice a second for nothing (a Pi's
                # idle power; a fleet simulation's CPU)
                await self.loop_done.wait()
                return
            await asyncio.sleep(tick)

    def close(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch.cancel()  # a failed run may end without ``stop`` set
        if self.store is not None:
            self.store.close()  # single thread: executor is idle by now
            self.store = None
        self._db.shutdown(wait=True)


async def run_gateway(config: Config, clock: Clock, *, stop: asyncio.Event | None = None,
                      devices: Mapping[str, Device] | None = None,
                      notifier: Notifier | None = None, policy: Policy = rule_setpoints,
                      until: float | None = None, shutdown_timeout_s: float = 15.0,
                      on_ready: Callable[[Gateway], None] | None = None,
                      slow_loop: Callable[[Gateway], Awaitable[None]] | None = None
                      ) -> GatewayStats:
    """Run the gateway until ``stop`` is set (or domain time reaches ``until``).

    ``devices`` (kind -> nature) replaces connecting to the configured devices (tests, demo).
    ``policy`` turns (state, mode) into setpoints every cycle (envelope enforcement plugs in
    here); ``slow_loop(gateway)`` is supervised like the other tasks and should return once
    ``gateway.stop`` is set (forecast -> optimize -> bids plugs in here).
    Raises :class:`StoreError` if the database cannot be opened and :class:`Unrecoverable` if
    a task fails for good; otherwise returns the run's :class:`GatewayStats`.
    """
    stop = stop if stop is not None else asyncio.Event()
    if slow_loop is None and config.planner.enabled:
        from gateway.planner import planner_loop  # imports cvxpy: only when planning

        slow_loop = planner_loop
    gw = Gateway(config, clock, devices=devices, notifier=notifier, policy=policy)
    try:
        await gw.open()
    except BaseException:
        gw.close()
        raise
    mqtt = MqttSession(config.broker, config.mqtt, gw.topics, gw, gw.on_command,
                       gw.state_payload, gw.state_period, envelope=gw.envelope, now=clock.now,
                       market=gw.market)
    gw.mqtt = mqtt
    hard_stop = asyncio.Event()

    async def mqtt_task() -> None:
        await mqtt.run()

    async def closer() -> None:
        # Ordered stop: fast loop -> store -> MQTT (drain, offline) ; bounded in real time.
        if until is not None:
            waiter = asyncio.ensure_future(clock.sleep_until(until))
            stopw = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopw}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopw.cancel()
        else:
            await stop.wait()
        gw.notifier.stopping()
        gw.stop.set()
        try:
            async with asyncio.timeout(shutdown_timeout_s):
                await gw.store_done.wait()
                await mqtt.close(drain_timeout_s=min(5.0, shutdown_timeout_s / 2))
                await mqtt.wait_closed()
        except TimeoutError:
            log.error("shutdown took longer than %.0f s; stopping hard", shutdown_timeout_s)
            hard_stop.set()

    def on_restart(name: str, e: BaseException) -> None:
        gw.stats.task_restarts += 1
        gw.event("error", "restart", f"task {name} restarted after {e!r}")

    specs = [
        TaskSpec("fast-loop", gw.fast_loop),
        TaskSpec("store-writer", gw.store_writer),
        TaskSpec("mqtt", mqtt_task),
        TaskSpec("systemd", gw.systemd_task),
        TaskSpec("closer", closer, max_restarts=0),
    ]
    if slow_loop is not None:
        specs.append(TaskSpec("slow-loop", lambda: slow_loop(gw)))
    if gw.market is not None:
        market = gw.market
        specs.append(TaskSpec("market", lambda: market.run(gw.stop)))
    sup = Supervisor(specs, hard_stop, on_restart=on_restart)
    if on_ready is not None:
        on_ready(gw)
    try:
        await sup.run()
    finally:
        if not gw.store_done.is_set() and gw.store is not None:
            # Hard stop or failure: still try to keep what is buffered.
            with contextlib.suppress(Exception):
                await gw.commit()
        gw.stats.sim_hours = (clock.now() - gw._start_ts) / 3600.0
        gw.stats.energy_wh = dict(gw.agg.totals_wh)
        if gw.planner is not None:
            gw.stats.planner = gw.planner.stats.as_dict()
        if gw.envelope is not None:
            gw.stats.envelope = gw.envelope.stats.as_dict()
        if gw.market is not None:
            gw.stats.market = gw.market.stats.as_dict()
        gw.stats.pv_forecast = mqtt.pv_forecast.stats.as_dict()
        gw.stats.broker_connects = mqtt.stats.connects
        gw.stats.broker_failures = mqtt.stats.connect_failures
        gw.stats.backlog = max(0, gw._committed_seq - gw._published_seq)
        for slot in gw.slots.values():
            link = getattr(slot.dev, "link", None)
            if link is not None and not slot.injected:
                with contextlib.suppress(Exception):
                    await link.close()
        gw.close()
        gw.notifier.close()
    return gw.stats


def _setup_logging(spec: str) -> None:
    """``HEMS_LOG_LEVEL``: ``LEVEL[,logger=LEVEL...]``, e.g. ``INFO,gateway.daemon=DEBUG``.

    journald adds its own timestamps, so the format has none.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()] or ["INFO"]
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for p in parts:
        name, _, level = p.rpartition("=")
        lv = logging.getLevelName(level.upper())
        if isinstance(lv, int):
            logging.getLogger(name or None).setLevel(lv)


def main_run(config_path: str, *, clock: Clock | None = None) -> int:
    """``hems run --config FILE``: run until SIGTERM/SIGINT. Returns the process exit code.

    0 clean stop; 1 unrecoverable runtime failure (systemd restarts); 2 invalid config;
    3 database unusable (both listed in RestartPreventExitStatus: a restart would not help).
    """
    _setup_logging(os.environ.get("HEMS_LOG_LEVEL", "INFO"))
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(f"hems: {e}", file=sys.stderr)
        return EXIT_CONFIG

    async def go() -> GatewayStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_gateway(cfg, clock or WallClock(), stop=stop)

    try:
        stats = asyncio.run(go())
    except StoreError as e:
        print(f"hems: {e}", file=sys.stderr)
        return EXIT_STORE
    except Unrecoverable as e:
        print(f"hems: {e}", file=sys.stderr)
        return EXIT_FAILURE
    log.info("stopped: %s", json.dumps(stats.as_dict(), separators=(",", ":")))
    return EXIT_OK


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m gateway.daemon CONFIG.toml", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.exit(main_run(sys.argv[1]))
