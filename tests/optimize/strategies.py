"""Hypothesis strategies for planner inputs: random households, tariffs and envelopes."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gateway.optimize.inputs import Battery, PlanInputs, StepLimits

# Few distinct shapes: each (steps, step_s) compiles its own cvxpy problem once (~0.1 s).
STEP_S = st.sampled_from([900.0, 3600.0])
STEPS = st.sampled_from([1, 3, 8, 24])


def _vec(n: int, lo: float, hi: float) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float64, n, elements=st.floats(lo, hi, allow_nan=False))


def _limit(n: int) -> st.SearchStrategy[np.ndarray]:
    # inf = no limit; 0 = "nothing allowed" (an empty or contradictory envelope).
    elem = st.one_of(st.just(np.inf), st.just(0.0), st.floats(0, 12_000))
    return arrays(np.float64, n, elements=elem)


@st.composite
def batteries(draw: st.DrawFn, *, soc0_above_reserve: bool = False) -> Battery:
    cap = draw(st.one_of(st.just(0.0), st.floats(100, 20_000)))
    soc_min = draw(st.floats(0, 0.5)) * cap
    soc_max = soc_min + draw(st.floats(0, 1)) * (cap - soc_min)
    lo = soc_min if soc0_above_reserve else 0.0
    soc0 = lo + draw(st.floats(0, 1)) * (cap - lo)
    return Battery(
        capacity_wh=cap,
        soc0_wh=soc0,
        max_charge_w=draw(st.floats(0, 8000)),
        max_discharge_w=draw(st.floats(0, 8000)),
        soc_min_wh=soc_min,
        soc_max_wh=soc_max,
        eta_charge=draw(st.floats(0.7, 1.0)),
        eta_discharge=draw(st.floats(0.7, 1.0)),
        degradation_per_kwh=draw(st.floats(0, 0.2)),
        terminal_value_per_kwh=draw(st.floats(0, 0.5)),
    )


@st.composite
def plan_inputs(
    draw: st.DrawFn,
    *,
    with_limits: bool = True,
    with_market: bool = True,
    fit_below_import: bool = False,
    soc0_above_reserve: bool = False,
) -> PlanInputs:
    n = draw(STEPS)
    imp = draw(_vec(n, -0.2, 1.0))
    if fit_below_import:
        imp = np.abs(imp)
        exp = imp - draw(_vec(n, 0.0, 1.2))  # FiT may be negative
    else:
        exp = draw(_vec(n, -0.6, 0.6))
    limits = None
    if with_limits and draw(st.booleans()):
        limits = StepLimits(draw(_limit(n)), draw(_limit(n)), draw(_limit(n)), draw(_limit(n)))
    market_price = market_weight = award = None
    if with_market and draw(st.booleans()):
        market_price = draw(_vec(n, -0.2, 0.8))
        market_weight = draw(_vec(n, 0.0, 1.0))
        award = draw(_vec(n, -5000, 5000)) * draw(
            arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0]))
        )
    return PlanInputs(
        step_s=draw(STEP_S),
        load_w=draw(_vec(n, 0, 9000)),
        pv_w=draw(_vec(n, 0, 12_000)),
        import_price=imp,
        export_price=exp,
        battery=draw(batteries(soc0_above_reserve=soc0_above_reserve)),
        limits=limits,
        market_price=market_price,
        market_weight=market_weight,
        award_w=award,
    )
