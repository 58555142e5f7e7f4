"""The elastic simulated timeline: a shared hold, never going back, held while a loop is behind."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest

from drivers.clock import SimClock, TimeHold, govern, grid_slot


def _child_adds(hold: TimeHold, seconds: float) -> None:
    hold.add(seconds)


def test_a_hold_added_in_another_process_is_seen_here() -> None:
    hold = TimeHold()
    clock = SimClock(start=1000.0, speed=100.0, hold=hold)
    p = mp.get_context("spawn").Process(target=_child_adds, args=(hold, 2.5))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert hold.seconds == pytest.approx(2.5)
    # 2.5 real s held at x100: domain time is 250 s behind an unheld clock on the same epoch
    free = SimClock(start=1000.0, speed=100.0, epoch=clock.epoch)
    assert free.now() - clock.now() == pytest.approx(250.0, abs=1.0)


def test_domain_time_never_goes_back() -> None:
    hold = TimeHold()
    clock = SimClock(start=0.0, speed=1000.0, hold=hold)
    time.sleep(0.02)
    before = clock.now()
    hold.add(10.0)  # 10 000 domain s back: the process' clock stands still instead
    assert clock.now() == before
    assert clock.now() == before


async def test_sleep_until_waits_out_a_hold_added_while_asleep() -> None:
    hold = TimeHold()
    clock = SimClock(start=0.0, speed=100.0, hold=hold)
    target = clock.now() + 10.0  # 0.1 s real

    async def add_later() -> None:
        await asyncio.sleep(0.05)
        hold.add(0.1)

    t0 = time.monotonic()
    await asyncio.gather(clock.sleep_until(target), add_later())
    assert clock.now() >= target
    assert time.monotonic() - t0 >= 0.19  # 0.1 s asleep + 0.1 s held
    t1 = clock.now()
    await clock.sleep(5.0)
    assert clock.now() - t1 >= 5.0


async def test_govern_holds_the_timeline_while_the_loop_is_blocked() -> None:
    hold = TimeHold()
    task = asyncio.create_task(govern(hold, period_s=0.005, slack_s=0.002))
    await asyncio.sleep(0.05)
    quiet = hold.seconds
    time.sleep(0.2)  # noqa: ASYNC251 - the point: a loop busy with something else
    await asyncio.sleep(0.03)
    task.cancel()
    assert quiet < 0.05
    assert hold.seconds - quiet >= 0.15


def test_without_a_hold_the_clock_is_unchanged() -> None:
    clock = SimClock(start=0.0, speed=50.0)
    a = clock.now()
    time.sleep(0.02)
    assert clock.now() - a == pytest.approx(1.0, abs=0.5)
    assert clock.hold is None


async def test_two_governors_behind_at_once_hold_the_timeline_once() -> None:
    hold = TimeHold()
    tasks = [asyncio.create_task(govern(hold, period_s=0.005, slack_s=0.002)) for _ in range(2)]
    await asyncio.sleep(0.03)
    quiet = hold.seconds
    time.sleep(0.3)  # noqa: ASYNC251 - both governors' wake-ups are late by the same 0.3 s
    await asyncio.sleep(0.03)
    for t in tasks:
        t.cancel()
    held = hold.seconds - quiet
    assert 0.25 <= held <= 0.4  # once (~0.3 s), not twice (~0.6 s)


def test_domain_time_moves_as_the_clocks_own_real_time_even_across_holds() -> None:
    """What the daemon's clock-step detection relies on (domain advance = speed x the clock's
    ``monotonic()`` advance): a held timeline is no clock step (3407 false 'clock jumped'
    warnings in a 10-home day before the daemon used it)."""
    hold = TimeHold()
    clock = SimClock(start=0.0, speed=300.0, hold=hold)
    m0, d0 = clock.monotonic(), clock.now()
    for i in range(5):
        time.sleep(0.01)
        hold.add(0.004 * i)
        m1, d1 = clock.monotonic(), clock.now()
        assert (d1 - d0) - (m1 - m0) * clock.speed == pytest.approx(0.0, abs=300 * 0.002)
        assert d1 >= d0
        m0, d0 = m1, d1
    d0, m0, r0 = clock.now(), clock.monotonic(), time.monotonic()
    hold.add(0.05)
    time.sleep(0.03)  # the timeline stands still (held), real time does not
    d1, m1, r1 = clock.now(), clock.monotonic(), time.monotonic()
    assert (d1 - d0) - (m1 - m0) * clock.speed == pytest.approx(0.0, abs=1.0)
    assert (d1 - d0) - (r1 - r0) * clock.speed < -5.0  # time.monotonic() would see a step back


def test_grid_slot_is_the_latest_slot_at_or_before_t() -> None:
    assert grid_slot(1003.7, 10.0, None) == 1003.7  # no phase: t itself
    assert grid_slot(1003.7, 10.0, 2.5) == pytest.approx(1002.5)
    assert grid_slot(1002.5, 10.0, 2.5) == pytest.approx(1002.5)  # on the grid: itself
    assert grid_slot(1002.4, 10.0, 2.5) == pytest.approx(992.5)
    for t in (0.0, 0.3, 9.99, 123456.789):
        s = grid_slot(t, 5.0, 1.25)
        assert s <= t < s + 5.0 and (s - 1.25) / 5.0 == pytest.approx(round((s - 1.25) / 5.0))
