"""Helpers of the DSO tests: a hand-driven clock, an MQTT collector, a bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt


class ManualClock:
    """Domain time that moves only when the test says so (``advance``)."""

    speed = 1.0

    def __init__(self, t: float) -> None:
        self.t = float(t)
        self._waiters: list[asyncio.Event] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        while self.t < t:
            ev = asyncio.Event()
            self._waiters.append(ev)
            await ev.wait()

    async def sleep(self, dt: float) -> None:
        await self.sleep_until(self.t + dt)

    def advance(self, dt: float) -> None:
        self.t += dt
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.set()


async def wait_until(pred: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``pred`` until true; fail naming ``what`` after a generous real-time bound (a hang
    guard, not a speed assertion)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@contextlib.asynccontextmanager
async def collect(host: str, port: int, *topics: str) -> AsyncIterator[list[Msg]]:
    """Subscribe (QoS 1) and gather messages in the background into the yielded list."""
    got: list[Msg] = []
    async with aiomqtt.Client(host, port, identifier=f"test-sub-{id(got)}") as client:
        for t in topics:
            await client.subscribe(t, qos=1)

        async def pump() -> None:
            async for m in client.messages:
                raw = m.payload
                got.append(Msg(str(m.topic), raw if isinstance(raw, bytes) else
                               str(raw).encode(), bool(m.retain)))

        task = asyncio.create_task(pump())
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def publish(host: str, port: int, topic: str, payload: bytes | str) -> None:
    """One QoS-1 message from a separate client."""
    async with aiomqtt.Client(host, port, identifier=f"test-pub-{time.monotonic_ns()}") as c:
        await c.publish(topic, payload, qos=1)
