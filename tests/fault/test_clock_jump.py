"""The gateway's clock steps forward and back (NTP correcting an RTC-less Pi after boot, an
operator setting the date) while the devices' physics runs on true time.

Safe behaviour: the fast loop neither bursts to catch up (forward) nor stalls waiting for a
time that is now an hour away (back: the devices would revert, the watchdog would fire); each
jump is recorded as a ``clock`` event; the site stays inside the envelope; telemetry rows keep
contiguous sequence numbers and non-decreasing stamps (a window spanning a backward jump just
stays open longer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drivers.clock import SimClock

from .harness import running_site, telemetry_rows, wait_until
from .test_device_faults import longest_exceedance_s

pytestmark = pytest.mark.fault

JUMP_S = 3600.0


class JumpClock(SimClock):
    """A SimClock on the same timeline as another, whose reading can be stepped."""

    def __init__(self, base: SimClock) -> None:
        super().__init__(base.start, base.speed, epoch=base.epoch)

    def jump(self, dt: float) -> None:
        self.start += dt


async def test_clock_jumps_forward_and_back(mosquitto: Any, tmp_path: Path) -> None:
    clocks: list[JumpClock] = []

    def make(base: SimClock) -> JumpClock:
        clocks.append(JumpClock(base))
        return clocks[0]

    async with running_site(mosquitto, tmp_path, gateway_clock=make) as site:
        gw, jc = site.gw, clocks[0]
        n0 = len(site.observer.samples)
        c0 = gw.stats.cycles
        jc.jump(+JUMP_S)
        await site.settle(30.0)
        c1 = gw.stats.cycles
        # no burst: about one cycle per (true) domain second, not the hour's 3600 cycles
        assert 10 <= c1 - c0 <= 60, c1 - c0
        jc.jump(-JUMP_S)
        # no stall: cycles go on at once although the loop had scheduled one an hour ahead
        await wait_until(lambda: gw.stats.cycles >= c1 + 10, 10, "cycles after the back jump")
        await site.settle(30.0)
        longest, worst = longest_exceedance_s(site, n0)
        assert longest <= 15.0, (longest, worst)
        jumps = [m for _, _, _, m in site.events("clock")]
        assert any("+3600" in m for m in jumps) and any("-3600" in m for m in jumps), jumps
        assert len(jumps) == 2, jumps
        stats = await site.finish()
    assert stats.task_restarts == 0 and stats.telemetry_lost == 0
    rows = telemetry_rows(site.db)
    assert [s for s, _ in rows] == list(range(1, stats.telemetry_produced + 1))
    ts = [t for _, t in rows]
    assert ts == sorted(ts), "telemetry stamps went backwards"
