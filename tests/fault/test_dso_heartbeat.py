"""The DSO's publisher dies while the broker stays up, with the signed DSO heartbeat on
(``[envelope] dso_heartbeat_timeout_s``): the silence is loss of contact. The site keeps the
DSO's default until ``dso_heartbeat_timeout_s`` after the last valid DSO message, then
``contact_timeout_s`` later moves to the configured fallback (physics checked); a publisher that
starts again brings contact back and the limit ramps up to the default at 16 %/min.

(Without the heartbeat the same silence keeps the default forever: ``test_dso_silent.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path
from typing import Any

import pytest

from community.dso import DsoPublisher
from gateway.envelope import ActiveLimits

from .harness import (
    EXPORT_W,
    START,
    default_schedule,
    export_held,
    running_site,
    wait_until,
)

pytestmark = pytest.mark.fault

HB_S = 150.0  # dso_heartbeat_timeout_s: 2.5 x the publisher's default 60 s period
CT_S = 60.0  # contact_timeout_s
FALLBACK_W = 300.0  # the harness's [envelope] fallback_export_w
RATING_W = 6000.0  # inverter 5000 W + battery discharge 1000 W: the ramp's base


async def test_dead_dso_behind_a_live_broker_is_lost_contact(mosquitto: Any,
                                                             tmp_path: Path) -> None:
    async with running_site(mosquitto, tmp_path, envelope={
            "contact_timeout_s": CT_S, "dso_heartbeat_timeout_s": HB_S}) as site:
        agent = site.gw.envelope
        assert agent is not None and agent.heartbeat_on
        # Every cycle's effective limits, as the agent resolves them (domain time, W).
        eff: list[tuple[float, float | None]] = []
        resolve = agent.limits_at

        def recording(now: float, connected: bool) -> ActiveLimits:
            out = resolve(now, connected)
            eff.append((now, out.limits.export_w))
            return out

        agent.limits_at = recording  # type: ignore[method-assign]
        await wait_until(lambda: agent.stats.heartbeats >= 1, 20, "a DSO heartbeat")
        assert agent.target is not None and agent.target.source == "default"
        assert not agent.target.contact_lost
        await export_held(site, EXPORT_W)

        # The DSO's publisher dies; the broker (with the retained default) stays up.
        site.pub_stop.set()
        await site.pub_task
        seen = agent.dso_seen
        assert seen is not None and seen <= site.clock.now()
        await wait_until(lambda: agent.target is not None and agent.target.source == "fallback",
                         30, "the fallback after the heartbeat and contact timeouts")
        assert mosquitto.running and site.gw.mqtt is not None and site.gw.mqtt.connected.is_set()
        assert agent.dso_seen == seen and not agent.stats.rejected
        # At the documented time: the last valid DSO message + HB_S (contact lost) + CT_S.
        silent = [(t, m) for t, lvl, _, m in site.events("envelope")
                  if lvl == "warning" and "no valid signed DSO message" in m]
        assert len(silent) == 1, silent
        assert seen + HB_S - 2.0 <= silent[0][0] <= seen + HB_S + 5.0, (silent, seen)
        lost = [t for t, _, _, m in site.events("envelope_limits")
                if m.startswith("limits from fallback") and "contact lost" in m]
        assert lost, site.events("envelope_limits")
        assert seen + HB_S + CT_S - 2.0 <= lost[0] <= seen + HB_S + CT_S + 15.0, (lost, seen)
        await export_held(site, FALLBACK_W)

        # A DSO publisher starts again (same key): contact is back, the limit ramps up.
        stop2 = asyncio.Event()
        pub2 = DsoPublisher(mosquitto.url, site.pub.key, site.clock,
                            [default_schedule(START - 100)], identifier="dso-fault-2",
                            heartbeat_s=20.0)
        task2 = asyncio.create_task(pub2.run(stop2))
        try:
            n = len(eff)
            await wait_until(lambda: agent.target is not None
                             and agent.target.source == "default"
                             and not agent.target.contact_lost, 30, "contact back")
            t_back = site.clock.now()
            await wait_until(lambda: agent.active is not None
                             and agent.active.limits.export_w == EXPORT_W, 30, "the ramp's end")
            assert any("heard again" in m for _, _, _, m in site.events("envelope"))
            ramp = [(t, w) for t, w in eff[n - 1:] if w is not None]  # from the last cycle
            assert ramp[0][1] == FALLBACK_W  # ... before the new publisher could be heard
            rate = RATING_W * 0.16 / 60.0  # W per domain s
            for (t1, w1), (t2, w2) in itertools.pairwise(ramp):
                assert 0.0 <= w2 - w1 <= rate * (t2 - t1) + 1e-6, (t1, w1, t2, w2)
            # not a jump: it took (EXPORT_W - FALLBACK_W) / rate domain seconds at least
            up = next(t for t, w in ramp if w == EXPORT_W)
            first = max(t for t, w in ramp if w == FALLBACK_W)
            assert up - first >= (EXPORT_W - FALLBACK_W) / rate - 1.0, (first, up, t_back)
            await export_held(site, EXPORT_W)
            assert agent.stats.dso_silences == 1 and not agent.stats.rejected
        finally:
            stop2.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task2, 10)
        stats = await site.finish()
    assert stats.task_restarts == 0 and stats.telemetry_lost == 0
