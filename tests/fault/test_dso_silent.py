"""The DSO falls silent (its publisher dies; the broker stays up), past the end of the control
it sent; later the broker goes too. CSIP-AUS semantics: a held control runs to its end, then the
DSO's default applies; only loss of contact (here: the broker) for ``contact_timeout_s`` moves the
site to the configured fallback. The physics is checked against each limit in turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from community.dso import SiteSchedule
from gateway.envelope import Control, DefaultControl

from .harness import SITE, export_held, running_site, wait_until

pytestmark = pytest.mark.fault

CONTROL_S = 90.0
TIMEOUT_S = 60.0


def schedule(start: float) -> SiteSchedule:
    return SiteSchedule(
        SITE, DefaultControl(id="def", site=SITE, created=start - 100, export_w=800.0),
        (Control(id="ctl", site=SITE, created=start - 50, start=start - 10,
                 duration_s=CONTROL_S, export_w=500.0),))


async def test_dso_silent_then_broker_gone(mosquitto: Any, tmp_path: Path) -> None:
    async with running_site(mosquitto, tmp_path, schedule=schedule,
                            envelope={"contact_timeout_s": TIMEOUT_S}) as site:
        agent = site.gw.envelope
        assert agent is not None and agent.target is not None
        assert agent.target.source == "control"
        await export_held(site, 500.0)
        # The DSO dies; the broker (with the retained documents) stays.
        site.pub_stop.set()
        await site.pub_task
        await wait_until(lambda: agent.target is not None and agent.target.source == "default",
                         20, "the default after the control ended")
        await export_held(site, 800.0)
        # Silence alone is not loss of contact: the default holds for longer than the timeout.
        await site.settle(TIMEOUT_S * 1.5)
        assert agent.target.source == "default" and not agent.target.contact_lost
        mosquitto.stop()
        t_stop = site.clock.now()
        await wait_until(lambda: agent.target is not None and agent.target.source == "fallback",
                         20, "the fallback after contact_timeout_s without the broker")
        assert site.clock.now() >= t_stop + TIMEOUT_S - 5.0
        await export_held(site, 300.0)
        msgs = [m for _, _, _, m in site.events("envelope_limits")]
        assert any("from control ctl" in m for m in msgs) or agent.stats.accepted >= 2
        assert any(m.startswith("limits from default") for m in msgs), msgs
        assert any("fallback" in m and "contact lost" in m for m in msgs), msgs
        mosquitto.start()
        stats = await site.finish()
    assert stats.task_restarts == 0 and stats.telemetry_lost == 0
