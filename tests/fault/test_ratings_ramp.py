"""A device that comes back with other ratings while the envelope is ramping up (contact just
returned): the ramp must go on from where it was, not restart from the target. The ramp's rate is
a share of the site's DER rating, so a new rating changes the rate, never the position."""

from __future__ import annotations

import itertools

import pytest
from envelope_gw.helpers import NOW, T_DEFAULT, default, default_doc, make_agent

from drivers.natures import BatteryReading, InverterReading, MeterReading
from gateway.commands import Setpoints as Commanded
from gateway.commands import SiteState
from gateway.envelope import Limits

pytestmark = pytest.mark.fault


def state(t: float, rated_w: float) -> SiteState:
    return SiteState(
        t, MeterReading(t, -900.0, (None, None, None), None, None),
        InverterReading(t, 1500.0, None, rated_w, rated_w, 100.0, False, None, None),
        BatteryReading(t, 0.0, 100.0, 10000.0, 5000.0, 5000.0, 10.0, 0, None, None, None))


def test_rating_change_mid_ramp_does_not_skip_the_ramp() -> None:
    a = make_agent(fallback=Limits(export_w=1000.0), contact_timeout_s=60.0)
    a.on_message(T_DEFAULT, default_doc(default("d", NOW - 10, export_w=5000), NOW - 1), NOW)
    effs: list[float] = []
    for k in range(130):  # 100 s without contact (fallback 1000 W), then contact returns
        rated = 5000.0 if k < 110 else 3000.0  # the inverter reboots as a 3 kW unit
        a.step(state(NOW + k, rated), Commanded(0.0), connected=(k == 0 or k >= 100))
        assert a.active is not None and a.active.limits.export_w is not None
        effs.append(a.active.limits.export_w)
    assert effs[99] == 1000.0
    # 16 %/min of (3000 + 5000) W is 21.3 W/s: 20 s of ramp is at most ~430 W above 1000 W
    assert effs[-1] <= 1000.0 + 30 * 10000.0 * 0.16 / 60 + 1e-6, effs[105:]
    steps = [b - c for c, b in itertools.pairwise(effs[100:])]
    assert max(steps) <= 10000 * 0.16 / 60 + 1e-6
