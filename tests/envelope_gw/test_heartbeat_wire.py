"""The DSO heartbeat on the wire and in the config: the publisher's signed, non-retained
heartbeats through a real Mosquitto reach a real agent; ``[envelope] dso_heartbeat_timeout_s``
parses, defaults to off and names itself when wrong."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dso.helpers import ManualClock, collect, wait_until

from community.dso import DsoPublisher, DsoTopics, SiteSchedule, dso_main, validate_payload
from gateway.config import ConfigError, parse_config
from gateway.envelope import DefaultControl
from gateway.envelope_agent import AgentSettings, EnvelopeAgent, agent_settings
from gateway.signing import public_key_to_b64, verify

T0 = 1_782_000_000.0
KEY = Ed25519PrivateKey.generate()
B64 = public_key_to_b64(KEY.public_key())
BASE: dict[str, Any] = {"site_id": "s1", "devices": [], "broker": {"url": "mqtt://127.0.0.1"}}


def _sites(*names: str) -> list[SiteSchedule]:
    return [SiteSchedule(n, DefaultControl(id=f"{n}-d", site=n, created=T0 - 100,
                                           export_w=5000.0), ()) for n in names]


# ---------------------------------------------------------------- config


def test_heartbeat_timeout_defaults_off_and_parses() -> None:
    env = parse_config({**BASE, "envelope": {"dso_public_key": B64}}).envelope
    assert env is not None and env.dso_heartbeat_timeout_s == 0.0
    assert agent_settings(env).dso_heartbeat_timeout_s == 0.0
    env = parse_config({**BASE, "envelope": {"dso_public_key": B64,
                                             "dso_heartbeat_timeout_s": 300}}).envelope
    assert env is not None and env.dso_heartbeat_timeout_s == 300.0
    assert agent_settings(env).dso_heartbeat_timeout_s == 300.0


@pytest.mark.parametrize(("table", "problem"), [
    ({"dso_heartbeat_timeout_s": 5}, "must be 0 \\(off\\) or between 10 and 86400 s, got 5"),
    ({"dso_heartbeat_timeout_s": -1}, "got -1"),
    ({"dso_heartbeat_timeout_s": 1e9}, "got 1e\\+09"),
    ({"dso_heartbeat_timeout_s": "300"}, "must be a number"),
    ({"dso_heartbeat_timeout_s": 300, "contact_timeout_s": 0}, "needs contact_timeout_s > 0"),
])
def test_bad_heartbeat_timeouts_name_the_key(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as e:
        parse_config({**BASE, "envelope": {"dso_public_key": B64, **table}})
    assert e.value.key == "envelope.dso_heartbeat_timeout_s"


# ---------------------------------------------------------------- publisher -> broker -> agent


async def test_publisher_heartbeats_are_signed_not_retained_and_reach_the_agent(
        mosquitto: Any) -> None:
    clock = ManualClock(T0)
    pub = DsoPublisher(mosquitto.url, KEY, clock, _sites("home-a", "home-b"), heartbeat_s=30.0,
                       min_backoff_s=0.05, max_backoff_s=0.3, timeout_s=3.0)
    agent = EnvelopeAgent("home-a", AgentSettings(public_key=KEY.public_key(),
                                                  contact_timeout_s=600.0,
                                                  dso_heartbeat_timeout_s=90.0))
    ta, tb = DsoTopics("home-a"), DsoTopics("home-b")
    stop = asyncio.Event()
    async with collect(mosquitto.host, mosquitto.port, ta.heartbeat, tb.heartbeat) as got:
        task = asyncio.create_task(pub.run(stop))
        try:
            await wait_until(lambda: len(got) >= 2, "a heartbeat per site on connection")
            clock.advance(29.0)  # not yet due
            await asyncio.sleep(0.3)
            assert len(got) == 2
            clock.advance(1.0)
            await wait_until(lambda: len(got) >= 4, "the next heartbeats after heartbeat_s")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert sorted(m.topic for m in got) == sorted([ta.heartbeat, tb.heartbeat] * 2)
    assert not any(m.retain for m in got) and pub.stats.heartbeats == 4
    for m in got:
        msg = m.json()
        assert validate_payload("dso_heartbeat", msg) == []
        body = verify(msg, KEY.public_key())
        assert body["site"] == m.topic.split("/")[2] and set(body) == {"v", "site", "issued"}
    a_issued = [m.json()["issued"] for m in got if m.topic == ta.heartbeat]
    assert a_issued[0] >= T0 and a_issued[1] >= T0 + 30.0
    # Fed to the gateway's agent (as the MQTT session would): accepted, contact kept.
    for m in got:
        if agent.wants(m.topic):
            agent.on_message(m.topic, m.payload, clock.now())
    assert agent.stats.heartbeats == 2 and not agent.stats.rejected
    assert agent.dso_seen == a_issued[1]
    # Nothing retained: a gateway (re)connecting now is handed no old heartbeat.
    async with collect(mosquitto.host, mosquitto.port, ta.heartbeat) as late:
        await asyncio.sleep(0.3)
    assert late == []


async def test_heartbeat_off_publishes_none(mosquitto: Any) -> None:
    clock = ManualClock(T0)
    pub = DsoPublisher(mosquitto.url, KEY, clock, _sites("home-a"), heartbeat_s=0.0,
                       min_backoff_s=0.05, max_backoff_s=0.3, timeout_s=3.0)
    stop = asyncio.Event()
    async with collect(mosquitto.host, mosquitto.port, DsoTopics("home-a").heartbeat,
                       DsoTopics("home-a").default) as got:
        task = asyncio.create_task(pub.run(stop))
        try:
            await wait_until(lambda: len(got) >= 1, "the retained default")
            clock.advance(600.0)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert [m.topic for m in got] == [DsoTopics("home-a").default]
    assert pub.stats.heartbeats == 0
    with pytest.raises(ValueError, match="heartbeat_s"):
        DsoPublisher(mosquitto.url, KEY, clock, [], heartbeat_s=-1.0)


def test_cli_refuses_a_negative_heartbeat(capsys: pytest.CaptureFixture[str]) -> None:
    code = dso_main(["--schedule", "s.toml", "--key", "k", "--heartbeat", "-5"])
    assert code == 2 and "--heartbeat must be 0 (off)" in capsys.readouterr().err
