"""follow_plan: the fast loop's way of following a plan on measured load and PV."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.optimize.follow import follow_plan

W = st.floats(min_value=-20_000, max_value=20_000, allow_nan=False)
P = st.floats(min_value=0, max_value=20_000, allow_nan=False)


@given(load=P, pv=P)
def test_a_self_consumption_plan_is_self_consumption_on_what_is_measured(
    load: float, pv: float
) -> None:
    # the plan believed something else; site_plan == 0 means "neither import nor export"
    assert follow_plan(123.0, 0.0, load, pv) == pv - load


def test_holds_the_planned_import_when_the_plan_charges_from_the_grid() -> None:
    # plan: charge 3 kW, 2 kW of it from the grid (forecast surplus 1 kW); real surplus 0.5 kW
    b = follow_plan(3000.0, 2000.0, 500.0, 1000.0)
    assert b == 2500.0  # site stays at the planned 2 kW import


def test_holds_the_battery_back_for_later_when_the_plan_says_so() -> None:
    # plan: battery idle, import the load (saving energy for the evening peak)
    assert follow_plan(0.0, 600.0, 600.0, 0.0) == 0.0
    # the load is 200 W higher than forecast: the energy kept for the peak is worth more than
    # the import now, so the kettle is imported and the battery stays idle
    assert follow_plan(0.0, 600.0, 800.0, 0.0) == 0.0
    # 200 W lower: the battery does not start charging from the grid, the import shrinks
    assert follow_plan(0.0, 600.0, 400.0, 0.0) == 0.0
    # an unforeseen PV surplus is stored, not exported at the feed-in price
    assert follow_plan(0.0, 600.0, 400.0, 1000.0) == 600.0
    # a planned discharge (importing the rest) is kept; extra load is imported
    assert follow_plan(-300.0, 300.0, 900.0, 0.0) == -300.0


def test_a_grid_charge_is_not_cut_by_unforecast_load() -> None:
    # plan: charge 2 kW from the grid at night on a forecast load of 500 W (import 2.5 kW);
    # the load is 800 W higher: the battery still charges 2 kW, the import grows
    assert follow_plan(2000.0, 2500.0, 1300.0, 0.0) == 2000.0


@given(bp=W, sp=st.floats(min_value=1.5, max_value=20_000), load=P, pv=P)
def test_a_plan_that_imports_never_exports_nor_discharges_beyond_the_plan(
    bp: float, sp: float, load: float, pv: float
) -> None:
    b = follow_plan(bp, sp, load, pv)
    assert load - pv + b >= -1e-6  # no export
    assert b >= min(bp, 0.0) - 1e-6  # no discharge the plan did not ask for


@given(bp=W, sp=W, load=P, pv=P)
def test_never_exports_battery_energy_nor_charges_from_grid_beyond_the_plan(
    bp: float, sp: float, load: float, pv: float
) -> None:
    b = follow_plan(bp, sp, load, pv)
    site = load - pv + b
    if b < 0 and site < 0:  # battery energy exported
        exported_from_battery = min(-b, -site)
        assert exported_from_battery <= max(0.0, min(-bp, -sp)) + 1e-6
    if b > 0 and site > 0:  # grid energy stored
        grid_charge = min(b, site)
        assert grid_charge <= max(0.0, min(bp, sp)) + 1e-6
