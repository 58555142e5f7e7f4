"""Household load forecast: a robust, recency-weighted day-type profile, in numpy.

Method (``forecast_load``), for each local day the horizon touches:

1. Bin the history (any resolution, any gaps) into local days x ``step_s`` slots (slot means).
   Samples that are NaN/inf, above ``max_w`` ("absurd") or in a flat (stuck) day are dropped;
   small negative values (meter timing skew in ``load = site + pv - battery``) are clipped to 0.
2. From the last ``window_days`` days, take the days of the same type (weekday / weekend), each
   weighted by ``0.5 ** (age / half_life_days)``. Per slot, the location estimate is
   ``mean_weight * weighted mean + (1 - mean_weight) * weighted median``: the median is MAE-optimal,
   the mean RMSE- and energy-optimal, and the mix balances them (see bench/forecast.py).
3. Shrink the same-type profile towards the all-days profile (``pool_days`` pseudo-days), which
   matters for weekends (few days); smooth over neighbouring slots (Gaussian, ``smooth_min``).
4. Shrink towards the standard profile (BDEW H25, ``prior.py``) scaled to the history's mean
   power, with ``prior_days`` pseudo-days. With no usable history at all the forecast is that
   prior at ``prior_annual_kwh``: this is the cold start of a new install.

Quantiles p10/p50/p90 are the weighted empirical quantiles of the same days, smoothed likewise
(``quantiles=False`` skips them: they cost about half the forecast, and the planner plans on the
point forecast only). All outputs are >= 0. Every dropped or clipped sample is counted in
``LoadForecast.dropped``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gateway.forecast.prior import prior_shape

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class LoadConfig:
    """Tuning of ``forecast_load``; the defaults were tuned on Richardson homes 0-9 only."""

    window_days: int = 56
    half_life_days: float = 42.0
    mean_weight: float = 1.0
    smooth_min: float = 30.0
    pool_days: float = 3.0
    prior_days: float = 0.5
    max_w: float = 45_000.0  # above a 3 x 63 A main fuse: not a household load
    negative_tolerance_w: float = 200.0  # below -this a sample is absurd, above it is clipped to 0
    flat_w: float = 1.0  # a day whose slot means span less than this is a stuck sensor
    prior_annual_kwh: float = 3500.0
    quantiles: tuple[float, float, float] = (0.1, 0.5, 0.9)

    def __post_init__(self) -> None:
        if self.window_days < 1 or self.half_life_days <= 0:
            raise ValueError("LoadConfig: window_days must be >= 1 and half_life_days > 0")
        if not 0.0 <= self.mean_weight <= 1.0:
            raise ValueError(f"LoadConfig: mean_weight must be in [0, 1], got {self.mean_weight}")
        if self.smooth_min < 0 or self.pool_days < 0 or self.prior_days < 0:
            raise ValueError("LoadConfig: smooth_min, pool_days, prior_days must be >= 0")
        if not self.max_w > 0 or not self.prior_annual_kwh > 0:
            raise ValueError("LoadConfig: max_w and prior_annual_kwh must be > 0")


@dataclass(frozen=True)
class LoadForecast:
    """A load forecast on a regular grid: slot ``i`` covers ``[start + i*step_s, +step_s)``.

    ``watts`` is the point forecast (mean W per slot) for the optimizer; ``p10/p50/p90`` are
    quantiles (``None`` when the forecast was made without them). ``source`` is "history",
    "prior" (no usable history) or "history+prior" (some slots had no history of their own).
    ``dropped`` counts rejected samples by reason.
    """

    start: float
    step_s: int
    watts: FloatArray
    p10: FloatArray | None
    p50: FloatArray | None
    p90: FloatArray | None
    history_days: int
    source: str
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def times(self) -> FloatArray:
        """Start time (epoch s) of every slot."""
        return self.start + self.step_s * np.arange(self.watts.size, dtype=np.float64)

    def energy_kwh(self) -> float:
        """Energy of the point forecast over the horizon, kWh."""
        return float(self.watts.sum()) * self.step_s / 3.6e6


def check_grid(step_s: int, horizon_s: int) -> None:
    """Raise ValueError unless ``step_s`` divides a day and ``horizon_s`` is whole steps."""
    if step_s < 60 or 86400 % step_s:
        raise ValueError(f"step_s must be >= 60 and divide 86400, got {step_s}")
    if horizon_s <= 0 or horizon_s % step_s:
        raise ValueError(f"horizon_s must be a positive multiple of step_s, got {horizon_s}")


def utc_offsets(t: FloatArray, tz: tzinfo | None) -> FloatArray:
    """UTC offset (s) of ``tz`` at each epoch time; one tz lookup per 15-minute bucket."""
    if tz is None or t.size == 0:
        return np.zeros(t.shape)
    buckets = np.floor(t / 900.0)
    uniq, inv = np.unique(buckets, return_inverse=True)
    offs = np.empty(uniq.size)
    for i, b in enumerate(uniq):
        moment = datetime.fromtimestamp(float(b) * 900.0, tz=UTC).astimezone(tz)
        off = moment.utcoffset()
        offs[i] = off.total_seconds() if off is not None else 0.0
    return offs[inv].reshape(t.shape)


def is_weekend(local_day: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Saturday or Sunday for days counted from 1970-01-01 (a Thursday) in local time."""
    return ((local_day + 3) % 7) >= 5


@dataclass
class _History:
    grid: FloatArray  # (days, slots) slot means, NaN where no data
    days: NDArray[np.int64]  # local day number of each row
    dropped: dict[str, int]


def _clean(
    t: FloatArray, w: FloatArray, cfg: LoadConfig
) -> tuple[FloatArray, FloatArray, dict[str, int]]:
    dropped = {"nan": 0, "absurd": 0, "negative_clipped": 0, "flat_days": 0}
    ok = np.isfinite(t) & np.isfinite(w)
    dropped["nan"] = int((~ok).sum())
    t, w = t[ok], w[ok]
    absurd = (w > cfg.max_w) | (w < -cfg.negative_tolerance_w)
    dropped["absurd"] = int(absurd.sum())
    t, w = t[~absurd], w[~absurd]
    neg = w < 0
    dropped["negative_clipped"] = int(neg.sum())
    return t, np.maximum(w, 0.0), dropped


def bin_history(
    timestamps: ArrayLike,
    watts: ArrayLike,
    *,
    step_s: int,
    until: float,
    days: int,
    tz: tzinfo | None = None,
    config: LoadConfig | None = None,
) -> _History:
    """Slot means of the ``days`` local days before the one containing ``until`` (and that day's
    samples before ``until``), cleaned as described in the module docstring."""
    cfg = config or LoadConfig()
    t = np.asarray(timestamps, dtype=np.float64).ravel()
    w = np.asarray(watts, dtype=np.float64).ravel()
    if t.shape != w.shape:
        raise ValueError(f"timestamps and watts differ in length: {t.size} vs {w.size}")
    until_day = math.floor((until + float(utc_offsets(np.array([until]), tz)[0])) / 86400)
    first_day = until_day - days
    # coarse pre-cut (offsets are within +-14 h) before the per-sample tz work
    keep = (t < until) & (t >= (first_day - 1) * 86400.0)
    t, w = t[keep], w[keep]
    t, w, dropped = _clean(t, w, cfg)
    local = t + utc_offsets(t, tz)
    day = np.floor(local / 86400.0).astype(np.int64)
    slot = ((local - day * 86400.0) // step_s).astype(np.int64)
    n_slots = 86400 // step_s
    n_days = days + 1
    row = day - first_day
    ok = (row >= 0) & (row < n_days)
    idx = row[ok] * n_slots + slot[ok]
    sums = np.bincount(idx, weights=w[ok], minlength=n_days * n_slots)
    counts = np.bincount(idx, minlength=n_days * n_slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(counts > 0, sums / counts, np.nan).reshape(n_days, n_slots)
    # A stuck sensor repeats one value: drop days whose observed slots (>= 4) are all equal.
    fin = np.isfinite(grid)
    n_obs = fin.sum(axis=1)
    span = np.max(grid, axis=1, where=fin, initial=-np.inf) - np.min(
        grid, axis=1, where=fin, initial=np.inf
    )
    flat = (n_obs >= 4) & (span < cfg.flat_w)
    dropped["flat_days"] = int(flat.sum())
    grid[flat] = np.nan
    return _History(grid, np.arange(first_day, first_day + n_days, dtype=np.int64), dropped)


def weighted_quantiles(x: FloatArray, w: FloatArray, qs: ArrayLike) -> FloatArray:
    """Per-column weighted quantiles of ``x`` (n, S) with row weights ``w`` (n,); NaN entries
    are ignored, all-NaN columns give NaN. Result shape (len(qs), S); linear interpolation
    between the weighted mid-points of the sorted values (Hazen's plotting positions)."""
    q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
    n, s = x.shape
    if n == 0:
        return np.full((q.size, s), np.nan)
    order = np.argsort(x, axis=0)  # NaNs sort last
    xs = np.take_along_axis(x, order, axis=0)
    ws = np.where(np.isfinite(xs), w[order], 0.0)
    total = ws.sum(axis=0)
    nvalid = np.isfinite(xs).sum(axis=0)
    safe_total = np.where(total > 0, total, 1.0)
    pos = (np.cumsum(ws, axis=0) - 0.5 * ws) / safe_total
    pos = np.where(ws > 0, pos, np.inf)
    cols = np.arange(s)
    out = np.empty((q.size, s))
    last = np.maximum(nvalid - 1, 0)
    for i, qi in enumerate(q):
        hi = np.minimum((pos < qi).sum(axis=0), last)
        lo = np.maximum(hi - 1, 0)
        p_lo, p_hi = pos[lo, cols], pos[hi, cols]
        x_lo, x_hi = xs[lo, cols], xs[hi, cols]
        with np.errstate(invalid="ignore"):  # inf - inf on columns with one value
            gap = p_hi - p_lo
        frac = np.where(
            (hi > lo) & np.isfinite(gap) & (gap > 0),
            np.clip((qi - p_lo) / np.where(gap > 0, gap, 1.0), 0.0, 1.0),
            1.0,
        )
        out[i] = np.where(total > 0, x_lo + frac * (x_hi - x_lo), np.nan)
        below = (total > 0) & (qi <= pos[0, cols])
        out[i] = np.where(below, xs[0, cols], out[i])
    return out


@lru_cache(maxsize=16)
def _smoothing_matrix(n: int, sigma_slots: float) -> FloatArray:
    """``K`` with ``(x @ K)[i] = sum_j k_j x[(i - j) mod n]`` over the Gaussian taps ``k_j``,
    ``|j| <= 3 sigma`` (at most half a day; at exactly half both taps land on one slot)."""
    half = min(math.ceil(3 * sigma_slots), n // 2)
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma_slots) ** 2)
    m = np.zeros((n, n))
    cols = np.arange(n)
    for j, kj in zip(range(-half, half + 1), k, strict=True):
        m[(cols - j) % n, cols] += kj
    m.setflags(write=False)
    return m


def smooth_slots(p: FloatArray, sigma_slots: float) -> FloatArray:
    """Gaussian smoothing along the last axis, wrapping midnight; NaN-aware."""
    if sigma_slots <= 0:
        return p
    # One product with a circulant matrix (cached per day length and width) instead of a
    # shifted copy per tap: every plan smooths a profile for each day of its horizon.
    k = _smoothing_matrix(p.shape[-1], float(sigma_slots))
    fin = np.isfinite(p)
    num = np.where(fin, p, 0.0) @ k
    den = fin.astype(np.float64) @ k
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-9, num / den, np.nan)


def _location(x: FloatArray, w: FloatArray, cfg: LoadConfig,
              quantiles: bool = True) -> tuple[FloatArray, FloatArray | None]:
    """(point estimate, quantiles (3, S) or None) per slot of the rows ``x`` weighted ``w``."""
    wt = np.where(np.isfinite(x), w[:, None], 0.0)
    tot = wt.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(tot > 0, (wt * np.nan_to_num(x)).sum(axis=0) / tot, np.nan)
    if cfg.mean_weight == 1.0 and not quantiles:
        return mean, None  # the median is weighted 0: not computed
    qs = weighted_quantiles(x, w, (0.5, *cfg.quantiles) if quantiles else (0.5,))
    point = cfg.mean_weight * mean + (1.0 - cfg.mean_weight) * qs[0]
    return point, (qs[1:] if quantiles else None)


def profile_for_day(
    hist: _History, target_day: int, step_s: int, cfg: LoadConfig, quantiles: bool = True
) -> tuple[FloatArray, FloatArray | None, FloatArray, str]:
    """(point, quantiles (3, S) or None if not ``quantiles``, prior scaled to the history,
    source) for one local day."""
    n_slots = 86400 // step_s
    age = (target_day - hist.days).astype(np.float64)
    use = (age >= 1) & (age <= cfg.window_days)
    # today's samples before the issue time count as the most recent day
    use |= age == 0
    grid, days, age = hist.grid[use], hist.days[use], np.maximum(age[use], 1.0)
    weekend = bool(is_weekend(np.array([target_day]))[0])
    shape = prior_shape(weekend, step_s)
    obs = np.isfinite(grid)
    # the prior's level: the history's mean power relative to the prior at the observed slots
    if obs.any():
        d_we = is_weekend(days)
        ref = np.where(d_we[:, None], prior_shape(True, step_s), prior_shape(False, step_s))
        level = float(grid[obs].sum() / max(ref[obs].sum(), 1e-9))
        level = min(max(level, 5.0), cfg.max_w / 4.0)
    else:
        level = cfg.prior_annual_kwh * 1000.0 / 8760.0
    prior = shape * level
    if not obs.any():
        q = np.vstack([prior * f for f in (0.35, 0.85, 2.2)])  # wide, right-skewed like loads
        return prior, (q if quantiles else None), prior, "prior"

    w = 0.5 ** ((age - 1.0) / cfg.half_life_days)
    same = is_weekend(days) == weekend
    sigma = cfg.smooth_min * 60.0 / step_s
    p_all, q_all = _location(grid, w, cfg, quantiles)
    if same.any():
        p_same, q_same = _location(grid[same], w[same], cfg, quantiles)
        n_same = (np.where(obs[same], w[same, None], 0.0)).sum(axis=0)
    else:
        p_same, q_same = p_all, q_all
        n_same = np.zeros(n_slots)
    # shrink the day-type profile towards the all-days one where the day type has few days
    k = cfg.pool_days
    point = smooth_slots(_shrink(p_same, n_same, p_all, k), sigma)
    # shrink towards the scaled prior; slots with no history at all take the prior
    n_all = (np.where(obs, w[:, None], 0.0)).sum(axis=0)
    point = _shrink(point, n_all, prior, cfg.prior_days)
    source = "history" if np.all(n_all > 0) else "history+prior"
    if q_same is None or q_all is None:
        return point, None, prior, source
    quant = smooth_slots(np.vstack([_shrink(q_same[i], n_same, q_all[i], k) for i in range(3)]),
                         sigma)
    quant = np.vstack(
        [
            _shrink(quant[i], n_all, prior * f, cfg.prior_days)
            for i, f in enumerate((0.35, 0.85, 2.2))
        ]
    )
    return point, quant, prior, source


def _shrink(x: FloatArray, n: FloatArray, target: FloatArray, k: float) -> FloatArray:
    """(n x + k target) / (n + k), with NaN x (no data) giving the target."""
    xv = np.where(np.isfinite(x), x, 0.0)
    nv = np.where(np.isfinite(x), n, 0.0)
    if k <= 0:
        return np.where(nv > 0, xv, target)
    return (nv * xv + k * target) / (nv + k)


def forecast_load(
    timestamps: ArrayLike,
    watts: ArrayLike,
    issue_time: float,
    *,
    step_s: int = 1800,
    horizon_s: int = 86400,
    tz: tzinfo | None = None,
    config: LoadConfig | None = None,
    quantiles: bool = True,
) -> LoadForecast:
    """Forecast the household load for ``horizon_s`` from the slot containing ``issue_time``.

    ``timestamps`` (epoch s) and ``watts`` are the store's history of load samples at any
    resolution, unsorted, with gaps and NaNs allowed; only samples before ``issue_time`` are used.
    ``tz`` sets the local day (midnight, weekday/weekend); ``None`` means UTC. Slots are aligned
    to local ``step_s`` boundaries. Raises ValueError only for an invalid grid or config, never
    for bad history (that is dropped, counted and, if nothing is left, replaced by the prior).
    Only the last ``config.window_days + 2`` days are read: pass no more than that (at 1-min
    resolution, 58 days are ~84k samples, ~5 ms on a desktop core). ``quantiles=False`` leaves
    ``p10/p50/p90`` as ``None`` (the point forecast is the same either way, at about half the
    cost).
    """
    cfg = config or LoadConfig()
    check_grid(step_s, horizon_s)
    if not math.isfinite(issue_time):
        raise ValueError(f"issue_time must be finite, got {issue_time}")
    issue_off = float(utc_offsets(np.array([issue_time]), tz)[0])
    start_local = math.floor((issue_time + issue_off) / step_s) * step_s
    start = start_local - issue_off
    n = horizon_s // step_s
    times = start + step_s * np.arange(n, dtype=np.float64)
    local = times + utc_offsets(times, tz)
    t_day = np.floor(local / 86400.0).astype(np.int64)
    t_slot = ((local - t_day * 86400.0) // step_s).astype(np.int64)

    hist = bin_history(
        timestamps,
        watts,
        step_s=step_s,
        until=issue_time,
        days=cfg.window_days + 1,
        tz=tz,
        config=cfg,
    )
    valid_days = int(np.isfinite(hist.grid).any(axis=1).sum())
    point = np.empty(n)
    quant = np.empty((3, n))
    sources = set()
    for d in np.unique(t_day):
        p, q, _prior, src = profile_for_day(hist, int(d), step_s, cfg, quantiles)
        sel = t_day == d
        point[sel] = p[t_slot[sel]]
        if q is not None:
            quant[:, sel] = q[:, t_slot[sel]]
        sources.add(src)
    point = np.maximum(np.nan_to_num(point, nan=0.0), 0.0)
    qs: list[FloatArray | None] = [None, None, None]
    if quantiles:
        quant = np.sort(np.maximum(np.nan_to_num(quant, nan=0.0), 0.0), axis=0)
        qs = [quant[0], quant[1], quant[2]]
    source = sources.pop() if len(sources) == 1 else "history+prior"
    return LoadForecast(
        start=float(start),
        step_s=step_s,
        watts=point,
        p10=qs[0],
        p50=qs[1],
        p90=qs[2],
        history_days=valid_days,
        source=source,
        dropped=hist.dropped,
    )
