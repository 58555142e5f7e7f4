"""An external PV forecast over MQTT (retained ``hems/v1/<site>/forecast/pv``) reaches the plan;
bad ones are refused with their reason, counted, and change nothing. A real Mosquitto, the
gateway's real MQTT session, a real SQLite store and real cvxpy solves.

Also: which external forecast wins when a file and an MQTT one are both at hand (the newest
usable), and that an expired one is passed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from gateway.daemon import Gateway
from gateway.forecast.pv import ExternalForecast, clear_sky_grid
from gateway.forecast.solar import PvArray
from gateway.mqtt import MqttSession
from gateway.optimize.inputs import NO_BATTERY, StepLimits
from gateway.planner import PlanJob, Planner, compute_plan

from .helpers import (
    DAY,
    STEP,
    T0,
    ManualClock,
    planner_config,
    seed_history,
    site_state,
    wait_until,
)

Mosquitto = Any  # tests/conftest.py fixture type
SITE = "home-1"
TOPIC = f"hems/v1/{SITE}/forecast/pv"
RESULT = f"hems/v1/{SITE}/cmd_result/forecast_pv"
PV = {"lat": 36.0, "lon": -80.0, "pv_kwp": 4.0}  # Greensboro: the afternoon of T0 is daylight
ARRAY = PvArray(lat=36.0, lon=-80.0, kwp=4.0)
START = T0 - T0 % STEP
N = 96
COVERED = 60  # the forecast below covers the first 60 of the 96 steps


def step_shaped(values: np.ndarray, start: float = START) -> list[list[float]]:
    """Points holding ``values[k]`` flat over step ``k`` (one at its start, one 1 s before its
    end), so the planner's slot mean of the interpolated series is exactly ``values[k]``."""
    pts: list[list[float]] = []
    for k, v in enumerate(values):
        pts += [[start + k * STEP, float(v)], [start + (k + 1) * STEP - 1, float(v)]]
    return pts


def published_values(scale: float = 0.5) -> np.ndarray:
    # Half the array's clear-sky output: under the forecaster's physical bound (1.15 x clear
    # sky), so the plan must take these values unchanged.
    return np.round(scale * clear_sky_grid(START, COVERED, STEP, ARRAY), 1)


def forecast_doc(values: np.ndarray, issued: float = T0 - 600, fid: str = "f-1",
                 **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "site": SITE, "issued": issued, "id": fid,
                         "source": "test-service", "points": step_shaped(values)}
    d.update(over)
    return d


@dataclass
class Rig:
    gw: Gateway
    planner: Planner
    session: MqttSession
    client: aiomqtt.Client
    replies: asyncio.Queue[dict[str, Any]]

    async def publish(self, payload: bytes | dict[str, Any], retain: bool = True) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(TOPIC, raw, qos=1, retain=retain)

    async def reply(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.replies.get(), 10)

    async def plan_pv(self) -> np.ndarray:
        assert await self.planner.plan_once(self.gw)
        assert self.planner.last is not None
        return self.planner.last.inputs.pv_w


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, broker: Mosquitto,
              retained_first: bytes | None = None) -> AsyncIterator[Rig]:
    db = str(tmp_path / "gw.db")
    seed_history(db, T0 - 7 * DAY, T0)
    gw = Gateway(planner_config(db, broker.url, **PV), ManualClock(T0))
    await gw.open()
    gw.live = site_state(T0, 1500.0)
    planner = gw.planner = Planner(gw.cfg)
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="test-forecaster",
                              timeout=5) as client:
        if retained_first is not None:  # there before the gateway connects
            await client.publish(TOPIC, retained_first, qos=1, retain=True)
        await client.subscribe(RESULT, qos=1)

        async def collect() -> None:
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                await replies.put(json.loads(m.payload))

        async def quiet() -> None:
            await asyncio.sleep(3600)  # no state publications needed here

        session = MqttSession(gw.cfg.broker, gw.cfg.mqtt, gw.topics, gw, gw.on_command,
                              lambda: None, quiet, now=gw.clock.now)
        gw.mqtt = session
        tasks = [asyncio.create_task(collect()), asyncio.create_task(session.run())]
        try:
            await wait_until(lambda: session.connected.is_set(), 10, "the gateway connects")
            yield Rig(gw, planner, session, client, replies)
        finally:
            await session.close(drain_timeout_s=1.0)
            await asyncio.wait_for(session.wait_closed(), 10)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(TOPIC, b"", qos=1, retain=True)  # leave no retained doc
            gw.close()


async def test_a_retained_forecast_reaches_the_plan_on_the_steps_it_covers(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    vals = published_values()
    # Published (retained) before the gateway connects: it arrives at subscribe.
    async with rig(tmp_path, mosquitto, json.dumps(forecast_doc(vals)).encode()) as r:
        reply = await r.reply()
        assert reply == {"v": 1, "site": SITE, "id": "f-1", "command": "forecast_pv",
                         "status": "applied", "reason": None, "ts": T0}
        inbox = r.session.pv_forecast
        assert inbox.current is not None and inbox.stats.accepted == 1
        pv = await r.plan_pv()
        assert r.planner.stats.pv_external == "mqtt"
        assert r.planner.stats.pv_source == "external+model"
        np.testing.assert_allclose(pv[:COVERED], vals, atol=1e-6)
        # The own forecast beyond what the service covers:
        r.gw.mqtt = None
        own = await r.plan_pv()
        assert r.planner.stats.pv_external == "" and r.planner.stats.pv_source == "model"
        np.testing.assert_allclose(pv[COVERED:], own[COVERED:], atol=1e-6)
        assert np.abs(own[:COVERED] - vals).max() > 100.0  # the published values did matter
        r.gw.mqtt = r.session

        # A newer forecast replaces it; the plan follows.
        vals2 = published_values(0.25)
        await r.publish(forecast_doc(vals2, issued=T0 - 60, fid="f-2"))
        assert (await r.reply())["status"] == "applied"
        pv2 = await r.plan_pv()
        np.testing.assert_allclose(pv2[:COVERED], vals2, atol=1e-6)

        # Deleting the retained message withdraws it: the own forecast again (no reply).
        await r.publish(b"")
        await wait_until(lambda: inbox.current is None, 10, "the withdrawal")
        assert inbox.stats.withdrawn == 1
        np.testing.assert_allclose(await r.plan_pv(), own, atol=1e-6)


def bad_payloads(vals: np.ndarray) -> list[tuple[str, bytes]]:
    """(code, payload): one of every class the gateway refuses."""
    good = forecast_doc(vals, issued=T0 - 300, fid="bad")

    def d(**over: Any) -> bytes:
        return json.dumps({**good, **over}).encode()

    pts = good["points"]

    def raw_watts(text: bytes) -> bytes:  # a third point whose watts are ``text`` verbatim
        return d(points=[*pts[:2], [START + 3 * STEP, 0.123456789]]).replace(b"0.123456789", text)

    return [
        ("oversize", b"[" + b"0," * 70000 + b"0]"),
        ("json", b"{this is not json"),
        ("schema", d(v=2)),
        ("schema", d(watts=[1, 2])),
        ("site", d(site="home-2")),
        ("non_finite", raw_watts(b"NaN")),
        ("non_finite", raw_watts(b"1e400")),  # valid JSON, but beyond the float range
        ("negative", d(points=[*pts[:2], [START + 3 * STEP, -50.0]])),
        ("absurd", d(points=[*pts[:2], [START + 3 * STEP, 5e9]])),
        ("unsorted", d(points=[pts[1], pts[0], *pts[2:]])),
        ("duplicate", d(points=[pts[0], pts[0], *pts[2:]])),
        ("too_few", d(points=pts[:1])),
        ("too_many", d(points=[[START + k, 100.0] for k in range(5000)])),
        ("span", d(points=[*pts, [START + 10 * DAY, 0.0]])),
        ("stale", d(issued=T0 - 13 * 3600)),
        ("future", d(issued=T0 + 2 * 3600)),
        ("expired", d(points=[[T0 - 7200, 100.0], [T0 - 3600, 100.0]])),
        ("replay", d(issued=T0 - 3600)),  # older than the one in use
    ]


async def test_bad_forecasts_are_refused_counted_and_the_previous_stays(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    vals = published_values()
    async with rig(tmp_path, mosquitto) as r:
        inbox = r.session.pv_forecast
        await r.publish(forecast_doc(vals, issued=T0 - 1800))
        assert (await r.reply())["status"] == "applied"
        held = inbox.current
        assert held is not None
        counted: dict[str, int] = {}
        for code, payload in bad_payloads(vals):
            await r.publish(payload)
            reply = await r.reply()
            assert reply["status"] == "rejected", (code, reply)
            assert reply["command"] == "forecast_pv" and reply["site"] == SITE
            assert reply["reason"].startswith(f"{code}: "), (code, reply["reason"])
            counted[code] = counted.get(code, 0) + 1
            assert inbox.stats.rejected == counted
            assert inbox.current is held, code  # the previous forecast stays in use
        # The id is echoed when the document could be read, so a client can match replies.
        assert reply["id"] == "bad"
        assert inbox.stats.accepted == 1 and inbox.stats.errors == 0
        assert r.session.stats.connects == 1  # nothing above cost the session its connection
        # And the plan still uses it.
        np.testing.assert_allclose((await r.plan_pv())[:COVERED], vals, atol=1e-6)
        assert r.planner.stats.pv_external == "mqtt"


async def test_a_bad_forecast_before_any_good_one_leaves_the_own_forecast(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    neg = forecast_doc(published_values(), points=[[T0, 5.0], [T0 + 60, -1.0]])
    async with rig(tmp_path, mosquitto, json.dumps(neg).encode()) as r:
        reply = await r.reply()
        assert reply["status"] == "rejected" and reply["reason"].startswith("negative: ")
        assert r.session.pv_forecast.current is None
        await r.plan_pv()
        assert r.planner.stats.pv_external == "" and r.planner.stats.pv_source == "model"


async def test_the_retained_copy_again_is_skipped_silently(tmp_path: Path,
                                                           mosquitto: Mosquitto) -> None:
    raw = json.dumps(forecast_doc(published_values())).encode()
    async with rig(tmp_path, mosquitto) as r:
        await r.publish(raw)
        assert (await r.reply())["status"] == "applied"
        await r.publish(raw)  # what a reconnect's re-delivery looks like
        inbox = r.session.pv_forecast
        await wait_until(lambda: inbox.stats.repeats == 1, 10, "the repeat")
        await r.publish(b"not json")  # the next reply is this one's: the repeat got none
        reply = await r.reply()
        assert reply["status"] == "rejected" and reply["reason"].startswith("json: ")
        assert inbox.stats.accepted == 1 and inbox.stats.rejected == {"json": 1}


# ------------------------------------------------------------------ file vs MQTT (no broker)


def _job(path: str | None, mqtt: ExternalForecast | None) -> PlanJob:
    hist_t = np.arange(T0 - 3 * DAY, T0, 300.0)
    return PlanJob(now=T0, start=START, step_s=STEP, horizon_s=N * STEP, hist_t=hist_t,
                   hist_load=np.full(hist_t.size, 400.0), hist_pv=np.zeros(hist_t.size),
                   import_price=np.full(N, 0.3), export_price=np.full(N, 0.08),
                   battery=NO_BATTERY, limits=StepLimits.unlimited(N), tz=None, array=ARRAY,
                   budget_ms=5000.0, pv_forecast_file=path, pv_mqtt=mqtt)


def _ext(values: np.ndarray, issued: float, start: float = START) -> ExternalForecast:
    pts = np.array(step_shaped(values, start))
    return ExternalForecast(pts[:, 0].copy(), pts[:, 1].copy(), issued)


@pytest.mark.parametrize(("file_age", "mqtt_age", "winner"), [
    (3600.0, 600.0, "mqtt"), (600.0, 3600.0, "file"), (600.0, 600.0, "file")])
def test_the_newest_external_forecast_wins(tmp_path: Path, file_age: float, mqtt_age: float,
                                           winner: str) -> None:
    file_vals, mqtt_vals = published_values(0.3), published_values(0.6)
    f = tmp_path / "pv.json"
    f.write_text(json.dumps({"issued_at": T0 - file_age,
                             "values": step_shaped(file_vals)}))
    res = compute_plan(_job(str(f), _ext(mqtt_vals, T0 - mqtt_age)))
    assert res.pv_external == winner
    want = mqtt_vals if winner == "mqtt" else file_vals
    np.testing.assert_allclose(res.inputs.pv_w[:COVERED], want, atol=1e-6)
    assert any("is newer" in n for n in res.pv_notes)


def test_an_expired_mqtt_forecast_is_passed_over(tmp_path: Path) -> None:
    vals = published_values()
    # Newest, but it ended before the horizon starts: the (older) file plans.
    expired = _ext(vals[:4], T0 - 60, start=START - 6 * STEP)
    f = tmp_path / "pv.json"
    f.write_text(json.dumps({"issued_at": T0 - 3600, "values": step_shaped(vals)}))
    res = compute_plan(_job(str(f), expired))
    assert res.pv_external == "file"
    assert any(n.startswith("mqtt forecast ignored: expired") for n in res.pv_notes)
    np.testing.assert_allclose(res.inputs.pv_w[:COVERED], vals, atol=1e-6)
    # Alone, it leaves the own forecast.
    alone = compute_plan(_job(None, expired))
    own = compute_plan(_job(None, None))
    assert alone.pv_external == "" and alone.pv_source == own.pv_source == "model"
    np.testing.assert_allclose(alone.inputs.pv_w, own.inputs.pv_w)
