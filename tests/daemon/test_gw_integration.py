"""The daemon end to end, in process: simulated devices over real Modbus TCP, a real Mosquitto,
a real SQLite file, the same :func:`run_gateway` as ``hems run`` on an accelerated clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.clock import SimClock
from firmware_sim.home import HomeConfig
from firmware_sim.server import SimulatedHome, run_home
from gateway import hass, messages
from gateway.config import Config
from gateway.daemon import Gateway, GatewayStats, run_gateway
from gateway.store import Store, integrity_check

from .daemon_helpers import (
    START,
    Collector,
    make_config,
    profiles,
    publish,
    retained,
    wait_until,
)

T = "hems/v1/home-1"
Home = tuple[SimClock, SimulatedHome]


@dataclass
class Running:
    gw: Gateway
    task: asyncio.Task[GatewayStats]
    stop: asyncio.Event

    async def finish(self) -> GatewayStats:
        self.stop.set()
        return await asyncio.wait_for(self.task, 30)


@contextlib.asynccontextmanager
async def gateway(cfg: Config, clock: SimClock) -> AsyncIterator[Running]:
    stop = asyncio.Event()
    box: list[Gateway] = []
    task = asyncio.create_task(run_gateway(cfg, clock, stop=stop, on_ready=box.append))
    await wait_until(lambda: bool(box) or task.done(), 10, "gateway start")
    if task.done():
        task.result()
    r = Running(box[0], task, stop)
    try:
        yield r
    finally:
        if not task.done():
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)


@pytest.fixture
async def home() -> AsyncIterator[tuple[SimClock, SimulatedHome]]:
    clock = SimClock(start=START, speed=20.0)
    load, pv = profiles()
    async with run_home(clock, HomeConfig(battery_max_charge_w=5000,
                                          battery_max_discharge_w=5000), load=load,
                        pv=pv) as sim:
        yield clock, sim


def telemetry_seqs(c: Collector) -> list[int]:
    return [m.json()["seq"] for m in c.on(f"{T}/telemetry")]


async def test_discovery_state_availability_and_clean_stop(home: Home, mosquitto: Any,
                                                           tmp_path: Path) -> None:
    clock, sim = home
    cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"))
    async with Collector(mosquitto.port, client_id="c1") as col, gateway(cfg, clock) as run:
        await wait_until(lambda: len(col.on(f"{T}/telemetry")) >= 2, 30, "two telemetry records")
        await wait_until(lambda: col.last(f"{T}/state") is not None, 10, "state")
        assert col.last(f"{T}/availability").payload == b"online"  # type: ignore[union-attr]

        # Every payload received matches its schema.
        for m in col.on(f"{T}/telemetry"):
            assert messages.validate("telemetry", m.json()) == [], m.payload
        state_msgs = col.on(f"{T}/state")
        for m in state_msgs:
            assert messages.validate("state", m.json()) == [], m.payload
        state = state_msgs[-1].json()
        assert state["status"] == "ok" and state["soc_pct"] is not None
        assert state["pv_w"] > 0  # daytime on the simulated PV

        # Discovery: retained, one per entity, templates resolve on the real state payload.
        disc = await retained(mosquitto.port, "homeassistant/#")
        expected = dict(hass.discovery_messages(run.gw.topics))
        assert set(disc) == set(expected)
        for raw in disc.values():
            cfg_ = json.loads(raw)
            for key in re.findall(r"value_json\.(\w+)", cfg_.get("value_template", "")):
                assert key in state
        seqs = telemetry_seqs(col)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        stats = await run.finish()

    assert stats.poll_errors == 0 and stats.polls > 10
    assert stats.telemetry_lost == 0 and stats.backlog == 0
    assert stats.telemetry_published == stats.telemetry_stored == stats.telemetry_produced
    # Clean stop: offline is retained, the battery is back in its own mode.
    kept = await retained(mosquitto.port, f"{T}/#")
    assert kept[f"{T}/availability"] == b"offline"
    assert f"{T}/state" in kept
    assert sim.physics.storage.mode == 0
    # The store has every record, sequence numbers gap-free.
    s = Store.open(cfg.store.path)
    rows = s.telemetry()
    assert [r["seq"] for r in rows] == list(range(1, stats.telemetry_produced + 1))
    assert {e["kind"] for e in s.events()} >= {"start", "stop"}
    s.close()
    assert integrity_check(cfg.store.path) == "ok"


async def test_control_phase_puts_every_cycle_on_its_grid(home: Home, mosquitto: Any,
                                                          tmp_path: Path) -> None:
    """``control.phase_s``: cycles start at t = phase + k * cycle_s, whatever the start time (two
    phases half a cycle apart: a loop that ignored the phase cannot sit on both grids)."""
    clock, sim = home
    for phase in (0.2, 0.7):
        cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / f"p{phase}.db"),
                          control={"phase_s": phase})
        starts: list[float] = []
        async with gateway(cfg, clock) as run:
            while len(starts) < 12:
                live = run.gw.live
                if live is not None and (not starts or live.ts != starts[-1]):
                    starts.append(live.ts)
                await asyncio.sleep(0.004)  # 0.08 domain s: every 1 s cycle is seen
            await run.finish()
        # The first cycle runs at once (at start); later ones on the grid, a wake-up's latency
        # late (at x20, 0.1 domain s = 5 ms): the median, so one slow wake-up on a loaded
        # runner does not fail it; a loop ignoring the phase sits at a constant, random offset.
        after = sorted((t - phase) % 1.0 for t in starts[2:])
        assert after[len(after) // 2] < 0.1 and after[-1] < 0.6, (phase, after)


async def test_commands_are_applied_or_rejected_with_a_reason(home: Home, mosquitto: Any,
                                                              tmp_path: Path) -> None:
    clock, sim = home
    cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"))
    results = f"{T}/cmd_result"
    async with Collector(mosquitto.port, topics=(f"{T}/#",), client_id="c2") as col, \
            gateway(cfg, clock) as run:
        await wait_until(lambda: run.gw.live is not None and run.gw.live.battery is not None,
                         20, "first battery reading")
        # Commands are not retained: one published before the gateway subscribed is lost (ci
        # on stop 10 published after the first reading but before the session's SUBSCRIBE).
        await wait_until(lambda: run.gw.mqtt is not None and run.gw.mqtt.connected.is_set(),
                         20, "the gateway's MQTT session (subscribed)")

        async def send(name: str, payload: bytes | str, retain: bool = False) -> dict[str, Any]:
            n = len(col.on(f"{results}/{name}"))
            await publish(mosquitto.port, f"{T}/cmd/{name}", payload, retain=retain)
            await wait_until(lambda: len(col.on(f"{results}/{name}")) > n, 10, f"result {name}")
            r = col.on(f"{results}/{name}")[-1].json()
            assert messages.validate("cmd_result", r) == []
            return r

        r = await send("mode", json.dumps({"id": "c-1", "mode": "force_charge",
                                           "power_w": 2000, "duration_s": 3600}))
        assert (r["status"], r["id"], r["reason"]) == ("applied", "c-1", None)
        # Applied on the real device: the battery charges at ~2 kW within a few cycles.
        await wait_until(lambda: run.gw.live is not None and run.gw.live.battery is not None
                         and abs(run.gw.live.battery.w - 2000) < 50, 20, "battery at +2 kW")
        await wait_until(lambda: (m := col.last(f"{T}/state")) is not None
                         and m.json()["mode"] == "force_charge", 10, "state shows the mode")

        r = await send("mode", json.dumps({"id": "c-2", "mode": "force_charge",
                                           "power_w": 9000, "duration_s": 60}))
        assert r["status"] == "rejected" and "max charge power 5000 W" in r["reason"]
        r = await send("mode", "{broken")
        assert r["status"] == "rejected" and r["reason"].startswith("malformed JSON")
        r = await send("mode", "x" * 5000)
        assert r["status"] == "rejected" and "payload too large" in r["reason"]
        r = await send("selfdestruct", "{}")
        assert r["status"] == "rejected" and "unknown command 'selfdestruct'" in r["reason"]
        r = await send("reserve", json.dumps({"soc_pct": 150}))
        assert r["status"] == "rejected" and "field 'soc_pct'" in r["reason"]
        # A live message is applied even if published with retain (the broker clears the flag
        # for live delivery) ...
        r = await send("reserve", json.dumps({"id": "r", "soc_pct": 30}), retain=True)
        assert r["status"] == "applied"
        r = await send("mode", json.dumps({"mode": "idle"}))
        assert r["status"] == "applied"
        await wait_until(lambda: run.gw.live is not None and run.gw.live.battery is not None
                         and abs(run.gw.live.battery.w) < 50, 20, "battery idle")
        stats = await run.finish()

    assert stats.commands_applied == 3
    assert stats.commands_rejected == {"limit": 1, "malformed": 1, "oversize": 1, "unknown": 1,
                                       "invalid": 1}
    # The mode and reserve survive a restart (persisted in the store) ...
    async with Collector(mosquitto.port, topics=(f"{results}/#",), client_id="c3") as col2, \
            gateway(cfg, clock) as run2:
        assert run2.gw.mode.mode == "idle" and run2.gw.mode.reserve_soc_pct == 30
        # ... and the stale retained copy, replayed at subscribe, is not applied again.
        await wait_until(lambda: bool(col2.on(f"{results}/reserve")), 10, "retained replay")
        r = col2.on(f"{results}/reserve")[-1].json()
        assert r["status"] == "rejected" and "retained command ignored" in r["reason"]
        await publish(mosquitto.port, f"{T}/cmd/reserve", b"", retain=True)  # clear it
        stats2 = await run2.finish()
    assert stats2.commands_rejected == {"invalid": 1} and stats2.commands_applied == 0


async def test_broker_outage_loses_nothing_and_drains_in_order(mosquitto: Any,
                                                               tmp_path: Path) -> None:
    clock = SimClock(start=START, speed=50.0)
    load, pv = profiles()
    async with run_home(clock, HomeConfig(), load=load, pv=pv) as sim:
        cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"),
                          store={"telemetry_interval_s": 5.0, "commit_interval_s": 5.0})
        async with Collector(mosquitto.port, topics=(f"{T}/telemetry",),
                             client_id="outage-watcher") as col, gateway(cfg, clock) as run:
            gw = run.gw
            await wait_until(lambda: len(col.messages) >= 3, 30, "telemetry before the outage")
            mosquitto.stop()
            produced_at_stop = gw.stats.telemetry_produced
            await wait_until(lambda: gw.stats.telemetry_produced >= produced_at_stop + 15, 60,
                             "records produced while the broker is down")
            # They are stored, not published, and the state says so.
            await wait_until(lambda: gw._committed_seq > gw._published_seq + 10, 30,
                             "a stored backlog")
            backlog_top = gw._committed_seq
            mosquitto.start()
            await wait_until(lambda: backlog_top in telemetry_seqs(col), 60, "backlog drained")
            stats = await run.finish()
        await asyncio.sleep(0.2)
        # Let the collector see the final records published during the clean stop.
    seqs = telemetry_seqs(col)
    first_seen: list[int] = []
    for s in seqs:
        if s not in first_seen:
            first_seen.append(s)
    assert first_seen == sorted(first_seen), "telemetry arrived out of order"
    assert set(range(first_seen[0], backlog_top + 1)) <= set(first_seen), "a seq is missing"
    assert stats.telemetry_lost == 0
    assert stats.broker_connects >= 2
    assert stats.telemetry_published == stats.telemetry_stored


async def test_unreachable_broker_and_refused_credentials_degrade_not_crash(
        mosquitto_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secured = mosquitto_factory(users={"gw": "right"})
    clock = SimClock(start=START, speed=20.0)
    load, pv = profiles()
    async with run_home(clock, HomeConfig(), load=load, pv=pv) as sim:
        cfg = make_config(sim.endpoints, secured.url, str(tmp_path / "g.db"),
                          broker={"username": "gw", "password": "wrong"})
        async with gateway(cfg, clock) as run:
            await wait_until(lambda: run.gw.stats.telemetry_stored >= 2, 30, "stored telemetry")
            assert run.gw.mqtt is not None and not run.gw.mqtt.connected.is_set()
            stats = await run.finish()
    assert stats.broker_failures >= 1 and stats.broker_connects == 0
    assert stats.poll_errors == 0 and stats.telemetry_stored >= 2
    refused = [r for r in caplog.records if "cannot connect" in r.getMessage()
               and r.levelname == "ERROR"]
    assert len(refused) == 1, "one clear error line, not one per retry"
    assert "Not authorized" in refused[0].getMessage()
    assert "broker.username" in refused[0].getMessage()


async def test_device_fault_is_counted_and_the_loop_carries_on(home: Home, mosquitto: Any,
                                                               tmp_path: Path) -> None:
    clock, sim = home
    cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"),
                      control={"read_timeout_s": 0.3})
    async with gateway(cfg, clock) as run:
        await wait_until(lambda: run.gw.stats.cycles >= 3, 20, "cycles")
        sim.faults["inverter"].timeout(duration_s=20.0)
        await wait_until(lambda: run.gw.stats.poll_errors >= 2, 20, "inverter read errors")
        assert run.gw.slots["inverter"].failing
        await wait_until(lambda: not run.gw.slots["inverter"].failing and run.gw.live is not None
                         and run.gw.live.inverter is not None, 30, "inverter back")
        assert run.gw.live is not None and run.gw.live.meter is not None
        assert run.gw.stats.cycles > 5
        stats = await run.finish()
    assert stats.poll_errors >= 2 and stats.task_restarts == 0


async def test_full_disk_is_reported_buffered_and_recovered(home: Home, mosquitto: Any,
                                                            tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    clock, sim = home
    cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"),
                      store={"telemetry_interval_s": 2.0, "commit_interval_s": 2.0})
    async with Collector(mosquitto.port, topics=(f"{T}/telemetry",), client_id="c4") as col, \
            gateway(cfg, clock) as run:
        gw = run.gw
        await wait_until(lambda: gw.stats.telemetry_stored >= 2, 20, "stored telemetry")

        def fill() -> None:  # the disk is full: no page may be added
            assert gw.store is not None
            pages = gw.store.db.execute("PRAGMA page_count").fetchone()[0]
            gw.store.db.execute(f"PRAGMA max_page_count={pages}")

        await gw._in_db(fill)
        await wait_until(lambda: gw.stats.store_errors >= 3, 30, "failed commits")
        produced = gw.stats.telemetry_produced
        assert len(gw.pending.telemetry) >= 1  # kept in memory, not dropped
        assert gw.stats.cycles > 0 and not run.task.done()

        def free() -> None:
            assert gw.store is not None
            gw.store.db.execute("PRAGMA max_page_count=1073741823")

        await gw._in_db(free)
        await wait_until(lambda: gw.stats.telemetry_stored >= produced, 30, "catch-up commit")
        stats = await run.finish()
    full = [r for r in caplog.records if "disk full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelname == "ERROR"  # one clear line, not one per retry
    assert stats.telemetry_lost == 0 and stats.task_restarts == 0
    s = Store.open(cfg.store.path)
    seqs = [r["seq"] for r in s.telemetry()]
    s.close()
    assert seqs == list(range(1, stats.telemetry_produced + 1))
    assert sorted(set(telemetry_seqs(col))) == seqs  # and all of them were published


async def test_ready_and_watchdog_follow_the_fast_loop(home: Home, mosquitto: Any,
                                                       tmp_path: Path) -> None:
    import socket

    from gateway.sdnotify import Notifier

    clock, sim = home
    cfg = make_config(sim.endpoints, mosquitto.url, str(tmp_path / "g.db"))
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.setblocking(False)
    got: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(srv.recv(4096))

    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    box: list[Gateway] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_gateway(cfg, clock, stop=stop, notifier=notifier,
                                           on_ready=box.append, shutdown_timeout_s=3.0))
    try:
        def pings() -> int:
            drain()
            return got.count(b"WATCHDOG=1")

        await wait_until(lambda: pings() >= 3, 20, "watchdog pings")
        assert b"READY=1\nSTATUS=running" in got
        gw = box[0]

        hung = asyncio.Event()

        async def hang() -> None:  # the fast loop stops completing cycles, the process lives
            hung.set()
            await asyncio.Event().wait()

        gw.cycle = hang  # type: ignore[method-assign]
        await wait_until(hung.is_set, 10, "the loop to hang")
        await asyncio.sleep(0.3)  # pings already in flight
        before = pings()
        cycles = gw.stats.cycles
        # Two watchdog periods later: no ping, though the event loop itself runs on.
        await asyncio.sleep(0.8)
        assert pings() == before and gw.stats.cycles == cycles
        assert gw.mqtt is not None and gw.mqtt.connected.is_set()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        drain()
        srv.close()
    assert b"STOPPING=1\nSTATUS=stopping" in got
