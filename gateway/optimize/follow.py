"""How the fast loop follows a plan between re-plans, on what it actually measures.

A plan is made on forecasts; the real load and PV differ from them every second. Writing the
plan's battery power as is would leave every forecast error to the grid (a plan that discharges
600 W against a forecast load of 600 W imports whatever the kettle adds). Following the plan's
*site* power instead lets the battery absorb the error, which is what the plan meant, with two
guards so the battery never does what the plan did not ask for:

1. hold the planned site power: ``b = b_plan - ((load - pv) - (load_fc - pv_fc))``;
2. never discharge into export (battery energy sold at the feed-in price) beyond what the plan
   itself discharged for export;
3. never charge from the grid unless the plan itself charges from the grid.

Device ratings, the state of charge and the envelope are applied afterwards by the caller
(:mod:`gateway.enforce` in the daemon, the plant in the backtest). With a plan that is pure
self-consumption (``site_plan == 0``), this is exactly self-consumption on the measured values.
"""

from __future__ import annotations


def follow_plan(
    battery_plan_w: float,
    site_plan_w: float,
    load_w: float,
    pv_w: float,
) -> float:
    """Battery power (+ charge, - discharge) that follows the plan on measured load and PV.

    ``battery_plan_w`` and ``site_plan_w`` (+ import, - export) are the plan's values for the
    current step; ``load_w`` and ``pv_w`` what is measured (or, in the backtest, what happened).
    """
    surplus = pv_w - load_w  # what self-consumption would store (+) or draw (-)
    b = site_plan_w + surplus  # hold the planned site power (site = load - pv + b)
    site = -surplus + b
    if b < 0 and site < 0:
        # Discharging into export: only as far as the plan itself exported battery energy.
        planned_battery_export = max(0.0, min(-battery_plan_w, -site_plan_w))
        b = max(b, min(0.0, surplus) - planned_battery_export)
    elif b > 0 and site > 0:
        # Charging from the grid: only as far as the plan itself did.
        planned_grid_charge = max(0.0, min(battery_plan_w, site_plan_w))
        b = min(b, max(0.0, surplus) + planned_grid_charge)
    return b
