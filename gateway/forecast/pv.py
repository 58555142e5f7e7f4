"""PV forecast from the site's own history and a clear-sky model, or from an external forecast.

Method (``forecast_pv``):

1. Clear-sky output of the configured array (``solar.clear_sky_power``: sun position, Haurwitz,
   isotropic transposition) as the interval mean of every slot.
2. The site's scale: the ``scale_quantile`` (0.9) of observed / modelled clear-sky output over the
   last ``scale_days`` days, at slots with the sun well up. The high quantile picks the clear
   moments, so the scale absorbs the model's bias, the real derate and a wrong kWp; it is
   clipped to [``min_scale``, ``max_scale``] and falls back to 1 with too little history.
3. The clear-sky index ``kt`` (energy observed / learned clear-sky energy) of the last 24 h and of
   the last ``climate_days`` days, blended ``persistence_weight`` : 1 - ``persistence_weight``.
   When issued in daylight, the last two hours' kt takes over the first hours (decaying with
   ``nowcast_tau_s``).
4. Forecast = kt * scale * clear-sky, never above ``bound_factor`` x the learned clear-sky (nor
   the array's AC limit), zero at night.

An ``ExternalForecast`` (CSV/JSON file or MQTT payload; ``parse_external``) replaces the model on
the slots it covers when it is fresh (issued within ``max_external_age_s``) and covers at least
``min_external_coverage`` of the horizon; otherwise it is ignored and ``PvForecast.notes`` says why.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gateway.forecast.solar import PvArray, clear_sky_power

FloatArray = NDArray[np.float64]


class ExternalForecastError(ValueError):
    """An external PV forecast could not be read; the message names what was wrong."""


@dataclass(frozen=True)
class PvConfig:
    """Tuning of ``forecast_pv``; tuned on the Greensboro profile only."""

    scale_days: int = 30
    scale_quantile: float = 0.9
    min_scale: float = 0.05
    max_scale: float = 3.0
    climate_days: int = 30
    climate_median_weight: float = 0.5
    persistence_weight: float = 0.4
    nowcast_tau_s: float = 7200.0
    bound_factor: float = 1.15
    max_external_age_s: float = 12 * 3600.0
    min_external_coverage: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.persistence_weight <= 1.0:
            raise ValueError("PvConfig: persistence_weight must be in [0, 1]")
        if not 0.0 < self.scale_quantile <= 1.0 or not 0 < self.min_scale < self.max_scale:
            raise ValueError("PvConfig: scale_quantile in (0, 1], 0 < min_scale < max_scale")
        if self.scale_days < 1 or self.climate_days < 1 or self.bound_factor < 1.0:
            raise ValueError("PvConfig: scale_days, climate_days >= 1 and bound_factor >= 1")


@dataclass(frozen=True)
class ExternalForecast:
    """A PV forecast from elsewhere: power ``watts`` at instants ``times`` (epoch s)."""

    times: FloatArray
    watts: FloatArray
    issued_at: float

    def __post_init__(self) -> None:
        if self.times.shape != self.watts.shape or self.times.ndim != 1:
            raise ExternalForecastError("external forecast: times and watts must be 1-D, same size")


@dataclass(frozen=True)
class PvForecast:
    """PV forecast on a grid: slot ``i`` covers ``[start + i*step_s, +step_s)``, mean W.

    ``clear_sky_w`` is the site's learned clear-sky output (scale x model) on the same grid;
    ``source`` is "model", "external" or "external+model"; ``kt`` the clear-sky index used.
    """

    start: float
    step_s: int
    watts: FloatArray
    clear_sky_w: FloatArray
    kt: float
    scale: float
    source: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def times(self) -> FloatArray:
        return self.start + self.step_s * np.arange(self.watts.size, dtype=np.float64)


@lru_cache(maxsize=128)
def _clear_sky_day(day: int, step_s: int, array: PvArray) -> FloatArray:
    """Clear-sky slot means of one UTC day (cached: a re-plan every few minutes would otherwise
    recompute the sun's path over the whole history window each time)."""
    t = day * 86400.0 + step_s * np.arange(86400 // step_s, dtype=np.float64)
    out = clear_sky_power(t, array, step_s=step_s)
    out.flags.writeable = False
    return out


def clear_sky_grid(start: float, n: int, step_s: int, array: PvArray) -> FloatArray:
    """``clear_sky_power`` of ``n`` slots from ``start`` (a multiple of ``step_s``), by days."""
    per_day = 86400 // step_s
    first = int(start // step_s)
    d0, d1 = first // per_day, (first + n - 1) // per_day
    days = np.concatenate([_clear_sky_day(d, step_s, array) for d in range(d0, d1 + 1)])
    lo = first - d0 * per_day
    return days[lo : lo + n].copy()


def _slot_grid(t: FloatArray, w: FloatArray, lo: float, n: int, step_s: int) -> FloatArray:
    """Means of samples in ``[lo + i*step_s, +step_s)``; NaN where a slot has no sample."""
    idx = np.floor((t - lo) / step_s).astype(np.int64)
    ok = (idx >= 0) & (idx < n)
    sums = np.bincount(idx[ok], weights=w[ok], minlength=n)
    cnt = np.bincount(idx[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, sums / cnt, np.nan)


def site_clear_sky_scale(
    obs: FloatArray, model: FloatArray, cfg: PvConfig
) -> tuple[float, str | None]:
    """(scale, note) from observed and modelled clear-sky slot means of the history window."""
    peak = float(np.nanmax(model)) if np.isfinite(model).any() else 0.0
    sunny = np.isfinite(obs) & (model > 0.3 * peak) & (peak > 0)
    if sunny.sum() < 8:
        return 1.0, "too little daytime history: scale 1 (the configured array)"
    ratio = obs[sunny] / model[sunny]
    s = float(np.quantile(ratio, cfg.scale_quantile))
    if not cfg.min_scale <= s <= cfg.max_scale:
        return 1.0, (
            f"history/clear-sky ratio {s:.2f} outside [{cfg.min_scale}, {cfg.max_scale}]: "
            "check kwp/orientation or the PV meter; using scale 1"
        )
    return s, None


def _kt(obs: FloatArray, clear: FloatArray) -> float | None:
    ok = np.isfinite(obs) & (clear > 0)
    denom = float(clear[ok].sum())
    if denom <= 0 or ok.sum() == 0:
        return None
    # slots missing from obs are left out of the denominator too
    return float(np.clip(obs[ok].sum() / denom, 0.0, 1.2))


def _kt_climate(hist: FloatArray, clear: FloatArray, per_day: int, cfg: PvConfig) -> float | None:
    """Blend of the mean and the median of the daily clear-sky indices of the last days: days
    are bimodal (clear or overcast), so the median is MAE-optimal, the mean unbiased in energy."""
    n_days = min(cfg.climate_days, hist.size // per_day)
    kts = [
        _kt(
            hist[hist.size - (i + 1) * per_day : hist.size - i * per_day],
            clear[hist.size - (i + 1) * per_day : hist.size - i * per_day],
        )
        for i in range(n_days)
    ]
    vals = np.array([k for k in kts if k is not None])
    if vals.size == 0:
        return None
    m = cfg.climate_median_weight
    return float(m * np.median(vals) + (1.0 - m) * vals.mean())


def forecast_pv(
    timestamps: ArrayLike,
    watts: ArrayLike,
    issue_time: float,
    array: PvArray,
    *,
    step_s: int = 1800,
    horizon_s: int = 86400,
    external: ExternalForecast | None = None,
    config: PvConfig | None = None,
) -> PvForecast:
    """Forecast PV output for ``horizon_s`` from the UTC ``step_s`` slot containing ``issue_time``.

    History samples may be at any resolution, with gaps and NaN; only those before
    ``issue_time`` count. Negative and non-finite samples are dropped (they are meter noise).
    """
    cfg = config or PvConfig()
    if step_s < 60 or 86400 % step_s or horizon_s <= 0 or horizon_s % step_s:
        raise ValueError(
            f"bad grid: step_s {step_s} (divisor of 86400, >= 60), "
            f"horizon_s {horizon_s} (positive multiple of step_s)"
        )
    if not math.isfinite(issue_time):
        raise ValueError(f"issue_time must be finite, got {issue_time}")
    notes: list[str] = []
    start = math.floor(issue_time / step_s) * step_s
    n = horizon_s // step_s
    times = start + step_s * np.arange(n, dtype=np.float64)
    model_fc = clear_sky_grid(start, n, step_s, array)

    t = np.asarray(timestamps, dtype=np.float64).ravel()
    w = np.asarray(watts, dtype=np.float64).ravel()
    if t.shape != w.shape:
        raise ValueError(f"timestamps and watts differ in length: {t.size} vs {w.size}")
    ok = np.isfinite(t) & np.isfinite(w) & (w >= 0) & (t < issue_time)
    if (~ok & (t < issue_time)).any():
        notes.append(f"dropped {int((~ok & (t < issue_time)).sum())} NaN/negative samples")
    t, w = t[ok], w[ok]
    if array.ac_limit_w is not None:
        w = np.minimum(w, array.ac_limit_w * 1.5)
    h_n = cfg.scale_days * 86400 // step_s
    h_lo = start - h_n * step_s
    hist = _slot_grid(t, w, h_lo, h_n, step_s)
    h_model = clear_sky_grid(h_lo, h_n, step_s, array)
    scale, note = site_clear_sky_scale(hist, h_model, cfg)
    if note:
        notes.append(note)
    clear_hist = scale * h_model
    per_day = 86400 // step_s
    kt_day = _kt(hist[-per_day:], clear_hist[-per_day:])
    kt_clim = _kt_climate(hist, clear_hist, per_day, cfg)
    if kt_day is None and kt_clim is None:
        kt = 0.75  # no history: a typical mid-latitude yearly clear-sky index
        notes.append("no daytime history: kt 0.75")
    else:
        a = kt_day if kt_day is not None else kt_clim
        b = kt_clim if kt_clim is not None else kt_day
        assert a is not None and b is not None
        kt = cfg.persistence_weight * a + (1.0 - cfg.persistence_weight) * b
    clear_fc = scale * model_fc
    kt_slot = np.full(n, kt)
    # nowcast: in daylight, the last two hours say more about the next few than yesterday does
    recent = max(1, 7200 // step_s)
    kt_now = _kt(hist[-recent:], clear_hist[-recent:])
    daylight = clear_hist[-recent:].sum() > 0.05 * max(clear_hist.max(), 1e-9) * recent
    if kt_now is not None and daylight:
        decay = np.exp(-(times + step_s / 2 - issue_time) / cfg.nowcast_tau_s)
        kt_slot = decay * kt_now + (1.0 - decay) * kt
    fc = kt_slot * clear_fc
    bound = cfg.bound_factor * clear_fc
    if array.ac_limit_w is not None:
        bound = np.minimum(bound, array.ac_limit_w)
    fc = np.clip(fc, 0.0, bound)
    source = "model"
    if external is not None:
        fc, source, ext_note = _apply_external(external, fc, times, issue_time, step_s, bound, cfg)
        if ext_note:
            notes.append(ext_note)
    return PvForecast(float(start), step_s, fc, clear_fc, float(kt), scale, source, tuple(notes))


def _apply_external(
    ext: ExternalForecast,
    model: FloatArray,
    times: FloatArray,
    now: float,
    step_s: int,
    bound: FloatArray,
    cfg: PvConfig,
) -> tuple[FloatArray, str, str | None]:
    age = now - ext.issued_at
    if age > cfg.max_external_age_s:
        return model, "model", f"external forecast ignored: stale ({age / 3600:.1f} h old)"
    ok = np.isfinite(ext.times) & np.isfinite(ext.watts)
    et, ew = ext.times[ok], np.maximum(ext.watts[ok], 0.0)
    if et.size < 2:
        return model, "model", "external forecast ignored: fewer than 2 valid points"
    order = np.argsort(et)
    et, ew = et[order], ew[order]
    # slot mean of the linearly interpolated external series (5 sub-points per slot)
    sub = times[:, None] + (np.arange(5) + 0.5) / 5 * step_s
    covered = (times >= et[0] - step_s / 2) & (times + step_s <= et[-1] + step_s / 2)
    cover = float(covered.mean())
    if cover < cfg.min_external_coverage:
        return model, "model", f"external forecast ignored: covers {cover:.0%} of the horizon"
    vals = np.interp(sub, et, ew).mean(axis=1)
    # an external value beyond the learned clear-sky bound is not physical for this array
    out = np.where(covered, np.minimum(vals, bound), model)
    return out, ("external" if covered.all() else "external+model"), None


# --- external forecast files and payloads ------------------------------------------------------


def _parse_time(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        x = float(v)
        return x / 1000.0 if x > 1e11 else x  # milliseconds since the epoch
    s = str(v).strip()
    try:
        return _parse_time(float(s))
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise ExternalForecastError(f"external forecast: bad timestamp {s!r}") from e
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def _parse_watts(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError) as e:
        raise ExternalForecastError(f"external forecast: bad power value {v!r}") from e
    return x


def parse_external(text: str, fmt: str, *, issued_at: float) -> ExternalForecast:
    """Parse an external forecast. ``fmt`` "csv": rows ``timestamp,W`` (optional header line);
    "json": ``[[ts, W], ...]``, ``[{"timestamp": ts, "watts": W}, ...]`` or
    ``{"issued_at": ts, "values": <either list>}``. Timestamps are epoch s (or ms) or ISO 8601
    (naive = UTC). Raises ExternalForecastError naming the first problem."""
    rows: list[tuple[Any, Any]] = []
    if fmt == "csv":
        for i, rec in enumerate(csv.reader(io.StringIO(text))):
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) < 2:
                raise ExternalForecastError(f"external forecast csv line {i + 1}: need 2 columns")
            if i == 0 and not _looks_numeric(rec[1]):
                continue  # header
            rows.append((rec[0], rec[1]))
    elif fmt == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExternalForecastError(f"external forecast: invalid JSON ({e.msg})") from e
        if isinstance(doc, dict):
            if "issued_at" in doc:
                issued_at = _parse_time(doc["issued_at"])
            doc = doc.get("values")
        if not isinstance(doc, list):
            raise ExternalForecastError("external forecast json: expected a list of points")
        for p in doc:
            if isinstance(p, (list, tuple)) and len(p) >= 2:
                rows.append((p[0], p[1]))
            elif isinstance(p, dict):
                ts = p.get("timestamp", p.get("t", p.get("time")))
                val = p.get("watts", p.get("W", p.get("w", p.get("value"))))
                if ts is None or val is None:
                    raise ExternalForecastError(
                        f"external forecast json: point {p!r} lacks timestamp/watts"
                    )
                rows.append((ts, val))
            else:
                raise ExternalForecastError(f"external forecast json: bad point {p!r}")
    else:
        raise ExternalForecastError(f"external forecast: unknown format {fmt!r} (csv or json)")
    if not rows:
        raise ExternalForecastError("external forecast: no data points")
    times = np.array([_parse_time(a) for a, _ in rows])
    vals = np.array([_parse_watts(b) for _, b in rows])
    return ExternalForecast(times, vals, float(issued_at))


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_external(
    path: str | os.PathLike[str], *, issued_at: float | None = None
) -> ExternalForecast:
    """Read an external forecast file (``.csv`` or ``.json``); ``issued_at`` defaults to the
    file's modification time."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mtime = p.stat().st_mtime
    except OSError as e:
        raise ExternalForecastError(f"external forecast {p}: cannot read ({e.strerror})") from e
    fmt = p.suffix.lower().lstrip(".")
    return parse_external(text, fmt, issued_at=mtime if issued_at is None else issued_at)
