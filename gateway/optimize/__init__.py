"""Household planning: the battery + grid LP, its invariants, the rule fallback and bid curves.

Pure functions over numpy arrays, no I/O. Entry points: :func:`plan_or_fallback` (what the slow loop
calls), :func:`solve_plan`, :func:`check_plan`, :func:`bid_curve`, :func:`plan_cost`.
"""

from gateway.optimize.bidcurve import BidCurve, bid_curve
from gateway.optimize.fallback import idle, plan_or_fallback, self_consumption
from gateway.optimize.inputs import Battery, PlanInputs, StepLimits, validate
from gateway.optimize.invariants import check_plan
from gateway.optimize.plan import Plan, Setpoint, economic_cost, plan_cost
from gateway.optimize.problem import SolveFailed, solve_plan

__all__ = [
    "Battery",
    "BidCurve",
    "Plan",
    "PlanInputs",
    "Setpoint",
    "SolveFailed",
    "StepLimits",
    "bid_curve",
    "check_plan",
    "economic_cost",
    "idle",
    "plan_cost",
    "plan_or_fallback",
    "self_consumption",
    "solve_plan",
    "validate",
]
