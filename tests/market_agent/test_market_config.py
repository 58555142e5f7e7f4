"""The ``[market]`` config table."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, MarketConfig, parse_config

BASE: dict[str, Any] = {"site_id": "s1", "devices": [], "broker": {"url": "mqtt://127.0.0.1"}}


def test_absent_means_no_market_and_a_table_enables_it() -> None:
    assert parse_config(BASE).market == MarketConfig()
    m = parse_config({**BASE, "market": {"community": "c1", "prices": 6}}).market
    assert m.enabled and m.community == "c1" and m.prices == 6


@pytest.mark.parametrize(("table", "key"), [
    ({}, "market.community"),  # enabled (by presence) without a community
    ({"community": "a/b"}, "market.community"),
    ({"community": "c1", "prices": 1}, "market.prices"),
    ({"community": "c1", "price_floor": 0.4, "price_cap": 0.3}, "market.price_cap"),
    ({"community": "c1", "comunity": "x"}, "market.comunity"),
])
def test_bad_market_tables_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({**BASE, "market": {"enabled": True, **table}})


def test_fleet_spreads_parse_and_are_bounded() -> None:
    from gateway.market_agent import settings_from, site_fraction

    cfg = parse_config({**BASE, "market": {"community": "c1", "bid_spread_s": 120},
                        "planner": {"step_s": 900, "spread_s": 60}})
    assert settings_from(cfg.market).bid_spread_s == 120.0 and cfg.planner.spread_s == 60.0
    with pytest.raises(ConfigError, match=r"planner\.spread_s"):
        parse_config({**BASE, "planner": {"step_s": 900, "spread_s": 600}})  # > step/2
    fr = [site_fraction(f"home-{i:02d}") for i in range(50)]
    assert all(0.0 <= f < 1.0 for f in fr) and fr == [site_fraction(f"home-{i:02d}")
                                                       for i in range(50)]
    assert len({round(f, 2) for f in fr}) > 25  # spread, not clustered
