"""What the household would trade in one interval at each of several community prices.

For a price p, interval k's whole net flow is priced at p (the community's buy and sell price are
both p: ``market_price[k] = p``, ``market_weight[k] = 1``) and the LP re-solves; the planned net
export of interval k is the quantity offered (+, sell) or asked for (-, buy) at p. Only parameter
values change, so each point is one warm DPP re-solve.

Why the curve is monotone: with x the plan and e_k(x) the net export of interval k, the optimal
value V(p) = min_x [cost(x) - p * e_k(x)] is a minimum of functions affine in p, hence concave, and
-e_k(x*(p)) is a supergradient of V at p. Supergradients of a concave function are non-increasing,
so e_k(x*(p)) is non-decreasing in p: a higher price never makes an LP household sell less. When
the LP has several optimal plans at some price (a tie, e.g. exactly at a tariff price), the solver
may return any of them, so the raw points can wiggle; the curve is made monotone by a running
maximum over ascending prices, which moves a point only within that tie.

The quantities are bounded by the envelope (a home never offers more than its export limit, nor
asks for more than its import limit, over the interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.optimize.inputs import FloatArray, PlanInputs, validate
from gateway.optimize.problem import solve_plan


@dataclass(frozen=True)
class BidCurve:
    """Net energy (Wh) the household would trade in interval ``step`` at each price (ascending)."""

    step: int
    prices: FloatArray  # per kWh, ascending
    net_export_wh: FloatArray  # + sell, - buy; non-decreasing in price
    raw_net_export_wh: FloatArray  # as solved, before monotone repair and envelope clipping


def bid_curve(
    inputs: PlanInputs,
    step: int,
    prices: FloatArray | list[float],
    time_limit_s: float | None = None,
) -> BidCurve:
    """Re-solve the plan once per price with interval ``step`` traded at that price.

    Raises ``ValueError`` for invalid inputs/step/prices and ``SolveFailed`` if a solve fails
    (the market agent then skips bidding for the interval rather than bid on a guess).
    """
    x = validate(inputs)
    if not 0 <= step < x.steps:
        raise ValueError(f"step: {step} outside the horizon of {x.steps} steps")
    p = np.sort(np.asarray(prices, dtype=np.float64))
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)):
        raise ValueError("prices: need a non-empty 1-D array of finite prices")
    assert x.market_price is not None and x.market_weight is not None and x.limits is not None
    market_price = x.market_price.copy()
    market_weight = x.market_weight.copy()
    market_weight[step] = 1.0
    raw = np.empty(p.size)
    # Without storage nothing moves energy between steps, and at a positive price curtailing PV
    # never pays (unless to meet an award, hence no award at the step): the net position of the
    # step is the same at every price (net load, or what the envelope forces), so one solve
    # gives the whole (flat) curve. At a price of 0 curtailing is a tie: solved as usual.
    flat = (x.battery.capacity_wh <= 0.0 and p[0] > 0.0
            and (x.award_w is None or x.award_w[step] == 0.0))
    for i, price in enumerate(p):
        if flat and i > 0:
            raw[i] = raw[0]
            continue
        market_price[step] = price
        plan = solve_plan(
            x.with_market(market_price.copy(), market_weight.copy()), time_limit_s=time_limit_s
        )
        raw[i] = (plan.export_w[step] - plan.import_w[step]) * x.dt_h
    monotone = np.maximum.accumulate(raw)
    hi = x.limits.export_w[step] * x.dt_h
    lo = -x.limits.import_w[step] * x.dt_h
    return BidCurve(step, p, np.clip(monotone, lo, hi), raw)
