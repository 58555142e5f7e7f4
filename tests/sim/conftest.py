"""Shared fixtures for the simulated-device tests.

The profiles here are small stand-ins (one synthetic day, repeated), so that the tests do not
depend on the shipped datasets; the product always loads :mod:`firmware_sim.profiles`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.clock import SimClock
from firmware_sim.home import HomeConfig, StepProfile

#: 2024-06-03 00:00 UTC, a Monday; noon is a good time for PV.
DAY0 = 1717372800.0
NOON = DAY0 + 12 * 3600


class ManualClock:
    """A clock that moves only when told (pure physics tests)."""

    speed = 1.0

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)

    async def sleep(self, dt: float) -> None:
        self.t += max(0.0, dt)


def day_profiles(step_s: int = 60) -> tuple[StepProfile, StepProfile]:
    """A varying synthetic day: load 300..1500 W with an evening peak, PV a bell 06:00-18:00
    peaking at 4000 W (for the default 5 kWp). Values change every step."""
    n = 86400 // step_s
    h = np.arange(n) * step_s / 3600.0
    load = 300 + 500 * (1 + np.sin(2 * math.pi * (h - 13) / 24)) + 200 * ((np.arange(n) % 7) / 7)
    pv = np.clip(np.sin(math.pi * (h - 6) / 12), 0, None) * 4000.0
    return StepProfile(load.astype(np.float32), step_s), StepProfile(pv.astype(np.float32), step_s)


def flat_profiles(load_w: float, pv_w: float) -> tuple[StepProfile, StepProfile]:
    """Constant load and PV (W): values that stay still while the clock runs fast."""
    return (
        StepProfile(np.full(1440, load_w, dtype=np.float32), 60),
        StepProfile(np.full(1440, pv_w, dtype=np.float32), 60),
    )


@pytest.fixture
def fast_clock() -> SimClock:
    """Domain time at noon, 600x faster than real time."""
    return SimClock(NOON, speed=600.0)


@pytest.fixture
def config() -> HomeConfig:
    return HomeConfig()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., object]]:
    """Connect plain pymodbus clients to endpoints; closes them at the end."""
    clients: list[AsyncModbusTcpClient] = []

    async def connect(ep: object, io_timeout: float = 1.0, retries: int = 0
                      ) -> AsyncModbusTcpClient:
        # reconnect_delay=0: no automatic reconnect, so a dropped connection stays visible
        c = AsyncModbusTcpClient(
            ep.host, port=ep.port, timeout=io_timeout, retries=retries,  # type: ignore[attr-defined]
            reconnect_delay=0,
        )
        assert await c.connect(), f"cannot connect to {ep}"
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()
