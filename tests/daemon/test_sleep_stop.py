"""The fast loop's sleep: woken at once by ``stop``, and nobody else's cancellation swallowed.

``Gateway._sleep_until`` runs the clock's sleep in the caller's task and a single watcher of
``stop`` cancels the sleepers it finds (no tasks per wait: every cycle of every home sleeps
there); the cancellation it made is taken back, any other goes on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from drivers.clock import SimClock
from gateway.daemon import Gateway

from .daemon_helpers import START, make_config


def _gateway(tmp_path: Path, name: str) -> Gateway:
    cfg = make_config([], "mqtt://127.0.0.1:1", str(tmp_path / f"{name}.db"))
    return Gateway(cfg, SimClock(START, 1.0), devices={})


async def test_stop_wakes_every_sleeper_at_once(tmp_path: Path) -> None:
    gw = _gateway(tmp_path, "a")
    try:
        sleepers = [asyncio.create_task(gw._sleep_until(START + h * 3600.0)) for h in (1, 2)]
        await asyncio.sleep(0.05)
        assert not any(s.done() for s in sleepers)
        gw.stop.set()
        await asyncio.wait_for(asyncio.gather(*sleepers), 1.0)  # returned, not cancelled
        assert not gw._sleeping and not gw._woken
        # once stopped, a sleep returns without waiting
        await asyncio.wait_for(gw._sleep_until(START + 3600.0), 0.1)
    finally:
        gw.close()


async def test_a_sleep_ends_on_time_without_stop(tmp_path: Path) -> None:
    gw = _gateway(tmp_path, "b")
    try:
        t0 = time.monotonic()
        await gw._sleep_until(gw.clock.now() + 0.2)
        assert 0.19 <= time.monotonic() - t0 < 1.0
        assert not gw._sleeping
    finally:
        gw.close()


async def test_other_cancellations_are_not_swallowed(tmp_path: Path) -> None:
    gw = _gateway(tmp_path, "c")
    try:
        alone = asyncio.create_task(gw._sleep_until(START + 3600.0))
        await asyncio.sleep(0.01)
        alone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alone
        both = asyncio.create_task(gw._sleep_until(START + 3600.0))
        await asyncio.sleep(0.01)
        both.cancel()  # an outside cancellation and stop at the same moment
        gw.stop.set()
        with pytest.raises(asyncio.CancelledError):
            await both
        assert not gw._sleeping and not gw._woken
    finally:
        gw.close()
