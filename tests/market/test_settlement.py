"""Settlement maths: hand-checkable statements and hypothesis properties over real clearings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from community.clearing import BUY, SELL, BidSteps, clear
from community.market.settlement import (
    Award,
    Statement,
    Tariff,
    settle_interval,
    settle_site,
)

FIT, RETAIL = 0.08, 0.30
T = Tariff(FIT, RETAIL)


def one(award: Award | None, metered: float) -> Statement:
    return settle_site("s", award, metered, T)


@pytest.mark.parametrize(("award", "metered", "dev", "dev_amount", "total", "retailer_only"), [
    # Seller of 2 kWh at 0.20 exports 2.5: the extra 0.5 at feed-in.
    (Award(2.0, 0.40), 2.5, 0.5, 0.04, 0.44, 0.20),
    # Seller of 2 kWh exports only 1.5: the missing 0.5 bought at retail.
    (Award(2.0, 0.40), 1.5, -0.5, -0.15, 0.25, 0.12),
    # Buyer of 1 kWh at 0.20 imports 1.5: the extra 0.5 at retail.
    (Award(-1.0, -0.20), -1.5, -0.5, -0.15, -0.35, -0.45),
    # Buyer of 1 kWh imports only 0.25: the unused 0.75 goes back at feed-in (it lost money).
    (Award(-1.0, -0.20), -0.25, 0.75, 0.06, -0.14, -0.075),
    # Buyer of 1 kWh ends up exporting 0.5: 1.5 kWh surplus at feed-in.
    (Award(-1.0, -0.20), 0.5, 1.5, 0.12, -0.08, 0.04),
    # Exact delivery: the award alone.
    (Award(2.0, 0.40), 2.0, 0.0, 0.0, 0.40, 0.16),
    # No award: the retailer alone, both ways.
    (None, 1.0, 1.0, 0.08, 0.08, 0.08),
    (None, -1.0, -1.0, -0.30, -0.30, -0.30),
])
def test_hand_checked_statements(award: Award | None, metered: float, dev: float,
                                 dev_amount: float, total: float, retailer_only: float) -> None:
    s = one(award, metered)
    assert s.deviation_kwh == pytest.approx(dev)
    assert s.deviation_amount == pytest.approx(dev_amount)
    assert s.total == pytest.approx(total)
    assert s.retailer_only == pytest.approx(retailer_only)
    assert s.benefit == pytest.approx(total - retailer_only)
    assert s.award_price == (None if award is None else pytest.approx(0.20))


def test_float_noise_is_not_a_deviation() -> None:
    s = one(Award(0.1 + 0.2, 0.3 * 0.2), 0.3)
    assert s.deviation_kwh == 0.0 and s.deviation_amount == 0.0


def test_bad_inputs_raise_naming_the_field() -> None:
    with pytest.raises(ValueError, match="metered export"):
        one(Award(1.0, 0.2), math.nan)
    with pytest.raises(ValueError, match="award amount"):
        one(Award(1.0, math.inf), 1.0)
    with pytest.raises(ValueError, match="feed_in <= retail"):
        Tariff(0.3, 0.1)


def test_interval_balances_and_missing_meters() -> None:
    # s1 sells 2 kWh to s2 (1.5) and s3 (0.5) at 0.20; s3 sends no meter reading.
    awards = {"s1": Award(2.0, 0.40), "s2": Award(-1.5, -0.30), "s3": Award(-0.5, -0.10)}
    r = settle_interval(awards, {"s1": 1.8, "s2": -1.5, "s4": 0.3}, T)
    assert r.missing == ("s3",)
    assert set(r.statements) == {"s1", "s2", "s4"}
    assert r.problems() == []
    assert r.statements["s1"].total == pytest.approx(0.40 - 0.2 * RETAIL)
    assert r.statements["s4"].total == pytest.approx(0.3 * FIT)
    assert r.retailer_net == pytest.approx(-0.2 * RETAIL + 0.3 * FIT)
    assert r.total == pytest.approx(sum(s.total for s in r.statements.values()))
    # Books that do not balance are reported, each in one sentence.
    bad = settle_interval({"s1": Award(2.0, 0.40), "s2": Award(-1.0, -0.30)}, {}, T)
    assert [p.split(":")[0] for p in bad.problems()] == [
        "awarded energy does not balance", "award money does not balance"]
    # Under pay-as-bid the operator's surplus closes the money balance.
    pab = settle_interval({"s1": Award(1.0, 0.15), "s2": Award(-1.0, -0.25)}, {}, T,
                          operator_surplus=0.10)
    assert pab.problems() == []


# (price, kWh, site); even sites buy, odd sites sell (the operator refuses a site's own
# crossing curves, so a site never trades with itself).
step = st.tuples(st.floats(FIT, RETAIL), st.floats(0.0, 5.0), st.integers(0, 5))


@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=30), st.sampled_from(["uniform", "pay_as_bid"]),
       st.lists(st.floats(-10.0, 10.0), min_size=6, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_statements_are_consistent_with_any_clearing(rows: list[tuple[float, float, int]],
                                                    mechanism: str, meter_draw: list[float],
                                                    exact: list[bool]) -> None:
    steps = BidSteps.from_kwh(site=[r[2] for r in rows], bid=[0] * len(rows),
                              side=[SELL if r[2] % 2 else BUY for r in rows],
                              price=[r[0] for r in rows], quantity_kwh=[r[1] for r in rows],
                              seq=np.arange(len(rows)))
    c = clear(steps, floor=FIT, cap=RETAIL, mechanism=mechanism)  # type: ignore[arg-type]
    awards = {f"s{s}": Award(export_kwh=-wh / 1000, amount=-amt)
              for s, wh, amt in zip(c.sites.tolist(), c.site_net_wh.tolist(),
                                    c.site_net_amount.tolist(), strict=True)}
    # Some sites deliver exactly their award, the others anything.
    metered = {s: (a.export_kwh if exact[i % 6] else meter_draw[i % 6])
               for i, (s, a) in enumerate(sorted(awards.items()))}
    r = settle_interval(awards, metered, T, operator_surplus=c.surplus)

    assert r.problems() == []  # sold == bought, money balances (with the operator's surplus)
    assert r.missing == ()
    for s, stmt in r.statements.items():
        assert stmt.total == pytest.approx(stmt.award_amount + stmt.deviation_amount)
        assert stmt.deviation_kwh == pytest.approx(metered[s] - awards[s].export_kwh, abs=1e-9)
        a, d = stmt.awarded_export_kwh, stmt.deviation_kwh
        if (a > 0 and d >= 0) or (a < 0 and d <= 0) or a == 0:
            # Sold at least what it sold, or bought at least what it bought: never worse off
            # than with the retailer alone.
            assert stmt.benefit >= -1e-9
        if d == 0:
            assert stmt.total == pytest.approx(stmt.award_amount)
        # Award prices lie within [feed-in, retail], so the market moves a bill by at most the
        # tariff spread on the awarded energy, whatever was metered.
        assert abs(stmt.benefit) <= abs(a) * (RETAIL - FIT) + 1e-9
    assert r.total == pytest.approx(
        math.fsum(s.award_amount for s in r.statements.values()) + r.retailer_net)
    # Everyone metered: the community pays the operator exactly its surplus.
    assert math.fsum(s.award_amount for s in r.statements.values()) == pytest.approx(
        -c.surplus, abs=1e-9)
