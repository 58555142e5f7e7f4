"""Time-of-use tariffs: import and feed-in price per planning step.

Prices are in currency per kWh (EUR/kWh in the defaults). A tariff is a table of 24 hourly
prices for weekdays and 24 for weekends (import), plus 24 hourly feed-in prices (which may be
negative, as under some dynamic export tariffs). A step is priced by the local hour in which it
starts; local time is UTC shifted by a fixed ``tz_offset_s`` (no DST: the simulation runs in UTC
and a real install passes its current offset at each re-plan).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

HOURS = 24
_DAY_S = 86_400
# 1970-01-01 was a Thursday; with Monday = 0 that is weekday 3.
_EPOCH_WEEKDAY = 3


@dataclass(frozen=True)
class Tariff:
    """Hourly import prices (weekday/weekend) and hourly feed-in prices, per kWh."""

    name: str
    import_weekday: tuple[float, ...]
    import_weekend: tuple[float, ...]
    feed_in: tuple[float, ...]

    def __post_init__(self) -> None:
        for field in ("import_weekday", "import_weekend", "feed_in"):
            table = getattr(self, field)
            if len(table) != HOURS:
                raise ValueError(
                    f"tariff {self.name!r}: {field} needs {HOURS} hourly prices, got {len(table)}"
                )
            bad = [h for h, p in enumerate(table) if not math.isfinite(p)]
            if bad:
                raise ValueError(f"tariff {self.name!r}: {field} is not finite at hour {bad[0]}")

    def prices(
        self, start_s: float, steps: int, step_s: float, tz_offset_s: float = 0.0
    ) -> tuple[FloatArray, FloatArray]:
        """Return (import_price, export_price) for ``steps`` steps from Unix time ``start_s``.

        Each step takes the price of the local hour in which it starts.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"step_s must be a positive number of seconds, got {step_s}")
        if not (math.isfinite(start_s) and math.isfinite(tz_offset_s)):
            raise ValueError("start_s and tz_offset_s must be finite")
        local = start_s + tz_offset_s + step_s * np.arange(steps, dtype=np.float64)
        day = np.floor(local / _DAY_S).astype(np.int64)
        hour = np.floor((local - day * _DAY_S) / 3600).astype(np.int64) % HOURS
        weekend = (day + _EPOCH_WEEKDAY) % 7 >= 5
        imp = np.where(
            weekend, np.asarray(self.import_weekend)[hour], np.asarray(self.import_weekday)[hour]
        )
        exp = np.asarray(self.feed_in, dtype=np.float64)[hour]
        return imp.astype(np.float64), exp


def hourly(periods: Sequence[tuple[int, int, float]], default: float) -> tuple[float, ...]:
    """Build 24 hourly prices from ``(start_hour, end_hour, price)`` periods over a default.

    ``end_hour`` is exclusive; a period with ``end_hour <= start_hour`` wraps past midnight.
    Later periods override earlier ones.
    """
    table = [float(default)] * HOURS
    for start, end, price in periods:
        if not (0 <= start < HOURS and 0 <= end <= HOURS):
            raise ValueError(f"period hours must lie in 0..24, got ({start}, {end})")
        hours = range(start, end) if end > start else [*range(start, HOURS), *range(0, end)]
        for h in hours:
            table[h] = float(price)
    return tuple(table)


def flat(name: str, import_price: float, feed_in: float) -> Tariff:
    """A single-rate tariff (useful as a baseline and in tests)."""
    return Tariff(name, hourly([], import_price), hourly([], import_price), hourly([], feed_in))


# A typical residential time-of-use tariff: off-peak overnight, peak in the evening ramp.
DEFAULT_TOU = Tariff(
    name="tou-default",
    import_weekday=hourly([(7, 17, 0.25), (17, 21, 0.40), (21, 23, 0.25)], default=0.15),
    import_weekend=hourly([(7, 23, 0.25)], default=0.15),
    feed_in=hourly([], 0.08),
)
