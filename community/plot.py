"""The picture of a simulated community day (``hems demo --homes N`` writes it as a PNG).

Four panels on one page, the first three on a shared time axis (hours of the day, UTC):

1. **Community totals** (kW): PV (filled), load, battery charge/discharge (filled about zero),
   net grid exchange (import up, export down), the sum of the DSO limits in force, and the mean
   state of charge of the batteries on a twin axis.
2. **DSO envelope**: each home's grid flow as a percentage of the limit in force in that
   direction (import up, export down; one thin line per home, coloured by kind), the home closest
   to its limit at each instant in bold, and every breach (flow above limit + ``BREACH_TOL_W``) in
   red. A limit of 0 W has no percentage: within tolerance it reads 0 %, beyond it is a breach.
3. **Market**: clearing price per delivery interval as steps between the feed-in (floor) and
   retail (cap) prices, traded kWh as bars on a twin axis, intervals without trade marked.
4. **Bills** per home (grouped bars: community / no P2P / feed-in only), tick labels coloured by
   the home's kind. Left out when ``DaySeries.bills`` is empty.

matplotlib is imported inside :func:`render_day` only (the gateway never pays for it), and only
its Agg canvas is used (no pyplot, no global backend switch). :func:`to_json` / :func:`from_json`
round-trip a :class:`DaySeries` losslessly through JSON (NaN as ``null``, infinities as
``"inf"``/``"-inf"``), so a stored report can be re-plotted::

    python -m community.plot report.json out.png
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Arr: TypeAlias = NDArray[np.float64]
Mask: TypeAlias = NDArray[np.bool_]
# What a series field accepts: a plain sequence (JSON, tuples) or a numpy array (the demo).
FloatSeq: TypeAlias = Sequence[float] | NDArray[np.floating[Any]]

FORMAT = "hems.community.day/1"
DPI = 100
WIDTH_PX = 1600
HEIGHT_PX = 1800  # with the bills panel
HEIGHT_NO_BILLS_PX = 1400
# A flow counts as a breach only beyond this margin over the limit: meter noise and the
# controller's settling must not paint a compliant day red.
BREACH_TOL_W = 10.0
# The envelope panel shows utilisation up to this many percent; breaches beyond sit at the edge.
UTIL_CLIP_PCT = 130.0

KINDS = ("pv+battery", "pv", "none")
KIND_COLOURS = {"pv+battery": "#2a9d8f", "pv": "#e9a23b", "none": "#7d7d9c"}
UNKNOWN_KIND_COLOUR = "#444444"
BILL_KEYS = ("community", "no_p2p", "fit_only")
BILL_LABELS = {
    "community": "community (P2P market)",
    "no_p2p": "no P2P market",
    "fit_only": "feed-in tariff only",
}
BILL_COLOURS = {"community": "#1d6fa5", "no_p2p": "#9aa5b1", "fit_only": "#d9d2c3"}
_MISSING_MPL = "the picture needs matplotlib: pip install -e '.[sim]'"


@dataclass(frozen=True)
class HomeSeries:
    """One home's day, sampled on :attr:`DaySeries.t` (all powers in W).

    Signs follow ``drivers.natures``: load + consumption, PV + generation, battery + charge /
    - discharge, site + import / - export (``site_w = load_w - pv_w + battery_w``).
    ``soc_pct`` is NaN without a battery; ``export_limit_w`` / ``import_limit_w`` are the DSO's
    limits in force at each sample (NaN: no limit).
    """

    site: str
    kind: str  # "pv+battery" | "pv" | "none"
    load_w: FloatSeq
    pv_w: FloatSeq
    battery_w: FloatSeq
    site_w: FloatSeq
    soc_pct: FloatSeq
    export_limit_w: FloatSeq
    import_limit_w: FloatSeq


@dataclass(frozen=True)
class AuctionRow:
    """One delivery interval of the community market: ``[start, end)`` in Unix s, its clearing
    price (currency per kWh; ``None`` when nothing traded) and the traded volume in kWh."""

    start: float
    end: float
    price: float | None
    volume_kwh: float


@dataclass(frozen=True)
class DaySeries:
    """Everything the day's picture shows. ``t`` is ascending Unix s; ``bills`` maps a site to
    ``{"community": x, "no_p2p": y, "fit_only": z}`` (currency; may be empty)."""

    t: FloatSeq
    homes: Sequence[HomeSeries]
    auctions: Sequence[AuctionRow]
    price_floor: float  # feed-in tariff
    price_cap: float  # retail price
    bills: Mapping[str, Mapping[str, float]]
    title: str = ""
    # The verdict of a finer compliance check (the demo samples every 2 s; the picture's
    # samples are a minute apart and catch a few-second transient as a whole minute).
    compliance: str = ""


_HOME_FIELDS = ("load_w", "pv_w", "battery_w", "site_w", "soc_pct",
                "export_limit_w", "import_limit_w")


# ---------------------------------------------------------------------------------------------
# JSON round trip


def _enc(x: float) -> float | str | None:
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _dec(v: Any, where: str) -> float:
    if v is None:
        return math.nan
    if v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where}: expected a number, null, 'inf' or '-inf', got {v!r}")
    return float(v)


def _dec_list(v: Any, where: str) -> tuple[float, ...]:
    if not isinstance(v, list):
        raise ValueError(f"{where}: expected a list of numbers, got {type(v).__name__}")
    return tuple(_dec(x, f"{where}[{i}]") for i, x in enumerate(v))


def _field(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where}: missing {key!r}")
    return d[key]


def to_json(series: DaySeries) -> dict[str, Any]:
    """A JSON-ready dict of ``series`` (``json.dumps`` it as is). NaN becomes ``null``, +-inf
    ``"inf"``/``"-inf"``; an auction price of NaN is written as ``null`` (no trade)."""
    return {
        "format": FORMAT,
        "title": series.title,
        "compliance": series.compliance,
        "price_floor": _enc(series.price_floor),
        "price_cap": _enc(series.price_cap),
        "t": [_enc(x) for x in series.t],
        "homes": [
            {"site": h.site, "kind": h.kind,
             **{f: [_enc(x) for x in getattr(h, f)] for f in _HOME_FIELDS}}
            for h in series.homes
        ],
        "auctions": [
            {"start": _enc(a.start), "end": _enc(a.end),
             "price": None if a.price is None or math.isnan(a.price) else _enc(a.price),
             "volume_kwh": _enc(a.volume_kwh)}
            for a in series.auctions
        ],
        "bills": {str(site): {str(k): _enc(v) for k, v in b.items()}
                  for site, b in series.bills.items()},
    }


def from_json(d: Mapping[str, Any]) -> DaySeries:
    """The :class:`DaySeries` of a :func:`to_json` dict (sequences come back as tuples).

    Raises ``ValueError`` naming the first field that is missing or malformed.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"day series: expected a JSON object, got {type(d).__name__}")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise ValueError(f"day series: format {fmt!r} is not {FORMAT!r}")
    homes = []
    for i, h in enumerate(_field(d, "homes", "day series")):
        where = f"homes[{i}]"
        if not isinstance(h, Mapping):
            raise ValueError(f"{where}: expected an object")
        site, kind = _field(h, "site", where), _field(h, "kind", where)
        if not isinstance(site, str) or not isinstance(kind, str):
            raise ValueError(f"{where}: site and kind must be strings")
        arrays = {f: _dec_list(_field(h, f, where), f"{where}.{f}") for f in _HOME_FIELDS}
        homes.append(HomeSeries(site=site, kind=kind, **arrays))
    auctions = []
    for i, a in enumerate(_field(d, "auctions", "day series")):
        where = f"auctions[{i}]"
        if not isinstance(a, Mapping):
            raise ValueError(f"{where}: expected an object")
        price = _field(a, "price", where)
        auctions.append(AuctionRow(
            start=_dec(_field(a, "start", where), f"{where}.start"),
            end=_dec(_field(a, "end", where), f"{where}.end"),
            price=None if price is None else _dec(price, f"{where}.price"),
            volume_kwh=_dec(_field(a, "volume_kwh", where), f"{where}.volume_kwh")))
    bills_in = _field(d, "bills", "day series")
    if not isinstance(bills_in, Mapping):
        raise ValueError("bills: expected an object")
    bills: dict[str, dict[str, float]] = {}
    for site, b in bills_in.items():
        if not isinstance(b, Mapping):
            raise ValueError(f"bills[{site!r}]: expected an object")
        bills[site] = {k: _dec(v, f"bills[{site!r}].{k}") for k, v in b.items()}
    title = d.get("title", "")
    if not isinstance(title, str):
        raise ValueError("title: expected a string")
    compliance = d.get("compliance", "")
    if not isinstance(compliance, str):
        raise ValueError("compliance: expected a string")
    return DaySeries(
        t=_dec_list(_field(d, "t", "day series"), "t"),
        homes=tuple(homes),
        auctions=tuple(auctions),
        price_floor=_dec(_field(d, "price_floor", "day series"), "price_floor"),
        price_cap=_dec(_field(d, "price_cap", "day series"), "price_cap"),
        bills=bills,
        title=title,
        compliance=compliance,
    )


# ---------------------------------------------------------------------------------------------
# Pure helpers (no matplotlib)


@dataclass(frozen=True)
class _Home:
    site: str
    kind: str
    load: Arr
    pv: Arr
    bat: Arr
    site_w: Arr
    soc: Arr
    exp_lim: Arr
    imp_lim: Arr


def _checked(series: DaySeries) -> tuple[Arr, list[_Home]]:
    t = np.asarray(series.t, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise ValueError("day series: t must be a non-empty 1-D sequence of Unix seconds")
    if not np.all(np.isfinite(t)):
        raise ValueError("day series: t has non-finite values")
    if np.any(np.diff(t) < 0):
        raise ValueError("day series: t must be ascending")
    homes = []
    for h in series.homes:
        arrs = {}
        for f in _HOME_FIELDS:
            a = np.asarray(getattr(h, f), dtype=float)
            if a.shape != t.shape:
                raise ValueError(f"home {h.site!r}: {f} has {a.size} samples, t has {t.size}")
            arrs[f] = a
        homes.append(_Home(h.site, h.kind, arrs["load_w"], arrs["pv_w"], arrs["battery_w"],
                           arrs["site_w"], arrs["soc_pct"], arrs["export_limit_w"],
                           arrs["import_limit_w"]))
    return t, homes


def _energy_kwh(x_h: Arr, p_w: Arr) -> float:
    """Trapezoidal energy of a power series (W over hours) in kWh, NaN samples as 0."""
    if x_h.size < 2:
        return 0.0
    p = np.nan_to_num(p_w)
    return float(np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(x_h)) / 1000.0)


def utilisation_pct(site_w: Arr, export_limit_w: Arr, import_limit_w: Arr,
                    tol_w: float = BREACH_TOL_W) -> tuple[Arr, Mask]:
    """Signed use of the DSO limit in force and the breach mask, per sample.

    Import (``site_w >= 0``) is ``site_w / import_limit * 100`` (positive), export is
    ``site_w / export_limit * 100`` (negative). NaN where no limit applies in the flow's
    direction. A limit <= 0 W has no percentage: 0 within ``tol_w``, else +-infinity.
    A breach is a flow more than ``tol_w`` over its limit.
    """
    importing = site_w >= 0
    limit = np.where(importing, import_limit_w, export_limit_w)
    flow = np.abs(site_w)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(importing, 1.0, -1.0) * flow / limit * 100.0
    breach = np.isfinite(limit) & (flow > limit + tol_w) & np.isfinite(flow)
    tight = np.isfinite(limit) & (limit <= 0)
    u = np.where(tight & ~breach, 0.0, u)
    u = np.where(tight & breach, np.where(importing, np.inf, -np.inf), u)
    u = np.where(np.isfinite(flow), u, np.nan)
    return u, breach


def _hhmm(h: float) -> str:
    m = round(h * 60.0)
    return f"{(m // 60) % 24:02d}:{m % 60:02d}"


def _tick_step_h(span_h: float) -> float:
    for limit, step in ((1.0, 0.25), (3.0, 0.5), (8.0, 1.0), (16.0, 2.0), (30.0, 3.0)):
        if span_h <= limit:
            return step
    return 6.0


def _nan_joined(xs: Arr, ys: list[Arr]) -> tuple[Arr, Arr]:
    """Many series on one x as one NaN-separated polyline (one artist instead of N lines)."""
    if not ys:
        return np.empty(0), np.empty(0)
    gap = np.array([np.nan])
    x = np.concatenate([np.concatenate([xs, gap]) for _ in ys])
    y = np.concatenate([np.concatenate([y, gap]) for y in ys])
    return x, y


def _nansum(stack: Arr) -> Arr:
    """Sum over homes where at least one home has a value, NaN elsewhere."""
    any_val = np.any(np.isfinite(stack), axis=0)
    return np.where(any_val, np.nansum(stack, axis=0), np.nan)


# ---------------------------------------------------------------------------------------------
# Panels


def _panel_totals(ax: Axes, x: Arr, homes: list[_Home]) -> None:
    n = x.size
    zeros = np.zeros(n)

    def total(attr: str) -> Arr:
        if not homes:
            return zeros
        return np.nansum([getattr(h, attr) for h in homes], axis=0) / 1000.0

    load, pv, bat, grid = total("load"), total("pv"), total("bat"), total("site_w")
    ax.fill_between(x, 0, pv, color="#f4c542", alpha=0.45, lw=0, label="PV generation")
    ax.plot(x, pv, color="#d9a400", lw=1.0)
    ax.fill_between(x, 0, bat, where=bat >= 0, color="#2a9d8f", alpha=0.55, lw=0,
                    interpolate=True, label="battery charge")
    ax.fill_between(x, 0, bat, where=bat < 0, color="#8e5ea2", alpha=0.55, lw=0,
                    interpolate=True, label="battery discharge")
    ax.plot(x, load, color="#222222", lw=1.6, label="load")
    ax.plot(x, grid, color="#c0392b", lw=2.2, label="grid (import + / export −)")
    ax.axhline(0, color="#555555", lw=0.8)

    lo = min(float(np.nanmin(np.r_[grid, bat, 0.0])), 0.0)
    hi = max(float(np.nanmax(np.r_[load, pv, grid, bat, 0.0])), 0.0)
    rng = max(hi - lo, 1e-3)
    if homes:
        exp_sum = _nansum(np.array([h.exp_lim for h in homes])) / 1000.0
        imp_sum = _nansum(np.array([h.imp_lim for h in homes])) / 1000.0
        if np.any(np.isfinite(exp_sum)):
            ax.plot(x, -exp_sum, color="#c0392b", lw=1.1, ls="--",
                    label="Σ export limits in force (−)")
        if np.any(np.isfinite(imp_sum)):
            ax.plot(x, imp_sum, color="#6c3483", lw=1.1, ls="--",
                    label="Σ import limits in force")
        # The summed limits may sit far beyond the flows (50 homes x 5 kW default); let them
        # stretch the axis a little, not squash the day into a sliver.
        env = np.r_[-exp_sum, imp_sum]
        env = env[np.isfinite(env)]
        if env.size:
            lo = max(min(lo, float(env.min())), lo - 0.4 * rng)
            hi = min(max(hi, float(env.max())), hi + 0.4 * rng)
    rng = max(hi - lo, 1e-3)
    ax.set_ylim(lo - 0.06 * rng, hi + 0.3 * rng)  # headroom: the legend lives up there

    e_load, e_pv = _energy_kwh(x, load * 1000), _energy_kwh(x, pv * 1000)
    e_imp = _energy_kwh(x, np.clip(grid, 0, None) * 1000)
    e_exp = _energy_kwh(x, np.clip(-grid, 0, None) * 1000)
    e_ch = _energy_kwh(x, np.clip(bat, 0, None) * 1000)
    e_dis = _energy_kwh(x, np.clip(-bat, 0, None) * 1000)
    ax.set_title(
        f"Community totals — load {e_load:,.1f} kWh · PV {e_pv:,.1f} kWh · battery "
        f"+{e_ch:,.1f} / −{e_dis:,.1f} kWh · grid import {e_imp:,.1f} kWh, "
        f"export {e_exp:,.1f} kWh", loc="left", fontsize=12)
    ax.set_ylabel("power (kW)")
    ax.legend(loc="upper left", fontsize=9, ncol=4, framealpha=0.9)


def _panel_soc(ax: Axes, x: Arr, homes: list[_Home]) -> None:
    socs = [h.soc for h in homes if np.any(np.isfinite(h.soc))]
    ax.set_ylim(0, 100)
    ax.set_yticks([0, 50, 100])
    ax.set_ylabel("SoC (%)")
    if not socs:
        ax.set_title("Batteries — state of charge", loc="left", fontsize=12)
        ax.text(0.5, 0.5, "no batteries", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="#555555")
        return
    stack = np.array(socs)
    finite = np.isfinite(stack)
    counts = np.sum(finite, axis=0)
    some = counts > 0
    mean = np.where(some, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    lo = np.where(some, np.min(np.where(finite, stack, np.inf), axis=0), np.nan)
    hi = np.where(some, np.max(np.where(finite, stack, -np.inf), axis=0), np.nan)
    ax.fill_between(x, lo, hi, color="#2a9d8f", alpha=0.25, lw=0, label="lowest … highest")
    ax.plot(x, mean, color="#1f6f65", lw=1.6, label="mean")
    n = len(socs)
    ax.set_title(f"Batteries — state of charge ({n} batter{'y' if n == 1 else 'ies'})",
                 loc="left", fontsize=12)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=9, ncol=2,
              frameon=False)


def _panel_envelope(ax: Axes, x: Arr, homes: list[_Home], compliance: str = "") -> None:
    ax.set_ylabel("grid flow, % of limit in force")
    ax.set_title("DSO envelope — each home's grid flow against its own limit in force "
                 "(import up, export down)", loc="left", fontsize=12)
    results = [(h, *utilisation_pct(h.site_w, h.exp_lim, h.imp_lim)) for h in homes]
    limited = [r for r in results
               if np.any(np.isfinite(r[0].exp_lim)) or np.any(np.isfinite(r[0].imp_lim))]
    ax.axhspan(100, UTIL_CLIP_PCT + 10, color="#c0392b", alpha=0.07, lw=0)
    ax.axhspan(-UTIL_CLIP_PCT - 10, -100, color="#c0392b", alpha=0.07, lw=0)
    ax.axhline(100, color="#6c3483", lw=1.0, ls="--")
    ax.axhline(-100, color="#c0392b", lw=1.0, ls="--")
    ax.axhline(0, color="#555555", lw=0.8)
    ax.text(1.003, 100, "import\nlimit", transform=ax.get_yaxis_transform(), va="center",
            fontsize=8, color="#6c3483")
    ax.text(1.003, -100, "export\nlimit", transform=ax.get_yaxis_transform(), va="center",
            fontsize=8, color="#c0392b")
    # The band above the clip line holds the legend and the verdict, clear of any data.
    ax.set_ylim(-UTIL_CLIP_PCT - 8, UTIL_CLIP_PCT + 55)
    ax.set_yticks([-125, -100, -75, -50, -25, 0, 25, 50, 75, 100, 125])
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{abs(v):.0f}%")
    if not limited:
        ax.text(0.5, 0.5, "no DSO limits in force", transform=ax.transAxes,
                ha="center", va="center", fontsize=13, color="#555555")
        return

    clip = UTIL_CLIP_PCT
    alpha = float(np.clip(2.0 / math.sqrt(len(limited)), 0.25, 0.9))
    for kind in [*KINDS, *sorted({h.kind for h, _, _ in limited} - set(KINDS))]:
        ys = [np.clip(u, -clip, clip) for h, u, _ in limited if h.kind == kind]
        if not ys:
            continue
        xs, yy = _nan_joined(x, ys)
        ax.plot(xs, yy, lw=0.8, alpha=alpha, color=KIND_COLOURS.get(kind, UNKNOWN_KIND_COLOUR),
                label=f"{kind} ({len(ys)})")
    stack = np.clip(np.array([u for _, u, _ in limited]), -clip, clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no home limited
        up = np.nanmax(np.where(stack > 0, stack, np.nan), axis=0)
        down = np.nanmin(np.where(stack < 0, stack, np.nan), axis=0)
    ax.plot(x, up, color="#222222", lw=1.4, label="closest to its limit")
    ax.plot(x, down, color="#222222", lw=1.4)

    breach = np.array([b for _, _, b in limited])
    any_breach = np.any(breach, axis=0)
    if np.any(any_breach):
        ax.fill_between(x, 0, 1, where=any_breach, transform=ax.get_xaxis_transform(),
                        color="#e74c3c", alpha=0.18, lw=0, step="mid")
        bx = np.concatenate([x[b] for b in breach])
        by = np.concatenate([s[b] for s, b in zip(stack, breach, strict=True)])
        ax.scatter(bx, by, s=14, color="#e41a1c", zorder=5, label="breach")
        worst_w, worst = -math.inf, ("", 0.0, 0.0, 0.0)
        for h, _, b in limited:
            if not np.any(b):
                continue
            lim = np.where(h.site_w >= 0, h.imp_lim, h.exp_lim)
            over = np.where(b, np.abs(h.site_w) - lim, -np.inf)
            i = int(np.argmax(over))
            if over[i] > worst_w:
                worst_w, worst = float(over[i]), (h.site, float(x[i]), float(h.site_w[i]),
                                                  float(lim[i]))
        n_homes = int(np.sum(np.any(breach, axis=1)))
        site, wx, flow, lim_w = worst
        msg = (f"{n_homes} home{'s' if n_homes != 1 else ''} over the limit in "
               f"{int(np.sum(any_breach))} of {x.size} samples; worst: {site} "
               f"{'imports' if flow >= 0 else 'exports'} {abs(flow) / 1000:.2f} kW against "
               f"{lim_w / 1000:.2f} kW at {_hhmm(wx)} UTC")
        colour = "#b71c1c"
    else:
        msg = f"no breach: all {len(limited)} homes with a limit stayed within it " \
              f"(+{BREACH_TOL_W:.0f} W)"
        colour = "#1b7837"
    if compliance:
        msg = f"{msg}\n{compliance}"
    ax.text(0.995, 0.975, msg, transform=ax.transAxes, ha="right", va="top", fontsize=10,
            color=colour, bbox={"facecolor": "white", "edgecolor": colour, "alpha": 0.9})
    leg = ax.legend(loc="upper left", fontsize=9, ncol=5, framealpha=0.9)
    for line in leg.get_lines():  # the faint many-homes alpha would hide the key itself
        line.set_alpha(1.0)
        line.set_linewidth(2.0)


def _panel_market(ax: Axes, series: DaySeries, day0: float) -> None:
    floor, cap = float(series.price_floor), float(series.price_cap)
    ax.set_title("Community market — clearing price per delivery interval, traded volume",
                 loc="left", fontsize=12)
    ax.set_ylabel("price (per kWh)")
    ax.axhline(floor, color="#1b7837", lw=1.1, ls="--")
    ax.axhline(cap, color="#b71c1c", lw=1.1, ls="--")
    ax.text(0.002, floor, f" feed-in {floor:g}", transform=ax.get_yaxis_transform(),
            va="bottom", fontsize=9, color="#1b7837")
    ax.text(0.002, cap, f" retail {cap:g}", transform=ax.get_yaxis_transform(),
            va="bottom", fontsize=9, color="#b71c1c")
    rows = sorted(series.auctions, key=lambda a: a.start)
    prices = [float(a.price) for a in rows
              if a.price is not None and math.isfinite(float(a.price))]
    lo, hi = min([floor, cap, *prices]), max([floor, cap, *prices])
    pad = 0.12 * max(hi - lo, 1e-6)
    ax.set_ylim(lo - pad, hi + 3.5 * pad)  # prices never pass the cap: legend band above it
    if not rows:
        ax.text(0.5, 0.5, "no auctions held", transform=ax.transAxes, ha="center",
                va="center", fontsize=13, color="#555555")
        return

    starts = (np.array([a.start for a in rows], dtype=float) - day0) / 3600.0
    ends = (np.array([a.end for a in rows], dtype=float) - day0) / 3600.0
    vols = np.array([a.volume_kwh for a in rows], dtype=float)
    ax2 = ax.twinx()
    ax2.bar(starts, vols, width=ends - starts, align="edge", color="#8fb8de", alpha=0.75,
            edgecolor="#5b8db8", lw=0.4, label="traded (right)")
    ax2.set_ylabel("traded (kWh per interval)")
    vmax = float(np.nanmax(vols)) if np.any(np.isfinite(vols)) else 0.0
    ax2.set_ylim(0, vmax * 1.9 if vmax > 0 else 1.0)  # bars in the lower half, under the prices
    # The price axis draws over the bars of its twin.
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)

    px: list[float] = []
    py: list[float] = []
    prev_end: float | None = None
    for s, e, a in zip(starts, ends, rows, strict=True):
        p = a.price
        if p is None or not math.isfinite(p):
            prev_end = None
            continue
        if prev_end is not None and abs(s - prev_end) > 1e-9:
            px.append(math.nan)
            py.append(math.nan)
        px += [float(s), float(e)]
        py += [float(p), float(p)]
        prev_end = float(e)
    ax.plot(px, py, color="#1d3557", lw=2.0, label="clearing price")
    none_x = [0.5 * (s + e) for s, e, a in zip(starts, ends, rows, strict=True)
              if a.price is None or not math.isfinite(a.price)]
    if none_x:
        ax.plot(none_x, [lo - 0.6 * pad] * len(none_x), ls="none", marker="x", ms=5,
                color="#888888", label="no trade")
    total = float(np.nansum(vols))
    traded = [a for a in rows if a.price is not None and math.isfinite(a.price)]
    if traded:
        vw = sum(float(a.price) * a.volume_kwh for a in traded if a.price is not None)
        vsum = sum(a.volume_kwh for a in traded)
        avg = f", volume-weighted price {vw / vsum:.4g}" if vsum > 0 else ""
    else:
        avg = ""
    ax.text(0.995, 0.96, f"{len(traded)} of {len(rows)} intervals traded, "
            f"{total:,.1f} kWh{avg}", transform=ax.transAxes, ha="right", va="top",
            fontsize=10, bbox={"facecolor": "white", "edgecolor": "#999999", "alpha": 0.9})
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=9, ncol=3, framealpha=0.9)


def _panel_bills(ax: Axes, series: DaySeries) -> None:
    from matplotlib.patches import Patch

    kinds = {h.site: h.kind for h in series.homes}
    order = [h.site for h in series.homes if h.site in series.bills]
    order += [s for s in series.bills if s not in kinds]
    keys = [k for k in BILL_KEYS if any(k in series.bills[s] for s in order)]
    keys += sorted({k for s in order for k in series.bills[s]} - set(BILL_KEYS))
    n, m = len(order), max(len(keys), 1)
    width = 0.8 / m
    xs = np.arange(n, dtype=float)
    for j, k in enumerate(keys):
        vals = np.array([series.bills[s].get(k, math.nan) for s in order], dtype=float)
        ax.bar(xs - 0.4 + width * (j + 0.5), vals, width=width,
               color=BILL_COLOURS.get(k, f"C{j}"), edgecolor="#555555", lw=0.3,
               label=BILL_LABELS.get(k, k))
    ax.axhline(0, color="#555555", lw=0.8)
    ax.set_xticks(xs)
    rot, fs = (0, 10) if n <= 12 else (90, 9 if n <= 30 else 7)
    ax.set_xticklabels(order, rotation=rot, fontsize=fs)
    for lab, s in zip(ax.get_xticklabels(), order, strict=True):
        lab.set_color(KIND_COLOURS.get(kinds.get(s, ""), UNKNOWN_KIND_COLOUR))
    ax.set_xlim(-0.6, n - 0.4)
    vals_all = np.array([v for s in order for v in series.bills[s].values()], dtype=float)
    vals_all = vals_all[np.isfinite(vals_all)]
    if vals_all.size:
        vlo, vhi = min(float(vals_all.min()), 0.0), max(float(vals_all.max()), 0.0)
        span = max(vhi - vlo, 1e-6)
        ax.set_ylim(vlo - 0.05 * span * (vlo < 0), vhi + 0.22 * span)  # room for the legends
    ax.set_ylabel("bill for the day (currency; − = earned)")
    ax.grid(axis="y", alpha=0.3)

    def tot(k: str) -> float:
        return float(sum(series.bills[s].get(k, 0.0) for s in order))

    title = f"Bills per home ({n} homes)"
    if "community" in keys:
        title += f" — community total {tot('community'):,.2f}"
        for k, name in (("no_p2p", "no P2P"), ("fit_only", "feed-in only")):
            if k in keys:
                title += f"; saves {tot(k) - tot('community'):,.2f} vs {name}"
    ax.set_title(title, loc="left", fontsize=12)
    leg = ax.legend(loc="upper left", fontsize=9, ncol=len(keys), framealpha=0.85)
    ax.add_artist(leg)
    present = [k for k in KINDS if k in kinds.values()]
    present += sorted(set(kinds.values()) - set(KINDS))
    ax.legend([Patch(color=KIND_COLOURS.get(k, UNKNOWN_KIND_COLOUR)) for k in present],
              [f"label colour: {k}" for k in present], loc="upper right", fontsize=9,
              ncol=len(present), framealpha=0.85)


# ---------------------------------------------------------------------------------------------
# The figure


def render_day(series: DaySeries, path: str | Path) -> Path:
    """Draw ``series`` to a PNG at ``path`` and return that path.

    The image is ``WIDTH_PX`` x ``HEIGHT_PX`` (``HEIGHT_NO_BILLS_PX`` without bills). The file
    is written atomically (temporary file + rename). Raises ``RuntimeError`` when matplotlib is
    missing and ``ValueError`` naming the field when a series is malformed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator
    except ImportError as e:
        raise RuntimeError(_MISSING_MPL) from e

    t, homes = _checked(series)
    out = Path(path)
    # The day most samples are on (a first sample a minute before midnight names no day).
    day0 = math.floor(float(np.median(t)) / 86400.0) * 86400.0
    x = (t - day0) / 3600.0
    has_bills = bool(series.bills)
    height = HEIGHT_PX if has_bills else HEIGHT_NO_BILLS_PX

    fig = Figure(figsize=(WIDTH_PX / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = [3.0, 1.0, 2.6, 2.2] + ([2.6] if has_bills else [])
    axes = fig.subplots(len(ratios), 1, gridspec_kw={"height_ratios": ratios})
    ax_tot, ax_soc, ax_env, ax_mkt = axes[0], axes[1], axes[2], axes[3]
    timed = (ax_tot, ax_soc, ax_env, ax_mkt)
    for ax in timed[1:]:
        ax.sharex(ax_tot)

    _panel_totals(ax_tot, x, homes)
    _panel_soc(ax_soc, x, homes)
    _panel_envelope(ax_env, x, homes, series.compliance)
    _panel_market(ax_mkt, series, day0)
    if has_bills:
        _panel_bills(axes[4], series)

    x0, x1 = float(x[0]), float(x[-1])
    if x1 - x0 < 1e-6:
        x0, x1 = x0 - 0.25, x1 + 0.25
    step = _tick_step_h(x1 - x0)
    ticks = np.arange(math.floor(x0 / step) * step, x1 + step / 2, step)
    for ax in timed:
        ax.set_xlim(x0, x1)
        ax.xaxis.set_major_locator(FixedLocator(ticks.tolist()))
        ax.xaxis.set_major_formatter(lambda v, _pos: _hhmm(v))
        ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.25)
    date = time.strftime("%Y-%m-%d", time.gmtime(day0))
    ax_mkt.set_xlabel(f"time of day (UTC, {date})")

    counts = {k: sum(1 for h in homes if h.kind == k) for k in dict.fromkeys(h.kind for h in homes)}
    mix = ", ".join(f"{v} {k}" for k, v in counts.items())
    title = series.title or "Community day"
    fig.suptitle(f"{title}\n{len(homes)} home{'s' if len(homes) != 1 else ''}"
                 f"{' (' + mix + ')' if mix else ''} · {date} UTC", fontsize=15)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m community.plot report.json out.png``: re-plot a stored day.

    The JSON file is a :func:`to_json` object, or an object holding one under ``"day"``.
    """
    import json

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m community.plot DAY.json OUT.png", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        d = json.load(f)
    if isinstance(d, dict) and "format" not in d and isinstance(d.get("day"), dict):
        d = d["day"]
    try:
        out = render_day(from_json(d), args[1])
    except (ValueError, RuntimeError) as e:
        print(f"community.plot: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
