"""Time-of-use tariff: price per step by local hour and day type."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.tariff import DEFAULT_TOU, Tariff, flat, hourly

MONDAY_0000_UTC = 1_700_438_400.0  # 2023-11-20 00:00 UTC, a Monday


def test_weekday_periods() -> None:
    imp, exp = DEFAULT_TOU.prices(MONDAY_0000_UTC, 24, 3600.0)
    assert imp[3] == 0.15 and imp[8] == 0.25 and imp[18] == 0.40 and imp[22] == 0.25
    assert imp[23] == 0.15
    assert np.all(exp == 0.08)


def test_weekend_has_no_peak() -> None:
    saturday = MONDAY_0000_UTC + 5 * 86_400
    imp, _ = DEFAULT_TOU.prices(saturday, 24, 3600.0)
    assert imp.max() == 0.25 and imp[18] == 0.25 and imp[2] == 0.15


def test_steps_take_the_price_of_the_hour_they_start_in_and_tz_shifts() -> None:
    imp, _ = DEFAULT_TOU.prices(MONDAY_0000_UTC + 16.5 * 3600, 4, 900.0)
    assert list(imp) == [0.25, 0.25, 0.40, 0.40]
    # 15:00 UTC is 17:00 at UTC+2: peak.
    imp_tz, _ = DEFAULT_TOU.prices(MONDAY_0000_UTC + 15 * 3600, 1, 3600.0, tz_offset_s=7200)
    assert imp_tz[0] == 0.40


def test_negative_feed_in_and_wrapping_periods() -> None:
    t = Tariff("dyn", hourly([(22, 6, 0.1)], 0.3), hourly([], 0.3), hourly([(11, 15, -0.05)], 0.07))
    imp, exp = t.prices(MONDAY_0000_UTC, 24, 3600.0)
    assert imp[23] == 0.1 and imp[5] == 0.1 and imp[6] == 0.3
    assert exp[12] == -0.05 and exp[16] == 0.07


def test_bad_tariffs_are_errors() -> None:
    with pytest.raises(ValueError, match="24 hourly prices"):
        Tariff("short", (0.1,) * 23, (0.1,) * 24, (0.0,) * 24)
    with pytest.raises(ValueError, match="not finite at hour 3"):
        Tariff("nan", (0.1,) * 3 + (float("nan"),) + (0.1,) * 20, (0.1,) * 24, (0.0,) * 24)
    with pytest.raises(ValueError, match="step_s"):
        flat("f", 0.2, 0.05).prices(0.0, 4, 0.0)
