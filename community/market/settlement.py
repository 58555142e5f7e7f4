"""Settlement of delivered energy against market awards. Pure maths, no I/O.

Sign convention (the site's side of the bill): energy + exported / - imported; money + credited to
the site / - charged to it.

For one site and one interval, with awarded net export ``a`` (+ sold, - bought) at award money
``A`` (+ received, - paid) and metered net export ``m``:

* the award settles as awarded: ``A``;
* the deviation ``d = m - a`` settles with the retailer: a surplus (``d > 0``, more exported or
  less imported than awarded) is credited at the feed-in tariff, a shortfall (``d < 0``) is charged
  at the retail import price: ``D = d * feed_in`` if ``d > 0`` else ``d * retail``;
* ``total = A + D``.

``retailer_only`` is what ``m`` alone would settle at with the retailer (``m * feed_in`` if
``m > 0`` else ``m * retail``): the site's benefit from the market is ``total - retailer_only``.
With award prices within ``[feed_in, retail]`` (the auction's bounds) two properties hold (tested):
a site that honours its award in its direction (a seller exports at least what it sold, a buyer
imports at least what it bought) is never worse off than with the retailer alone, and in every
case ``|total - retailer_only| <= |a| * (retail - feed_in)``. A buyer that does not use what it
bought loses the spread on it: that is the price of a firm commitment.

Budget balance over an interval: awarded energy sums to zero (sold = bought), and award money sums
to minus the operator's surplus (zero under uniform pricing; what buyers paid above sellers'
offers under pay-as-bid). Deviations are the retailer's business, not the community's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

_EPS_KWH = 1e-9
_EPS_MONEY = 1e-6


@dataclass(frozen=True)
class Tariff:
    """The retailer's prices for the interval (currency per kWh), ``feed_in <= retail``."""

    feed_in: float
    retail: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.feed_in) and math.isfinite(self.retail)
                and self.feed_in <= self.retail):
            raise ValueError(f"tariff must be finite with feed_in <= retail, got "
                             f"feed_in={self.feed_in}, retail={self.retail}")

    def settle(self, export_kwh: float) -> float:
        """Money for ``export_kwh`` with the retailer: + credit at feed-in, - charge at retail."""
        return export_kwh * (self.feed_in if export_kwh > 0 else self.retail)


@dataclass(frozen=True)
class Award:
    """A site's award: ``export_kwh`` + sold / - bought; ``amount`` + received / - paid."""

    export_kwh: float = 0.0
    amount: float = 0.0

    @property
    def price(self) -> float | None:
        """Average price per kWh; None for an empty award."""
        return abs(self.amount / self.export_kwh) if self.export_kwh else None


@dataclass(frozen=True)
class Statement:
    """One site's settlement for one interval (signs: see the module docstring)."""

    site: str
    awarded_export_kwh: float
    award_price: float | None
    award_amount: float
    metered_export_kwh: float
    deviation_kwh: float
    deviation_amount: float
    total: float
    retailer_only: float

    @property
    def benefit(self) -> float:
        """What the market earned (or cost) the site against the retailer alone."""
        return self.total - self.retailer_only


def _finite(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return x


def settle_site(site: str, award: Award | None, metered_export_kwh: float,
                tariff: Tariff) -> Statement:
    """The statement of ``site`` (``award`` None = no award, everything with the retailer)."""
    a = award or Award()
    ax = _finite(f"{site}: awarded export", a.export_kwh)
    am = _finite(f"{site}: award amount", a.amount)
    m = _finite(f"{site}: metered export", metered_export_kwh)
    d = m - ax
    if abs(d) < _EPS_KWH:  # float noise of kWh arithmetic is not a deviation
        d = 0.0
    dev = tariff.settle(d)
    return Statement(site=site, awarded_export_kwh=ax, award_price=a.price, award_amount=am,
                     metered_export_kwh=m, deviation_kwh=d, deviation_amount=dev,
                     total=am + dev, retailer_only=tariff.settle(m))


@dataclass(frozen=True)
class IntervalSettlement:
    """Every statement of one interval, and the interval's balances.

    ``energy_imbalance_kwh``: sum of awarded export over the awarded sites (0 when sold = bought).
    ``money_imbalance``: sum of award amounts plus ``operator_surplus`` (0 when the operator's books
    balance). ``retailer_net``: sum of deviation amounts (money between sites and retailer).
    ``missing``: awarded sites without a meter reading (not settled).
    """

    statements: dict[str, Statement]
    energy_imbalance_kwh: float
    money_imbalance: float
    retailer_net: float
    total: float
    missing: tuple[str, ...] = field(default_factory=tuple)

    def problems(self, tol_kwh: float = _EPS_KWH, tol_money: float = _EPS_MONEY) -> list[str]:
        """Budget-balance violations, one sentence each; empty when the books balance."""
        out = []
        if abs(self.energy_imbalance_kwh) > tol_kwh:
            out.append(f"awarded energy does not balance: {self.energy_imbalance_kwh:+.6f} kWh")
        if abs(self.money_imbalance) > tol_money:
            out.append(f"award money does not balance: {self.money_imbalance:+.6f}")
        return out


def settle_interval(awards: Mapping[str, Award], metered: Mapping[str, float], tariff: Tariff,
                    *, operator_surplus: float = 0.0) -> IntervalSettlement:
    """Statements for every site with a meter reading; balances over all awards."""
    statements = {s: settle_site(s, awards.get(s), m, tariff) for s, m in sorted(metered.items())}
    missing = tuple(sorted(s for s, a in awards.items() if s not in metered
                           and (a.export_kwh or a.amount)))
    energy_sum = math.fsum(a.export_kwh for a in awards.values())
    money_sum = math.fsum(a.amount for a in awards.values())
    return IntervalSettlement(
        statements=statements,
        energy_imbalance_kwh=energy_sum,
        money_imbalance=money_sum + operator_surplus,
        retailer_net=math.fsum(s.deviation_amount for s in statements.values()),
        total=math.fsum(s.total for s in statements.values()),
        missing=missing,
    )
