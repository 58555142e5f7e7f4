"""Double-auction clearing: hand-checkable cases, bad input, and hypothesis properties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from community.clearing import BUY, SELL, BidSteps, Clearing, clear

FLOOR, CAP = 0.08, 0.35


def steps(*rows: tuple[Any, ...]) -> BidSteps:
    """rows: (site, side, price, kWh[, seq]); seq defaults to the row index."""
    full = [r if len(r) == 5 else (*r, i) for i, r in enumerate(rows)]
    return BidSteps.from_kwh(
        site=[r[0] for r in full],
        bid=[f"b{r[4]}" for r in full],
        side=[r[1] for r in full],
        price=[r[2] for r in full],
        quantity_kwh=[r[3] for r in full],
        seq=[r[4] for r in full],
    )


def run(s: BidSteps, **kw: Any) -> Clearing:
    return clear(s, floor=FLOOR, cap=CAP, **kw)


# --------------------------------------------------------------------------- hand-checkable cases


def test_crossing_curves_partial_fill_of_marginal_buy() -> None:
    # Demand: 2 kWh @0.30, 1 @0.25, 1 @0.15. Supply: 1 @0.10, 1.5 @0.20, 1 @0.28.
    # Unit 2500 Wh: buy 0.25 >= sell 0.20; unit 2501: buy 0.25 < sell 0.28 -> Q = 2.5 kWh.
    # Marginal buy 0.25 is cut (so lo = 0.25), next sell 0.28: price = 0.25.
    s = steps(
        (1, BUY, 0.30, 2.0),
        (2, BUY, 0.25, 1.0),
        (3, BUY, 0.15, 1.0),
        (4, SELL, 0.10, 1.0),
        (5, SELL, 0.20, 1.5),
        (6, SELL, 0.28, 1.0),
    )
    r = run(s)
    assert r.volume_wh == 2500
    assert r.price == pytest.approx(0.25)
    assert r.fill_wh.tolist() == [2000, 500, 0, 1000, 1500, 0]
    assert r.sites.tolist() == [1, 2, 3, 4, 5, 6]
    assert r.site_net_wh.tolist() == [2000, 500, 0, -1000, -1500, 0]
    assert r.site_net_amount == pytest.approx([0.5, 0.125, 0.0, -0.25, -0.375, 0.0])
    assert r.buyers_pay == pytest.approx(0.625)
    assert r.sellers_receive == pytest.approx(0.625)
    assert np.isnan(r.step_price[[2, 5]]).all()


def test_single_buyer_single_seller_price_is_k_point_of_the_gap() -> None:
    s = steps((1, BUY, 0.30, 1.0), (2, SELL, 0.10, 1.0))
    assert run(s).price == pytest.approx(0.20)
    assert run(s, k=0.0).price == pytest.approx(0.10)
    assert run(s, k=1.0).price == pytest.approx(0.30)
    r = run(s, k=0.25)
    assert (r.price_low, r.price_high) == (0.10, 0.30)
    assert r.price == pytest.approx(0.15)
    assert r.volume_wh == 1000
    assert r.fill_wh.tolist() == [1000, 1000]


def test_excess_demand_price_goes_to_the_rationed_buyer() -> None:
    # The buyer is cut to 1 of 2 kWh: any price below 0.30 leaves it wanting more, so p = 0.30.
    r = run(steps((1, BUY, 0.30, 2.0), (2, SELL, 0.10, 1.0)))
    assert r.volume_wh == 1000
    assert r.price == 0.30
    assert r.fill_wh.tolist() == [1000, 1000]


def test_best_rejected_sell_caps_the_price() -> None:
    # Q = 1 kWh; marginal buy 0.30, marginal sell 0.10, rejected sell 0.20 -> [0.10, 0.20].
    r = run(steps((1, BUY, 0.30, 1.0), (2, SELL, 0.10, 1.0), (3, SELL, 0.20, 1.0)))
    assert (r.price_low, r.price_high) == (0.10, 0.20)
    assert r.price == pytest.approx(0.15)
    assert r.fill_wh.tolist() == [1000, 1000, 0]


def test_no_trade_when_best_buy_is_below_best_sell() -> None:
    r = run(steps((1, BUY, 0.15, 1.0), (1, BUY, 0.12, 2.0), (2, SELL, 0.20, 1.0)))
    assert r.volume_wh == 0
    assert r.price is None and r.price_low is None and r.price_high is None
    assert r.fill_wh.tolist() == [0, 0, 0]
    assert r.amount.tolist() == [0.0, 0.0, 0.0]
    assert r.site_net_wh.tolist() == [0, 0]
    assert r.buyers_pay == 0.0 and r.sellers_receive == 0.0


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [(1, BUY, 0.30, 1.0)],
        [(1, SELL, 0.10, 1.0)],
        [(1, BUY, 0.30, 0.0), (2, SELL, 0.10, 1.0)],
    ],
)
def test_one_sided_or_empty_market_does_not_trade(rows: list[tuple[Any, ...]]) -> None:
    r = run(steps(*rows))
    assert r.volume_wh == 0 and r.price is None
    assert int(r.fill_wh.sum()) == 0


def test_equal_prices_trade_at_that_price() -> None:
    r = run(steps((1, BUY, 0.20, 1.0), (2, SELL, 0.20, 1.0)))
    assert r.volume_wh == 1000 and r.price == 0.20


def test_exact_tie_split_pro_rata() -> None:
    # Three buyers at 0.25 want 1, 2, 1 kWh; 2 kWh on offer -> half each: 0.5, 1, 0.5.
    r = run(
        steps((1, BUY, 0.25, 1.0), (2, BUY, 0.25, 2.0), (3, BUY, 0.25, 1.0), (4, SELL, 0.10, 2.0))
    )
    assert r.fill_wh.tolist() == [500, 1000, 500, 2000]
    assert r.price == 0.25


def test_tie_remainder_goes_to_lowest_seq_whatever_the_row_order() -> None:
    # 1000 Wh among three equal 1000 Wh buys: 333 each, the odd Wh to seq 3 (lowest).
    rows = [(1, BUY, 0.25, 1.0, 7), (2, BUY, 0.25, 1.0, 3), (3, BUY, 0.25, 1.0, 5)]
    sell = (4, SELL, 0.10, 1.0, 9)
    r = run(steps(*rows, sell))
    assert r.fill_wh.tolist() == [333, 334, 333, 1000]
    r2 = run(steps(sell, rows[2], rows[0], rows[1]))
    assert r2.fill_wh.tolist() == [1000, 333, 333, 334]


def test_tie_remainder_goes_to_largest_remainder_first() -> None:
    # 2 Wh among 1 Wh and 2 Wh: exact shares 0.667 and 1.333 -> floors 0, 1; the spare Wh goes to
    # the larger remainder (the 1 Wh step), even though its seq is higher.
    r = run(steps((1, BUY, 0.25, 0.002, 0), (2, BUY, 0.25, 0.001, 1), (3, SELL, 0.10, 0.002, 2)))
    assert r.fill_wh.tolist() == [1, 1, 2]


def test_tied_sellers_are_rationed_too() -> None:
    r = run(steps((1, SELL, 0.12, 3.0), (2, SELL, 0.12, 1.0), (3, BUY, 0.30, 2.0)))
    assert r.fill_wh.tolist() == [1500, 500, 2000]
    assert r.price == 0.12


def test_pay_as_bid_amounts_and_operator_surplus() -> None:
    s = steps(
        (1, BUY, 0.30, 1.0),
        (2, BUY, 0.25, 1.0),
        (3, SELL, 0.10, 1.0),
        (4, SELL, 0.20, 1.0),
    )
    r = run(s, mechanism="pay_as_bid")
    assert r.volume_wh == 2000
    assert r.step_price.tolist() == [0.30, 0.25, 0.10, 0.20]
    assert r.amount == pytest.approx([0.30, 0.25, 0.10, 0.20])
    assert r.buyers_pay == pytest.approx(0.55)
    assert r.sellers_receive == pytest.approx(0.30)
    assert r.surplus == pytest.approx(0.25)
    assert r.price == pytest.approx(0.225)  # uniform reference: midpoint of [0.20, 0.25]
    u = run(s)
    assert u.fill_wh.tolist() == r.fill_wh.tolist()
    assert u.amount == pytest.approx([0.225] * 4)
    assert u.surplus == pytest.approx(0.0, abs=1e-12)


def test_per_site_net_award_sums_buys_and_sells_of_a_site() -> None:
    s = steps(
        (10, BUY, 0.30, 1.0),
        (10, BUY, 0.28, 1.0),
        (20, SELL, 0.10, 1.5),
        (20, BUY, 0.09, 1.0),  # site 20 also bids low to buy: not filled
        (30, SELL, 0.12, 1.0),
    )
    r = run(s)
    assert r.volume_wh == 2000
    assert r.sites.tolist() == [10, 20, 30]
    assert r.site_net_wh.tolist() == [2000, -1500, -500]
    assert r.site_net_kwh.tolist() == [2.0, -1.5, -0.5]
    assert float(r.site_net_amount.sum()) == pytest.approx(0.0, abs=1e-12)


def test_kwh_are_rounded_to_wh() -> None:
    s = BidSteps.from_kwh(
        site=[1, 2, 3], bid=[1, 2, 3], side=[BUY, BUY, SELL],
        price=[0.3, 0.3, 0.1], quantity_kwh=[0.0004, 0.0006, 1.0], seq=[0, 1, 2],
    )  # fmt: skip
    assert s.quantity_wh.tolist() == [0, 1, 1000]


# --------------------------------------------------------------------------- bad input


def _base(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        site=[1, 2, 3], bid=["a", "b", "c"], side=[BUY, SELL, SELL],
        price=[0.30, 0.10, 0.20], quantity_kwh=[1.0, 1.0, 1.0], seq=[0, 1, 2],
    )  # fmt: skip
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"side": [BUY, SELL, 0]}, r"step 2: side"),
        ({"price": [0.30, float("nan"), 0.2]}, r"step 1: price is not finite"),
        ({"quantity_kwh": [1.0, -1.0, 1.0]}, r"step 1: quantity is negative"),
        ({"quantity_kwh": [1.0, 1.0, float("inf")]}, r"step 2: quantity is not finite"),
        ({"seq": [4, 5, 4]}, r"step 2: seq is not unique"),
        ({"site": [1, 2]}, r"site: expected a 1-D array of 3 steps"),
        ({"quantity_kwh": [1.0, 2e6, 2e6]}, r"total sell quantity"),
    ],
)
def test_malformed_steps_are_rejected_naming_the_step(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BidSteps.from_kwh(**_base(**over))


def test_price_outside_floor_and_cap_is_rejected_naming_the_step() -> None:
    above = BidSteps.from_kwh(**_base(price=[0.30, 0.10, 0.36]))
    with pytest.raises(ValueError, match=r"step 2: price is above the cap 0.35 \(0\.36\)"):
        run(above)
    below = BidSteps.from_kwh(**_base(price=[0.05, 0.01, 0.2]))
    with pytest.raises(ValueError, match=r"step 0: price is below the floor .*2 steps in all"):
        run(below)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 1.5}, "k must be in"),
        ({"mechanism": "vickrey"}, "mechanism must be"),
        ({"floor": 0.4, "cap": 0.3}, "floor <= cap"),
        ({"floor": float("nan"), "cap": 0.3}, "finite"),
    ],
)
def test_bad_arguments_are_rejected(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"floor": FLOOR, "cap": CAP, **kw}
    with pytest.raises(ValueError, match=match):
        clear(BidSteps.from_kwh(**_base()), **args)


def test_fractional_wh_quantity_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"step 0: quantity_wh is not an integer"):
        BidSteps(
            site=np.array([1]), bid=np.array([1]), side=np.array([BUY]),
            price=np.array([0.2]), quantity_wh=np.array([1.5]), seq=np.array([0]),
        )  # fmt: skip


# --------------------------------------------------------------------------- properties

PRICE_GRID = [0.08, 0.10, 0.12, 0.15, 0.2, 0.25, 0.3, 0.35]  # few prices -> many ties


@st.composite
def markets(draw: st.DrawFn) -> BidSteps:
    n = draw(st.integers(0, 24))
    seq = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    grid = st.sampled_from(PRICE_GRID)
    free = st.floats(FLOOR, CAP, allow_nan=False)
    price = draw(st.lists(st.one_of(grid, grid, free), min_size=n, max_size=n))
    return BidSteps(
        site=np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=np.int64),
        bid=np.array([f"bid-{x}" for x in seq]),
        side=np.array(draw(st.lists(st.sampled_from([BUY, SELL]), min_size=n, max_size=n))),
        price=np.array(price, dtype=np.float64),
        quantity_wh=np.array(draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))),
        seq=np.array(seq, dtype=np.int64),
    )


def brute_force_volume(s: BidSteps) -> int:
    """Expand every step into 1 Wh units; count units while demand price >= supply price."""
    d = np.sort(np.repeat(s.price[s.side == BUY], s.quantity_wh[s.side == BUY]))[::-1]
    u = np.sort(np.repeat(s.price[s.side == SELL], s.quantity_wh[s.side == SELL]))
    m = min(d.size, u.size)
    ok = d[:m] >= u[:m]
    return int(m if ok.all() else np.argmin(ok))


mechanism_st = st.sampled_from(["uniform", "pay_as_bid"])
k_st = st.floats(0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(markets(), mechanism_st, k_st)
def test_clearing_invariants(s: BidSteps, mechanism: Any, k: float) -> None:
    r = clear(s, floor=FLOOR, cap=CAP, mechanism=mechanism, k=k)
    buy, sell = s.side == BUY, s.side == SELL
    filled = r.fill_wh > 0

    # fills within [0, quantity]; cleared supply == cleared demand == volume, exactly in Wh
    assert ((r.fill_wh >= 0) & (r.fill_wh <= s.quantity_wh)).all()
    assert int(r.fill_wh[buy].sum()) == int(r.fill_wh[sell].sum()) == r.volume_wh

    # efficiency: the largest volume at which demand price >= supply price
    assert r.volume_wh == brute_force_volume(s)

    # individual rationality: no buyer pays above its bid, no seller receives below its offer
    assert (r.step_price[filled & buy] <= s.price[filled & buy]).all()
    assert (r.step_price[filled & sell] >= s.price[filled & sell]).all()
    assert np.isnan(r.step_price[~filled]).all()
    assert (r.amount[~filled] == 0).all()

    # per-site awards are the signed sums of the sites' fills and amounts
    for site, net_wh, net_amount in zip(r.sites, r.site_net_wh, r.site_net_amount, strict=True):
        mine = s.site == site
        assert net_wh == int((s.side * r.fill_wh)[mine].sum())
        assert net_amount == pytest.approx(float((s.side * r.amount)[mine].sum()), abs=1e-12)
    assert int(r.site_net_wh.sum()) == 0

    if r.volume_wh == 0:
        assert r.price is None
        if buy.any() and sell.any():
            live = s.quantity_wh > 0
            if (live & buy).any() and (live & sell).any():
                assert s.price[live & buy].max() < s.price[live & sell].min()
        return
    assert r.price is not None and r.price_low is not None and r.price_high is not None
    assert FLOOR <= r.price_low <= r.price <= r.price_high <= CAP
    p = r.price

    # competitive equilibrium at p: better-priced steps full, worse-priced empty, partials at p
    full = r.fill_wh == s.quantity_wh
    assert full[buy & (s.price > p)].all() and not filled[buy & (s.price < p)].any()
    assert full[sell & (s.price < p)].all() and not filled[sell & (s.price > p)].any()

    # fair rationing: within each side's steps at price p, fills are within 1 Wh of pro-rata
    for side in (buy, sell):
        tied = side & (s.price == p) & (s.quantity_wh > 0)
        if tied.any():
            got = int(r.fill_wh[tied].sum())
            exact = got * s.quantity_wh[tied] / s.quantity_wh[tied].sum()
            assert (np.abs(r.fill_wh[tied] - exact) < 1).all()

    if mechanism == "uniform":
        assert (r.step_price[filled] == p).all()
        # budget balance: buyers pay exactly what sellers receive (to float rounding)
        assert r.buyers_pay == pytest.approx(r.sellers_receive, rel=1e-12, abs=1e-12)
    else:
        assert (r.step_price[filled] == s.price[filled]).all()
        assert r.surplus >= -1e-12
        assert r.surplus == r.buyers_pay - r.sellers_receive


@settings(max_examples=150, deadline=None)
@given(markets(), mechanism_st, k_st, st.randoms(use_true_random=False))
def test_row_order_does_not_matter(s: BidSteps, mechanism: Any, k: float, rnd: Any) -> None:
    perm = np.arange(len(s))
    rnd.shuffle(perm)
    shuffled = BidSteps(
        site=s.site[perm], bid=s.bid[perm], side=s.side[perm],
        price=s.price[perm], quantity_wh=s.quantity_wh[perm], seq=s.seq[perm],
    )  # fmt: skip
    a = clear(s, floor=FLOOR, cap=CAP, mechanism=mechanism, k=k)
    b = clear(shuffled, floor=FLOOR, cap=CAP, mechanism=mechanism, k=k)
    by_bid_a = dict(zip(s.bid.tolist(), a.fill_wh.tolist(), strict=True))
    by_bid_b = dict(zip(shuffled.bid.tolist(), b.fill_wh.tolist(), strict=True))
    assert by_bid_a == by_bid_b
    assert (a.price, a.volume_wh, a.buyers_pay, a.sellers_receive) == (
        b.price, b.volume_wh, b.buyers_pay, b.sellers_receive,
    )  # fmt: skip
    assert a.sites.tolist() == b.sites.tolist()
    assert a.site_net_wh.tolist() == b.site_net_wh.tolist()
    assert a.site_net_amount.tolist() == b.site_net_amount.tolist()


def test_large_random_market_keeps_the_invariants() -> None:
    rng = np.random.default_rng(7)
    n = 10_000
    side = rng.choice([BUY, SELL], n)
    price = np.round(rng.uniform(FLOOR, CAP, n), 3)  # 0.1 cent grid: ties at the margin
    s = BidSteps(
        site=rng.integers(0, 1000, n), bid=np.arange(n), side=side, price=price,
        quantity_wh=rng.integers(0, 2000, n), seq=rng.permutation(n),
    )  # fmt: skip
    r = clear(s, floor=FLOOR, cap=CAP)
    assert r.volume_wh == brute_force_volume(s) > 0
    assert int(r.fill_wh[side == BUY].sum()) == int(r.fill_wh[side == SELL].sum())
    assert r.price is not None
    assert (s.price[(r.fill_wh > 0) & (side == BUY)] >= r.price).all()
    assert (s.price[(r.fill_wh > 0) & (side == SELL)] <= r.price).all()
