"""The DSO publisher against a real Mosquitto: retained signed documents per site, re-publication,
acks, reconnection, the ``hems dso`` service over a schedule file, and one-off publication."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from community.dso import (
    DsoConfig,
    DsoPublisher,
    DsoTopics,
    SiteSchedule,
    dso_main,
    publish_once,
    run_dso,
    validate_payload,
)
from community.scenarios import stress_day
from gateway.envelope import Control, Schedule, parse_control, parse_default
from gateway.signing import SignatureInvalid, generate_keypair, load_private_key, verify

from .helpers import ManualClock, Msg, collect, publish, wait_until

Mosquitto = Any  # tests/conftest.py fixture type (conftest is not importable as a package)
DAY = 1_782_000_000.0  # 2026-06-21 00:00 UTC
KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def last(msgs: Sequence[Msg], topic: str) -> dict[str, Any]:
    got = [m for m in msgs if m.topic == topic]
    assert got, f"nothing on {topic}"
    out: dict[str, Any] = got[-1].json()
    return out


@contextlib.asynccontextmanager
async def running(pub: DsoPublisher) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    try:
        await wait_until(pub.connected.is_set, "the DSO to connect and publish")
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def publisher(broker: Mosquitto, clock: ManualClock, *sites: SiteSchedule, **kw: Any
              ) -> DsoPublisher:
    return DsoPublisher(broker.url, KEY, clock, sites, min_backoff_s=0.05, max_backoff_s=0.3,
                        timeout_s=3.0, **kw)


async def test_each_site_gets_its_own_retained_signed_documents(mosquitto: Mosquitto) -> None:
    clock = ManualClock(DAY + 60)
    a, b = stress_day("home-a", DAY), stress_day("home-b", DAY, default_export_w=3000)
    pub = publisher(mosquitto, clock, a.schedule(), b.schedule())
    # A gateway connecting afterwards sees retained messages for its own site only.
    async with running(pub), collect(mosquitto.host, mosquitto.port,
                                     "hems/v1/home-a/dso/#") as got:
        await wait_until(lambda: len(got) >= 2, "retained controls + default of home-a")
        await asyncio.sleep(0.2)  # anything else that was going to arrive
    t = DsoTopics("home-a")
    assert sorted(m.topic for m in got) == sorted([t.controls, t.default])
    assert all(m.retain for m in got)
    ctl_msg, dflt_msg = last(got, t.controls), last(got, t.default)
    assert validate_payload("dso_controls", ctl_msg) == []
    assert validate_payload("dso_default", dflt_msg) == []
    body = verify(ctl_msg, PUB)
    assert body["site"] == "home-a" and body["v"] == 1
    now = clock.now()
    controls = [parse_control(c, "home-a", now) for c in body["controls"]]
    assert controls == list(a.controls)
    default = parse_default(verify(dflt_msg, PUB)["default"], "home-a", now)
    assert default == a.default and default.export_w == 5000
    # Held by a gateway's schedule, they resolve to the scenario's limits.
    s = Schedule("home-a")
    s.set_default(default)
    for c in controls:
        s.add(c)
    assert s.active(DAY + 13.2 * 3600).limits.export_w == 0.0
    # Tampering with any byte that matters breaks the signature.
    for tamper in ({"site": "home-b"}, {"issued": ctl_msg["issued"] + 1},
                   {"controls": [{**body["controls"][0], "export_w": 15000.0}]},
                   {"controls": body["controls"][1:]}):
        with pytest.raises(SignatureInvalid):
            verify({**ctl_msg, **tamper}, PUB)
    with pytest.raises(SignatureInvalid):
        verify(ctl_msg, Ed25519PrivateKey.generate().public_key())


async def test_changes_and_expiry_republish_with_a_larger_issued(mosquitto: Mosquitto) -> None:
    clock = ManualClock(DAY + 60)
    day = stress_day("home-a", DAY)
    pub = publisher(mosquitto, clock, day.schedule())
    t = DsoTopics("home-a")
    async with collect(mosquitto.host, mosquitto.port, t.controls) as got, running(pub):
        await wait_until(lambda: len(got) >= 1, "the first controls list")
        first = got[-1].json()
        # A new control (the DSO cancels the zero-export window by a newer overlapping one).
        relief = Control("relief", "home-a", clock.now(), DAY + 13 * 3600, 1800.0,
                         export_w=4000.0)
        pub.add_control(relief)
        await wait_until(lambda: len(got) >= 2, "the re-publication after a change")
        second = got[-1].json()
        assert second["issued"] > first["issued"]
        assert [c["id"] for c in verify(second, PUB)["controls"]] == [
            "home-a-midday-export-1500", "home-a-export-zero", "relief",
            "home-a-evening-import-2500"]
        # Time passes beyond the end of the midday window: it drops out of the list.
        clock.advance(DAY + 13 * 3600 + 1 - clock.now())
        await wait_until(lambda: len(got) >= 3, "the re-publication after an expiry")
        third = got[-1].json()
        assert third["issued"] > second["issued"] >= DAY + 60
        ids = [c["id"] for c in verify(third, PUB)["controls"]]
        assert "home-a-midday-export-1500" not in ids and "relief" in ids
        for c in verify(third, PUB)["controls"]:
            parse_control(c, "home-a", clock.now())
        # No change: no new document.
        clock.advance(1.0)
        await asyncio.sleep(0.2)
        assert len(got) == 3
    assert pub.stats.documents == 4  # three controls lists + one default


async def test_what_a_gateway_would_refuse_now_is_withheld_until_acceptable(
        mosquitto: Mosquitto) -> None:
    clock = ManualClock(DAY)
    early = Control("early", "home-a", DAY + 400, DAY + 3600, 60.0, export_w=1.0)  # created ahead
    ok = Control("ok", "home-a", DAY, DAY + 3600, 60.0, import_w=1.0)
    pub = publisher(mosquitto, clock, SiteSchedule("home-a", None, (ok, early)))
    t = DsoTopics("home-a")
    async with collect(mosquitto.host, mosquitto.port, t.controls) as got, running(pub):
        await wait_until(lambda: len(got) >= 1, "the first list")
        assert [c["id"] for c in verify(got[-1].json(), PUB)["controls"]] == ["ok"]
        assert pub.stats.skipped == 1
        clock.advance(100.0)  # "early" is now within the gateways' 300 s clock-skew allowance
        await wait_until(lambda: len(got) >= 2, "the list with the withheld control")
        body = verify(got[-1].json(), PUB)
    assert [c["id"] for c in body["controls"]] == ["ok", "early"]
    parse_control(body["controls"][1], "home-a", clock.now())
    assert pub.published("home-a")[1] is None  # no default: nothing on the default topic


async def test_acks_are_recorded_and_malformed_ones_counted(mosquitto: Mosquitto,
                                                            tmp_path: Path) -> None:
    clock = ManualClock(DAY + 60)
    day = stress_day("home-a", DAY)
    db = tmp_path / "acks.db"
    pub = publisher(mosquitto, clock, day.schedule(), ack_db=db)
    topic = DsoTopics("home-a").ack
    cid = day.controls[0].id

    def ack(**kw: Any) -> str:
        return json.dumps({"v": 1, "site": "home-a", "control_id": cid, "status": "received",
                           "t": DAY + 61, **kw})

    async with running(pub):
        for bad in (b"\xff", "not json", "[]", ack(status="maybe"), ack(site="home-b"),
                    ack(t=float("nan")).replace("NaN", '"NaN"'), ack(v=2), ""):
            await publish(mosquitto.host, mosquitto.port, topic, bad)
        await publish(mosquitto.host, mosquitto.port, topic, ack())
        await publish(mosquitto.host, mosquitto.port, topic, ack(status="started", t=DAY + 39600))
        await publish(mosquitto.host, mosquitto.port, topic,
                      ack(control_id="never-sent", status="rejected", reason="expired"))
        await publish(mosquitto.host, mosquitto.port, "hems/v1/home-b/dso/ack", ack(site="home-b"))
        await wait_until(lambda: pub.acks.total >= 3, "three valid acks")
        assert pub.acks.malformed == 8
        # Still publishing after all that.
        pub.add_control(Control("later", "home-a", clock.now(), DAY + 20 * 3600, 60.0,
                                load_w=0.0))
        await wait_until(lambda: pub.stats.documents >= 3, "a publication after bad acks")
        # A site added while running is published and its acks are heard.
        pub.set_schedule(stress_day("home-n", DAY).schedule())
        await wait_until(lambda: pub.published("home-n")[1] is not None, "home-n's documents")
        await publish(mosquitto.host, mosquitto.port, DsoTopics("home-n").ack,
                      ack(site="home-n", control_id="home-n-default", status="completed"))
        await wait_until(lambda: pub.acks.total >= 4, "home-n's ack")
    assert pub.acks.status("home-n", "home-n-default") == {"completed": DAY + 61}
    assert pub.acks.counts == {"received": 1, "started": 1, "rejected": 1, "completed": 1}
    assert pub.acks.unknown_control == 1  # "never-sent"
    assert pub.acks.status("home-a", cid) == {"received": DAY + 61, "started": DAY + 39600}
    assert [a.received for a in pub.acks.recent] == [DAY + 60] * 4
    rows = list(sqlite_utils.Database(db)["dso_acks"].rows)
    assert [(r["control_id"], r["status"]) for r in rows] == [
        (cid, "received"), (cid, "started"), ("never-sent", "rejected"),
        ("home-n-default", "completed")]
    assert rows[2]["reason"] == "expired"


async def test_broker_restart_reconnects_and_republishes(mosquitto: Mosquitto) -> None:
    clock = ManualClock(DAY + 60)
    pub = publisher(mosquitto, clock, stress_day("home-a", DAY).schedule())
    t = DsoTopics("home-a")
    async with running(pub):
        async with collect(mosquitto.host, mosquitto.port, t.controls) as got:
            await wait_until(lambda: len(got) >= 1, "the retained list")
        before = got[-1].json()
        mosquitto.kill()  # SIGKILL: the broker loses its retained messages
        await wait_until(lambda: not pub.connected.is_set(), "the DSO to notice")
        clock.advance(60.0)  # nothing changes in the schedule while away
        await asyncio.sleep(0.5)  # a few failed reconnection attempts
        mosquitto.start()
        await wait_until(lambda: pub.stats.connects >= 2, "the DSO to reconnect", 15.0)
        await wait_until(pub.connected.is_set, "the re-publication")
        async with collect(mosquitto.host, mosquitto.port, "hems/v1/home-a/dso/#") as again:
            await wait_until(lambda: len(again) >= 2, "retained messages after the restart")
    after = last(again, t.controls)
    assert after == before  # the same signed document, re-sent
    assert verify(last(again, t.default), PUB)["default"]["export_w"] == 5000
    assert pub.stats.disconnects == 1 and pub.stats.connect_failures >= 1


SCHEDULE = """
start = 2026-06-21T00:00:00Z
[sites.home-a.default]
export_w = 5000
[[sites.home-a.controls]]
id = "midday"
offset = "11:00"
duration = "2h"
export_w = 1500
"""


async def test_the_service_reloads_its_schedule_file(mosquitto: Mosquitto,
                                                     tmp_path: Path) -> None:
    priv, pubkey_path = generate_keypair(tmp_path)
    sched = tmp_path / "schedule.toml"
    sched.write_text(SCHEDULE)
    clock = ManualClock(DAY + 60)
    cfg = DsoConfig(str(sched), str(priv), mosquitto.url, reload_interval_s=0.05)
    stop = asyncio.Event()
    t = DsoTopics("home-a")
    key = load_private_key(priv).public_key()
    async with collect(mosquitto.host, mosquitto.port, t.controls) as got:
        task = asyncio.create_task(run_dso(cfg, stop, clock))
        try:
            await wait_until(lambda: len(got) >= 1, "the first list")
            first = verify(got[-1].json(), key)
            assert [(c["id"], c["export_w"]) for c in first["controls"]] == [("midday", 1500.0)]
            sched.write_text(SCHEDULE.replace("1500", "1000") + "extra = 1\n")  # bad edit
            await asyncio.sleep(0.3)
            sched.write_text(SCHEDULE.replace("1500", "1000"))
            await wait_until(lambda: len(got) >= 2, "the list after the edit")
            second = verify(got[-1].json(), key)
        finally:
            stop.set()
            pub = await asyncio.wait_for(task, 10)
    assert len(got) == 2  # the bad edit published nothing
    assert second["issued"] > first["issued"]
    assert second["controls"][0]["export_w"] == 1000.0
    assert second["controls"][0]["created"] > first["controls"][0]["created"]
    assert pub.stats.reload_errors == 1 and pub.stats.reloads == 1
    assert pubkey_path.exists()


async def test_publish_once_adds_to_the_retained_list(mosquitto: Mosquitto) -> None:
    clock = ManualClock(DAY + 60)
    day = stress_day("home-a", DAY)
    pub = publisher(mosquitto, clock, day.schedule())
    async with running(pub):
        pass  # leaves the retained list of the stress day behind
    extra = Control("oneoff", "home-a", DAY + 100, DAY + 3600, 600.0, export_w=2000.0)
    clock.advance(100)
    sent = await publish_once(mosquitto.url, KEY, "home-a", control=extra, clock=clock,
                              retained_wait_s=0.5)
    assert len(sent) == 1
    body = verify(sent[0], PUB)
    assert body["issued"] > pub.published("home-a")[0]["issued"]  # type: ignore[index]
    assert [c["id"] for c in body["controls"]] == [
        "oneoff", *[c.id for c in day.controls]]
    async with collect(mosquitto.host, mosquitto.port, DsoTopics("home-a").controls) as got:
        await wait_until(lambda: len(got) >= 1, "the retained merged list")
    assert got[-1].json() == sent[0]


async def test_cli_keygen_and_publish(mosquitto: Mosquitto, tmp_path: Path) -> None:
    assert await asyncio.to_thread(dso_main, ["keygen", "--dir", str(tmp_path)]) == 0
    key = load_private_key(tmp_path / "dso.key").public_key()
    args = ["publish", "--site", "home-c", "--key", str(tmp_path / "dso.key"), "--broker",
            mosquitto.url, "--export-w", "1500", "--start", "+10m", "--duration", "01:30",
            "--id", "cli-test"]
    assert await asyncio.to_thread(dso_main, args) == 0
    assert await asyncio.to_thread(dso_main, [*args[:7], "--default", "--import-w",
                                              "9000"]) == 0
    async with collect(mosquitto.host, mosquitto.port, "hems/v1/home-c/dso/#") as got:
        await wait_until(lambda: len(got) >= 2, "both retained messages")
    ctl = verify(last(got, DsoTopics("home-c").controls), key)["controls"]
    assert [(c["id"], c["export_w"], c["duration_s"]) for c in ctl] == [
        ("cli-test", 1500.0, 5400.0)]
    assert ctl[0]["start"] - ctl[0]["created"] == pytest.approx(600, abs=1)
    dflt = verify(last(got, DsoTopics("home-c").default), key)["default"]
    assert dflt["import_w"] == 9000.0 and "export_w" not in dflt
    # Bad input: one clear error, exit code 2, nothing published.
    bad = await asyncio.to_thread(dso_main, [*args[:7], "--export-w", "-5"])
    assert bad == 2
