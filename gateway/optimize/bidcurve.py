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

The same inequality makes most solves unnecessary. For prices p1 < p2 and any plans x1, x2
optimal at them, optimality of each at its own price gives (p2 - p1) * (e(x1) - e(x2)) <= 0, so
e(x1) <= e(x2) for *every* choice of optimal plans. Hence if the quantities at two prices agree,
every price between them has that quantity too. The curve is solved at its two end prices and
bisected only where they differ: a flat curve costs two solves instead of one per price, a
one-step curve about log2 of the number of prices more (each price is solved at most once).
Agreement is judged within ``_SAME_WH`` (solver tolerance, far below any bid's resolution).

The quantities are bounded by the envelope (a home never offers more than its export limit, nor
asks for more than its import limit, over the interval).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.optimize.fallback import Solver
from gateway.optimize.inputs import FloatArray, PlanInputs, validate
from gateway.optimize.problem import solve_plan

# Two solved quantities closer than this are the same point of the curve (Wh; solver noise).
_SAME_WH = 0.05


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
    solver: Solver = solve_plan,
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
    raw = np.full(p.size, np.nan)

    def solve_at(i: int) -> float:
        if np.isnan(raw[i]):
            market_price[step] = p[i]
            plan = solver(x.with_market(market_price.copy(), market_weight.copy()),
                          time_limit_s=time_limit_s)
            raw[i] = (plan.export_w[step] - plan.import_w[step]) * x.dt_h
        return float(raw[i])

    # Without storage nothing moves energy between steps, and at a positive price curtailing PV
    # never pays (unless to meet an award, hence no award at the step): the net position of the
    # step is the same at every price (net load, or what the envelope forces), so one solve
    # gives the whole (flat) curve. At a price of 0 curtailing is a tie: solved as usual.
    flat = (x.battery.capacity_wh <= 0.0 and p[0] > 0.0
            and (x.award_w is None or x.award_w[step] == 0.0))
    if flat:
        raw[:] = solve_at(0)
    else:
        _bisect(solve_at, raw, 0, p.size - 1)
    monotone = np.maximum.accumulate(raw)
    hi = x.limits.export_w[step] * x.dt_h
    lo = -x.limits.import_w[step] * x.dt_h
    return BidCurve(step, p, np.clip(monotone, lo, hi), raw)


def _bisect(solve_at: Callable[[int], float], raw: FloatArray, i: int, j: int) -> None:
    """Fill ``raw[i..j]``: solve the ends; where they agree the points between share the value
    (monotonicity, module docstring), else split at the middle."""
    lo, hi = solve_at(i), solve_at(j)
    if j - i <= 1:
        return
    if abs(hi - lo) <= _SAME_WH:
        raw[i + 1:j] = lo
        return
    m = (i + j) // 2
    _bisect(solve_at, raw, i, m)
    _bisect(solve_at, raw, m, j)

