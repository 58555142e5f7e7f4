"""Test helpers for the daemon: synthetic device profiles, config builder, MQTT collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np

from firmware_sim.home import StepProfile
from gateway.config import Config, parse_config

START = 1_750_000_000.0  # 2025-06-15 15:06 UTC: daylight, PV producing


def profiles(load_w: float = 600.0, pv_peak_w: float = 4000.0) -> tuple[StepProfile, StepProfile]:
    """Deterministic yearly step profiles (15 min): a wavy load and a clear-sky PV bell."""
    n = 365 * 96
    i = np.arange(n)
    hour = (i * 900 % 86400) / 3600.0
    load = load_w + 0.5 * load_w * np.sin(i * 0.7) ** 2
    pv = np.clip(pv_peak_w * np.sin((hour - 6.0) / 12.0 * np.pi), 0.0, None)
    return StepProfile(load, 900), StepProfile(pv, 900)


def make_config(endpoints: Any, broker_url: str, db_path: str, **sections: dict[str, Any]
                ) -> Config:
    """A validated Config for simulated ``endpoints`` (firmware_sim Endpoint list)."""
    data: dict[str, Any] = {
        "site_id": "home-1",
        "devices": [{"kind": e.kind, "name": e.kind, "host": e.host, "port": e.port,
                     "unit": e.unit, "timeout_s": 1.0} for e in endpoints],
        "broker": {"url": broker_url, "keepalive_s": 5, "connect_timeout_s": 3.0},
        "store": {"path": db_path, "telemetry_interval_s": 10.0, "commit_interval_s": 5.0},
        "mqtt": {"state_interval_s": 5.0},
        "control": {"cycle_s": 1.0, "startup_grace_s": 2.0},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


async def wait_until(pred: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``pred`` until true; fail with ``what`` after a generous real-time bound."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or pred}")
        await asyncio.sleep(0.02)


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Collector:
    """Subscribes (persistent session, QoS 1) and records every message; reconnects."""

    port: int
    topics: tuple[str, ...] = ("hems/#", "homeassistant/#")
    client_id: str = "test-collector"
    persistent: bool = True
    messages: list[Msg] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                          clean_session=not self.persistent,
                                          timeout=3) as c:
                    for t in self.topics:
                        await c.subscribe(t, qos=1)
                    self.connects += 1
                    self.connected.set()
                    async for m in c.messages:
                        p = m.payload
                        raw = p if isinstance(p, bytes) else str(p).encode()
                        self.messages.append(Msg(str(m.topic), raw, bool(m.retain)))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def on(self, topic: str) -> list[Msg]:
        return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> Msg | None:
        ms = self.on(topic)
        return ms[-1] if ms else None


async def publish(port: int, topic: str, payload: bytes | str, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", port, timeout=3) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


async def retained(port: int, topic_filter: str, settle_s: float = 0.3) -> dict[str, bytes]:
    """The retained messages under ``topic_filter`` right now (fresh subscription)."""
    out: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, timeout=3) as c:
        await c.subscribe(topic_filter, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle_s):
                async for m in c.messages:
                    if m.retain:
                        p = m.payload
                        out[str(m.topic)] = p if isinstance(p, bytes) else str(p).encode()
    return out
