"""PV forecaster: solar geometry, night, clear-sky bound, learned scale, external override."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from gateway.forecast.pv import (
    ExternalForecast,
    ExternalForecastError,
    forecast_pv,
    load_external,
    parse_external,
)
from gateway.forecast.solar import PvArray, clear_sky_power, solar_position

ARRAY = PvArray(lat=36.1, lon=-79.95, kwp=5.0, tilt_deg=30.0, azimuth_deg=180.0)
T0 = datetime(2021, 6, 1, 4, tzinfo=UTC).timestamp()  # local midnight at UTC-4 (EDT)
DAY = 86400.0


def history(days: int, kt: np.ndarray | float, scale: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    t = T0 - days * DAY + 300.0 * np.arange(days * 288)
    day_kt = np.broadcast_to(np.asarray(kt, dtype=float), (days,))
    w = scale * clear_sky_power(t, ARRAY, step_s=300) * np.repeat(day_kt, 288)
    return t, w


def test_solar_position_known_values() -> None:
    # solar noon at the June solstice, Greensboro: zenith = lat - 23.44 deg
    noon = datetime(2021, 6, 21, 17, 21, 30, tzinfo=UTC).timestamp()  # 12:00 + 4 min/deg lon
    z, az = solar_position(np.array([noon]), 36.1, -79.95)
    assert z[0] == pytest.approx(36.1 - 23.44, abs=0.5)
    assert az[0] == pytest.approx(180.0, abs=5.0)
    midnight = noon + 12 * 3600
    z2, _ = solar_position(np.array([midnight]), 36.1, -79.95)
    assert z2[0] > 90.0


def test_zero_at_night_and_below_clear_sky_bound() -> None:
    t, w = history(30, np.linspace(0.3, 1.0, 30))
    fc = forecast_pv(t, w, T0, ARRAY, step_s=900)
    night = fc.clear_sky_w == 0
    assert night.sum() > 20  # a June night is ~9 h = 36 slots
    assert np.all(fc.watts[night] == 0)
    assert np.all(fc.watts >= 0)
    assert np.all(fc.watts <= 1.15 * fc.clear_sky_w + 1e-9)
    # physically: never above the array's nameplate
    assert fc.watts.max() <= ARRAY.kwp * 1000.0


def test_learns_site_scale_and_kt() -> None:
    t, w = history(30, 1.0, scale=0.6)  # smaller/shaded array: 60 % of the model, all clear
    fc = forecast_pv(t, w, T0, ARRAY, step_s=1800)
    assert fc.scale == pytest.approx(0.6, rel=0.03)
    assert fc.kt == pytest.approx(1.0, abs=0.03)
    truth = 0.6 * clear_sky_power(fc.times, ARRAY, step_s=1800)
    assert fc.watts.sum() == pytest.approx(truth.sum(), rel=0.05)
    # yesterday overcast: the forecast drops, but not to yesterday's level (climatology blend)
    kts = np.ones(30)
    kts[-1] = 0.2
    t2, w2 = history(30, kts, scale=0.6)
    fc2 = forecast_pv(t2, w2, T0, ARRAY, step_s=1800)
    assert 0.2 < fc2.kt < 1.0
    assert fc2.watts.sum() < fc.watts.sum()


def test_cold_start_and_bad_history() -> None:
    fc = forecast_pv(np.array([]), np.array([]), T0, ARRAY)
    assert fc.scale == 1.0 and fc.kt == pytest.approx(0.75)
    assert fc.watts.max() > 0 and any("history" in n for n in fc.notes)
    t, w = history(10, 0.9)
    w = w.copy()
    w[::3] = np.nan
    w[1::3] = -20.0
    fc2 = forecast_pv(t, w, T0, ARRAY)
    assert np.all(np.isfinite(fc2.watts)) and np.all(fc2.watts >= 0)
    assert any("dropped" in n for n in fc2.notes)
    # absurd history (a meter reporting 100x) is not trusted: scale falls back to 1
    fc3 = forecast_pv(*history(10, 1.0, scale=100.0), T0, ARRAY)
    assert fc3.scale == 1.0 and any("outside" in n for n in fc3.notes)


def test_external_forecast_overrides_when_fresh() -> None:
    t, w = history(20, 0.8)
    times = T0 + 600.0 * np.arange(145, dtype=np.float64)
    ext_w = np.full(times.size, 1500.0)
    ext = ExternalForecast(times, ext_w, issued_at=T0 - 3600)
    fc = forecast_pv(t, w, T0, ARRAY, step_s=1800, external=ext)
    assert fc.source == "external"
    day = fc.clear_sky_w > 1500 / 1.15
    assert np.allclose(fc.watts[day], 1500.0)
    assert np.all(fc.watts[fc.clear_sky_w == 0] == 0)  # still capped by physics at night
    stale = ExternalForecast(times, ext_w, issued_at=T0 - 2 * DAY)
    fc2 = forecast_pv(t, w, T0, ARRAY, step_s=1800, external=stale)
    assert fc2.source == "model" and any("stale" in n for n in fc2.notes)
    half = ExternalForecast(times[:20], ext_w[:20], issued_at=T0)
    fc3 = forecast_pv(t, w, T0, ARRAY, step_s=1800, external=half)
    assert fc3.source == "model" and any("covers" in n for n in fc3.notes)
    partial = ExternalForecast(times[:100], ext_w[:100], issued_at=T0)
    assert forecast_pv(t, w, T0, ARRAY, external=partial).source == "external+model"


def test_external_files_csv_and_json(tmp_path: Path) -> None:
    csv_file = tmp_path / "pv.csv"
    csv_file.write_text("timestamp,W\n2021-06-01T04:00:00Z,0\n2021-06-01T16:00:00Z,3000.5\n")
    ext = load_external(csv_file, issued_at=123.0)
    assert ext.issued_at == 123.0
    np.testing.assert_allclose(ext.watts, [0.0, 3000.5])
    assert ext.times[0] == T0
    js = tmp_path / "pv.json"
    js.write_text(json.dumps({"issued_at": T0, "values": [{"timestamp": T0 * 1000, "watts": 5}]}))
    e2 = load_external(js)
    assert e2.issued_at == T0 and e2.times[0] == T0 and e2.watts[0] == 5
    e3 = parse_external(json.dumps([[T0, 1], [T0 + 60, 2]]), "json", issued_at=0.0)
    assert e3.watts.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("text", "fmt", "msg"),
    [
        ("not json", "json", "invalid JSON"),
        ('{"values": 3}', "json", "expected a list"),
        ("[[1, 2], [3]]", "json", "bad point"),
        ('[{"t": 1}]', "json", "lacks"),
        ("2021-13-45,5\n", "csv", "bad timestamp"),
        ("1,2\n3,abc\n", "csv", "bad power"),
        ("1\n", "csv", "2 columns"),
        ("", "csv", "no data"),
        ("1,2", "xml", "unknown format"),
    ],
)
def test_external_parse_errors_name_the_problem(text: str, fmt: str, msg: str) -> None:
    with pytest.raises(ExternalForecastError, match=msg):
        parse_external(text, fmt, issued_at=0.0)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExternalForecastError, match="cannot read"):
        load_external(tmp_path / "nope.csv")


def test_array_validation() -> None:
    with pytest.raises(ValueError, match="latitude"):
        PvArray(lat=95.0, lon=0.0)
    with pytest.raises(ValueError, match="tilt"):
        PvArray(lat=0.0, lon=0.0, tilt_deg=120.0)
