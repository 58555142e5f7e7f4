"""A dead meter fails safe, end to end (real Mosquitto, simulated devices over Modbus TCP, the
in-process gateway on an accelerated clock, the physics as the judge).

The export limit binds (steady sun, 700 W load, battery charging 1 kW, 500 W export limit). The
meter dies (stops answering, or freezes its registers); after ``control.meter_loss_cycles``
cycles the gateway assumes zero load and limits PV to export limit + battery charge (1.5 kW).
Then the whole household load switches off: without the failsafe the export would jump by the
700 W the load took (the loop cannot see it); with it the site still exports no more than the
limit. The meter comes back: one event each way, and the curtailment is lifted at the envelope's
ramp rate, back to normal control (PV up to load + battery + limit = 2.2 kW).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_sim.home import StepProfile

from .harness import EXPORT_W, TOLERANCE_W, Site, running_site, wait_until

pytestmark = pytest.mark.fault

RAMP_PCT_PER_MIN = 16.0  # the envelope's default (AS/NZS 4777.2)


def set_load(site: Site, load_w: float) -> None:
    """Switch the household load to ``load_w`` now (the physics integrates up to now first)."""
    ph = site.sim.physics
    ph.advance()
    ph.load_profile = StepProfile(np.full(365 * 24, load_w), 3600)


def max_export_over_limit(site: Site, since: int) -> float:
    """Largest export above the limit (W) in the observer's samples from index ``since``."""
    return max((-s - EXPORT_W for _, s, _ in site.observer.samples[since:]), default=0.0)


def failsafe_events(site: Site) -> list[str]:
    return [m for _, _, k, m in site.events("failsafe")]


@pytest.mark.parametrize("fault", ["timeout", "frozen"])
async def test_dead_meter_fails_safe_then_control_resumes(mosquitto: Any, tmp_path: Path,
                                                          fault: str) -> None:
    async with running_site(mosquitto, tmp_path) as site:
        gw, ph = site.gw, site.sim.physics
        assert gw.cfg.control.meter_loss_cycles == 3  # the default
        site.sim.faults["meter"].inject(fault)
        # Frozen: judged after 30 domain s of stale values, then 3 cycles; a timeout costs each
        # cycle its real-time read timeout (10 domain s at x40).
        await wait_until(lambda: gw.stats.meter_failsafe_entries == 1, 30,
                         f"the failsafe after the meter {fault}")
        ev = failsafe_events(site)
        assert len(ev) == 1 and ev[0].startswith("meter lost: failsafe curtailment to"), ev
        m = re.search(r"to (\d+) W", ev[0])
        assert m is not None and 1400 <= int(m.group(1)) <= 1510, ev  # 500 W + ~1 kW charge
        # The inverter itself holds the failsafe limit (physics, after its 2 s ramp).
        await wait_until(lambda: ph.state().limit_pct <= 30.5, 20,
                         "the inverter at the failsafe limit")
        await site.settle(5.0)

        # The whole load switches off while the meter is dead.
        n0 = len(site.observer.samples)
        set_load(site, 0.0)
        await site.settle(60.0)
        assert gw.slots["meter"].failing and gw._failsafe is not None, "meter back too early"
        over = max_export_over_limit(site, n0)
        assert over <= TOLERANCE_W, f"export {over:.0f} W over the limit with a dead meter"
        st = ph.state()
        assert st.load_w == 0.0 and st.pv_w <= 1510.0 and st.battery_w > 900.0, st

        # Load back, then the meter: normal control resumes, lifting PV at the ramp rate.
        set_load(site, 700.0)
        await site.settle(5.0)
        n_sp = len(site.setpoints)
        site.sim.faults["meter"].clear()
        await wait_until(lambda: len(failsafe_events(site)) == 2, 30, "the meter back")
        ev = failsafe_events(site)
        assert ev[1].startswith("meter reads again: failsafe ended"), ev
        assert gw.stats.meter_failsafe_entries == 1
        t_back = next(ts for ts, _, k, msg in site.events("failsafe") if "reads again" in msg)
        await wait_until(lambda: gw.setpoint is not None
                         and (gw.setpoint.inverter_limit_pct or 0.0) >= 43.5, 60,
                         "the PV limit back to normal control (44 % = 2.2 kW)")
        await site.settle(3.0)
        assert ph.state().pv_w > 2100.0
        # The curtailment was lifted no faster than the envelope's ramp (one cycle of slack).
        rate = RAMP_PCT_PER_MIN / 60.0
        pts = [(t, p) for t, _, p in site.setpoints[n_sp:] if p is not None and t >= t_back]
        assert len(pts) > 10
        for (t1, p1), (t2, p2) in itertools.pairwise(pts):
            assert p2 - p1 <= rate * (t2 - t1) + rate * 1.5 + 0.01, (t1, p1, t2, p2)
        # It took the ramp's time, not one cycle: 30 % -> 44 % at 16 %/min is ~52 s.
        t_normal = next(t for t, p in pts if p >= 43.0)
        assert t_normal - t_back >= 40.0, (t_back, t_normal)
        assert not gw.slots["meter"].failing
        await site.settle(5.0)
        assert max_export_over_limit(site, n0) <= TOLERANCE_W
        stats = await site.finish()
        assert stats.task_restarts == 0
        assert stats.meter_failsafe_cycles >= 3
