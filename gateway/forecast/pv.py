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

An ``ExternalForecast`` (a CSV/JSON file, ``parse_external``; or the retained MQTT topic
``<root>/<site>/forecast/pv``, ``parse_forecast_message``) replaces the model on the slots it
covers when it is fresh (issued within ``max_external_age_s``), has not expired (it still reaches
the horizon's first slot) and covers at least ``min_external_coverage`` of the horizon; otherwise
it is ignored and ``PvForecast.notes`` says why. With several (file and MQTT), ``pick_external``
takes the newest usable one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gateway import messages
from gateway.forecast.solar import PvArray, clear_sky_power

FloatArray = NDArray[np.float64]


class ExternalForecastError(ValueError):
    """An external PV forecast could not be read; the message names what was wrong.

    ``code`` is a short countable category (``oversize``, ``json``, ``schema``, ``site``,
    ``non_finite``, ``negative``, ``absurd``, ``unsorted``, ``duplicate``, ``too_few``,
    ``too_many``, ``span``, ``stale``, ``future``, ``expired``; ``invalid`` for files);
    ``ref`` is the MQTT document's ``id`` when it could be read (echoed in the reply).
    """

    def __init__(self, message: str, code: str = "invalid", ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


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
    ref: str | None = None  # the MQTT document's id (None for files)

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


# One entry per (day, step, array): a gateway's history window and horizon span ~32 days, and
# a community simulation runs dozens of arrays in one process (128 entries thrashed there).
@lru_cache(maxsize=4096)
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


def _external_points(ext: ExternalForecast) -> tuple[FloatArray, FloatArray]:
    """The finite points of ``ext``, sorted by time, watts floored at 0."""
    ok = np.isfinite(ext.times) & np.isfinite(ext.watts)
    et, ew = ext.times[ok], np.maximum(ext.watts[ok], 0.0)
    order = np.argsort(et, kind="stable")
    return et[order], ew[order]


def _covered(et: FloatArray, times: FloatArray, step_s: int) -> NDArray[np.bool_]:
    """Slots (starting at ``times``) that the series ``et`` spans (half a slot of slack)."""
    return (times >= et[0] - step_s / 2) & (times + step_s <= et[-1] + step_s / 2)


def external_unusable(
    ext: ExternalForecast, times: FloatArray, now: float, step_s: int, cfg: PvConfig
) -> str | None:
    """Why ``ext`` cannot serve the horizon whose slots start at ``times``, or None if it can.

    Stale: issued more than ``max_external_age_s`` before ``now``. Expired: it ends before the
    horizon's first slot could be covered (it no longer reaches the horizon's start). Short:
    fewer than 2 finite points, or under ``min_external_coverage`` of the horizon covered.
    """
    age = now - ext.issued_at
    if age > cfg.max_external_age_s:
        return f"stale ({age / 3600:.1f} h old)"
    et, _ = _external_points(ext)
    if et.size < 2:
        return "fewer than 2 valid points"
    if et[-1] < times[0] + step_s / 2:
        return "expired (it ends before the horizon starts)"
    cover = float(_covered(et, times, step_s).mean())
    if cover < cfg.min_external_coverage:
        return f"covers {cover:.0%} of the horizon"
    return None


def pick_external(
    candidates: Sequence[tuple[str, ExternalForecast]],
    start: float,
    n: int,
    step_s: int,
    now: float,
    config: PvConfig | None = None,
) -> tuple[tuple[str, ExternalForecast] | None, list[str]]:
    """The newest usable (label, forecast) of ``candidates`` for ``n`` slots from ``start``
    (newest by ``issued_at``; a tie goes to the earlier candidate), and a note for each one
    passed over. None when none is usable (the own forecast then plans)."""
    cfg = config or PvConfig()
    times = start + step_s * np.arange(n, dtype=np.float64)
    notes: list[str] = []
    best: tuple[str, ExternalForecast] | None = None
    for label, ext in candidates:
        why = external_unusable(ext, times, now, step_s, cfg)
        if why is not None:
            notes.append(f"{label} forecast ignored: {why}")
        elif best is None or ext.issued_at > best[1].issued_at:
            if best is not None:
                notes.append(f"{best[0]} forecast ignored: {label} is newer")
            best = (label, ext)
        else:
            notes.append(f"{label} forecast ignored: {best[0]} is newer")
    return best, notes


def _apply_external(
    ext: ExternalForecast,
    model: FloatArray,
    times: FloatArray,
    now: float,
    step_s: int,
    bound: FloatArray,
    cfg: PvConfig,
) -> tuple[FloatArray, str, str | None]:
    why = external_unusable(ext, times, now, step_s, cfg)
    if why is not None:
        return model, "model", f"external forecast ignored: {why}"
    et, ew = _external_points(ext)
    # slot mean of the linearly interpolated external series (5 sub-points per slot)
    sub = times[:, None] + (np.arange(5) + 0.5) / 5 * step_s
    covered = _covered(et, times, step_s)
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


# --- the MQTT topic <root>/<site>/forecast/pv (docs/mqtt.md, schema forecast_pv.json) ----------

MAX_MESSAGE_BYTES = 131072  # a week at 5 min, two points per step, fits with room to spare
MAX_POINTS = 4096
MAX_WATTS = 1e6  # 1 MW: beyond any home's array (the array's own bound caps it further)
MAX_CLOCK_AHEAD_S = 300.0  # "issued" this far ahead of the gateway's clock is clock skew
MAX_POINTS_BEFORE_S = 2 * 86400.0  # points may start this long before "issued" ...
MAX_POINTS_AFTER_S = 8 * 86400.0  # ... and end at most this long after it


def _bad(code: str, detail: str, ref: str | None = None) -> ExternalForecastError:
    return ExternalForecastError(f"{code}: {detail}", code, ref)


def _no_constant(name: str) -> float:
    raise _bad("non_finite", f"{name} is not a number JSON allows")


def parse_forecast_message(
    payload: bytes,
    *,
    site: str,
    now: float,
    max_age_s: float | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> ExternalForecast:
    """Parse and check one ``forecast/pv`` message (schema ``forecast_pv``).

    ``{"v": 1, "site": s, "issued": t, "points": [[t, W], ...], "id"?: str, "source"?: str}``
    with ``t`` in Unix seconds and ``W`` the PV AC power (>= 0) at that instant (interpolated
    linearly in between), times strictly increasing. ``now`` is the gateway's (domain) time;
    ``max_age_s`` defaults to ``PvConfig().max_external_age_s``. Raises
    :class:`ExternalForecastError` (and nothing else) whose message starts with its ``code``,
    e.g. ``"negative: points[3] watts -5"``.
    The returned arrays are read-only and every value in them is finite.
    """
    max_age = PvConfig().max_external_age_s if max_age_s is None else max_age_s
    if len(payload) > max_bytes:
        raise _bad("oversize", f"payload {len(payload)} bytes > {max_bytes}")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except ExternalForecastError:
        raise
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an int beyond the digit limit.
    except (ValueError, RecursionError) as e:
        raise _bad("json", f"not UTF-8 JSON: {str(e)[:120]}") from None
    ref = doc.get("id") if isinstance(doc, dict) else None
    ref = ref if isinstance(ref, str) and 0 < len(ref) <= 64 else None
    pts = doc.get("points") if isinstance(doc, dict) else None
    if isinstance(pts, list) and len(pts) > MAX_POINTS:
        raise _bad("too_many", f"{len(pts)} points > {MAX_POINTS}", ref)
    errors = messages.validate("forecast_pv", doc)
    if errors:
        finite = any("finite" in e for e in errors)
        raise _bad("non_finite" if finite else "schema", "; ".join(errors[:3]), ref)
    if doc["site"] != site:
        raise _bad("site", f"forecast for site {doc['site'][:48]!r}, this gateway is {site!r}",
                   ref)
    assert isinstance(pts, list)
    try:
        issued = float(doc["issued"])
        pairs = [(float(p[0]), float(p[1])) for p in pts if len(p) == 2]
    except OverflowError:  # a JSON integer beyond float range passes the schema's "number"
        raise _bad("non_finite", "a number beyond the float range", ref) from None
    if len(pairs) != len(pts):
        i = next(i for i, p in enumerate(pts) if len(p) != 2)
        raise _bad("schema", f"field 'points[{i}]': must be [time, watts], got {len(pts[i])} "
                   "numbers", ref)
    if not math.isfinite(issued):
        raise _bad("non_finite", "field 'issued': must be a finite number", ref)
    if issued > now + MAX_CLOCK_AHEAD_S:
        raise _bad("future", f"issued {issued - now:.0f} s ahead of the gateway's clock "
                   f"(at most {MAX_CLOCK_AHEAD_S:.0f} s)", ref)
    if now - issued > max_age:
        raise _bad("stale", f"issued {(now - issued) / 3600:.1f} h ago (at most "
                   f"{max_age / 3600:g} h)", ref)
    if len(pairs) < 2:
        raise _bad("too_few", f"{len(pairs)} point(s); at least 2 are needed", ref)
    for i, (t, w) in enumerate(pairs):
        if not (math.isfinite(t) and math.isfinite(w)):
            raise _bad("non_finite", f"points[{i}] is not finite", ref)
        if w < 0:
            raise _bad("negative", f"points[{i}] watts {w:g} (PV power is >= 0)", ref)
        if w > MAX_WATTS:
            raise _bad("absurd", f"points[{i}] watts {w:g} > {MAX_WATTS:g}", ref)
        if i and t <= pairs[i - 1][0]:
            what = "duplicate" if t == pairs[i - 1][0] else "unsorted"
            raise _bad(what, f"points[{i}] time {t:.0f} is not after points[{i - 1}] "
                       f"({pairs[i - 1][0]:.0f}); times must strictly increase", ref)
    t0, t1 = pairs[0][0], pairs[-1][0]
    if t0 < issued - MAX_POINTS_BEFORE_S or t1 > issued + MAX_POINTS_AFTER_S:
        raise _bad("span", f"points from {t0 - issued:+.0f} s to {t1 - issued:+.0f} s of issued "
                   f"(allowed {-MAX_POINTS_BEFORE_S:+.0f} to {MAX_POINTS_AFTER_S:+.0f} s)", ref)
    if t1 < now:
        raise _bad("expired", f"the last point is {now - t1:.0f} s before the gateway's clock",
                   ref)
    times = np.array([t for t, _ in pairs], dtype=np.float64)
    watts = np.array([w for _, w in pairs], dtype=np.float64)
    times.flags.writeable = False
    watts.flags.writeable = False
    return ExternalForecast(times, watts, issued, ref)
