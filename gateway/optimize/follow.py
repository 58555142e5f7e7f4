"""How the fast loop follows a plan between re-plans, on what it actually measures.

A plan is made on forecasts; the real load and PV differ from them every second. Writing the
plan's battery power as is would leave every forecast error to the grid (a plan that discharges
600 W against a forecast load of 600 W imports whatever the kettle adds), and holding the plan's
site power would leave every error to the battery (a plan that imports at the shoulder price to
keep the battery for the evening peak would spend it on every unforecast kettle). Which one is
right depends on what the plan says a stored kWh is worth in this step, and the plan's own flows
tell that:

1. the plan neither imports nor exports (``site_plan == 0``): the battery balances the house, so
   a stored kWh is worth less than the import and more than the export price: the battery takes
   the error (hold the planned site power, ``b = b_plan - ((load - pv) - (load_fc - pv_fc))``);
   with a pure self-consumption plan this is exactly self-consumption on the measured values;
2. the plan imports (``site_plan > 0``): by its own reckoning a stored kWh is worth at least the
   import price now, so unforecast load is imported and the battery keeps its planned power;
   a surplus the plan did not foresee is stored, never exported (it is worth the import price);
3. the plan exports (``site_plan < 0``): the battery takes the error, as in 1.

Two guards so the battery never does what the plan did not ask for: never discharge into export
beyond what the plan itself discharged for export, never charge from the grid beyond what the
plan itself charged from the grid. Device ratings, the state of charge and the envelope are
applied afterwards by the caller (:mod:`gateway.enforce` in the daemon, the plant in the
backtest).
"""

from __future__ import annotations

# Below this planned import (W) a step counts as "neither imports nor exports": LP solutions
# carry float noise of milliwatts.
IMPORT_TOLERANCE_W = 1.0


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
    # importing: keep the planned battery power, store what would otherwise be exported;
    # otherwise hold the planned site power (site = load - pv + b)
    imports = site_plan_w > IMPORT_TOLERANCE_W
    b = max(battery_plan_w, surplus) if imports else site_plan_w + surplus
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
