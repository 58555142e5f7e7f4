"""DSO scenarios for the demo: the envelope "stress day" of one site, and what it expects.

The stress day (issue 4, item 6), relative to ``day_start`` (Unix s, e.g. local midnight):

* default control: export limit 5 kW, no import limit (the DSO's failsafe all day);
* 11:00-13:00 export limit 1.5 kW (midday: full sun, the feeder's voltage rises);
* 13:00-13:30 export limit 0 W (zero export);
* 17:30-19:30 import limit 2.5 kW (evening peak).

Windows are ``[start, end)``; ``created`` increases in that order (default first), starting at
``created_base`` (default ``day_start``): publish them no earlier than ``created_base - 300 s``
of the gateways' clock, or their clock-skew check refuses them.

:meth:`StressDay.limits_at` answers "which limits did the DSO ask for at ``t``" with the same
resolution rules as the gateway (``gateway.envelope.Schedule``, no fallback), for the demo's
compliance figures: measured site power against the limit it should have respected.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any

from community.dso import SiteSchedule, control_wire, default_wire
from gateway.envelope import (
    LIMIT_NAMES,
    Control,
    DefaultControl,
    EnvelopeConfig,
    LimitName,
    Limits,
    Schedule,
)

HOUR = 3600.0


@dataclass(frozen=True)
class Window:
    """One control of a scenario: ``limit`` = ``w`` watts from ``start_h`` to ``end_h`` hours
    after the day start."""

    name: str
    start_h: float
    end_h: float
    limit: LimitName
    w: float

    def __post_init__(self) -> None:
        if not 0 <= self.start_h < self.end_h:
            raise ValueError(f"window {self.name}: needs 0 <= start_h < end_h")
        if self.limit not in LIMIT_NAMES or not self.w >= 0:
            raise ValueError(f"window {self.name}: bad limit {self.limit} = {self.w}")


STRESS_WINDOWS: tuple[Window, ...] = (
    Window("midday-export-1500", 11.0, 13.0, "export_w", 1500.0),
    Window("export-zero", 13.0, 13.5, "export_w", 0.0),
    Window("evening-import-2500", 17.5, 19.5, "import_w", 2500.0),
)
DEFAULT_EXPORT_W = 5000.0


@dataclass(frozen=True)
class StressDay:
    """A site's scenario: the default and the controls the DSO publishes, and their meaning."""

    site: str
    day_start: float
    default: DefaultControl
    controls: tuple[Control, ...]

    @functools.cached_property
    def _resolver(self) -> Schedule:
        # No fallback: "unlimited" where the DSO set nothing, whatever a gateway's config says.
        s = Schedule(self.site, EnvelopeConfig(fallback=Limits()))
        s.set_default(self.default)
        for c in self.controls:
            s.add(c)
        return s

    def schedule(self) -> SiteSchedule:
        """For :class:`community.dso.DsoPublisher`."""
        return SiteSchedule(self.site, self.default, self.controls)

    @functools.cached_property
    def _edges(self) -> tuple[float, ...]:
        return tuple(sorted({t for c in self.controls for t in (c.start, c.start + c.duration_s)}))

    @functools.cached_property
    def _segments(self) -> tuple[Limits, ...]:
        # segment i is [edges[i-1], edges[i]) (open-ended at both ends); constant within, as
        # the resolver has no contact timeout
        e = self._edges
        at = (e[0] - 1.0, *e) if e else (self.day_start,)
        return tuple(self._resolver.active(t).limits for t in at)

    def limits_at(self, t: float) -> Limits:
        """The limits the DSO asked for at ``t`` (``None`` = not limited)."""
        # resolved once per segment: the observers ask every few domain seconds for every home
        return self._segments[bisect.bisect_right(self._edges, t)]

    def expected_limit(self, t: float, name: LimitName = "export_w") -> float | None:
        """One limit at ``t``: e.g. ``expected_limit(t, "export_w")`` in W, ``None`` = none."""
        return self.limits_at(t).get(name)

    def change_times(self) -> tuple[float, ...]:
        """Instants at which some limit changes (window starts and ends), sorted: where the demo
        measures the response time."""
        ts = sorted({t for c in self.controls for t in (c.start, c.end)})
        return tuple(t for t in ts if self.limits_at(t) != self.limits_at(t - 1e-3))

    def to_dict(self) -> dict[str, Any]:
        """Wire form of the default and controls (for the demo's report)."""
        return {"site": self.site, "day_start": self.day_start,
                "default": default_wire(self.default),
                "controls": [control_wire(c) for c in self.controls]}


def stress_day(
    site: str,
    day_start: float,
    *,
    default_export_w: float = DEFAULT_EXPORT_W,
    windows: tuple[Window, ...] = STRESS_WINDOWS,
    created_base: float | None = None,
) -> StressDay:
    """The stress day of ``site`` for the day starting at ``day_start`` (Unix s)."""
    base = day_start if created_base is None else created_base
    default = DefaultControl(id=f"{site[:40]}-default", site=site, created=base + 1.0,
                             export_w=float(default_export_w))
    controls = tuple(
        Control(id=f"{site[:40]}-{w.name}"[:64], site=site, created=base + 2.0 + i,
                start=day_start + w.start_h * HOUR, duration_s=(w.end_h - w.start_h) * HOUR,
                **{w.limit: float(w.w)})
        for i, w in enumerate(windows)
    )
    return StressDay(site, float(day_start), default, controls)
