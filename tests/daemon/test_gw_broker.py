"""The demo's local broker: Mosquitto when present, else embedded amqtt (MQTT 3.1.1 only).

The same gateway session (discovery, retained state, store-and-forward, commands) runs against
whichever it gets; the amqtt case runs only where the ``amqtt`` package is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivers.clock import SimClock
from firmware_sim.home import HomeConfig
from firmware_sim.server import run_home
from gateway.broker import BrokerUnavailable, amqtt_available, find_mosquitto, local_broker
from gateway.daemon import run_gateway

from .daemon_helpers import START, Collector, make_config, profiles, publish, wait_until

T = "hems/v1/home-1"


@pytest.mark.parametrize("kind", [
    pytest.param("mosquitto", marks=pytest.mark.skipif(find_mosquitto() is None,
                                                       reason="mosquitto not installed")),
    pytest.param("amqtt", marks=pytest.mark.skipif(not amqtt_available(),
                                                   reason="amqtt not installed")),
])
async def test_gateway_works_on_the_local_broker(kind: str, tmp_path: Path) -> None:
    import asyncio

    clock = SimClock(start=START, speed=20.0)
    load, pv = profiles()
    async with local_broker(prefer=kind) as broker, \
            run_home(clock, HomeConfig(), load=load, pv=pv) as sim:
        assert broker.kind == kind
        cfg = make_config(sim.endpoints, broker.url, str(tmp_path / "g.db"),
                          store={"telemetry_interval_s": 5.0, "commit_interval_s": 5.0})
        stop = asyncio.Event()
        async with Collector(broker.port, client_id=f"w-{kind}", persistent=False) as col:
            task = asyncio.create_task(run_gateway(cfg, clock, stop=stop))
            await wait_until(lambda: len(col.on(f"{T}/telemetry")) >= 3, 30, "telemetry")
            await publish(broker.port, f"{T}/cmd/reserve", json.dumps({"soc_pct": 20}))
            await wait_until(lambda: bool(col.on(f"{T}/cmd_result/reserve")), 10, "result")
            stop.set()
            stats = await asyncio.wait_for(task, 30)
            await wait_until(lambda: (m := col.last(f"{T}/availability")) is not None
                             and m.payload == b"offline", 10, "offline")
    assert col.on(f"{T}/cmd_result/reserve")[-1].json()["status"] == "applied"
    assert any(m.topic.startswith("homeassistant/") for m in col.messages)
    seqs = [m.json()["seq"] for m in col.on(f"{T}/telemetry")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert stats.telemetry_lost == 0


async def test_no_broker_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.broker as b

    monkeypatch.setattr(b, "find_mosquitto", lambda: None)
    monkeypatch.setattr(b, "amqtt_available", lambda: False)
    with pytest.raises(BrokerUnavailable, match="apt-get install mosquitto"):
        async with local_broker():
            pass
