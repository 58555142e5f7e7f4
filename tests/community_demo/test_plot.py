"""The community day picture: a real PNG of the right size with content, and a lossless JSON
round trip of its input."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from community.plot import (
    DPI,
    HEIGHT_NO_BILLS_PX,
    HEIGHT_PX,
    WIDTH_PX,
    AuctionRow,
    DaySeries,
    HomeSeries,
    from_json,
    render_day,
    to_json,
    utilisation_pct,
)

DAY0 = 1750464000.0  # 2025-06-21 00:00 UTC
KINDS = ("pv+battery", "pv", "none")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_day(n_homes: int, n_samples: int = 289, *, auctions: bool = True,
                  bills: bool = True, limits: bool = True, breach_site: int | None = 1,
                  span_h: float = 24.0, start_h: float = 0.0) -> DaySeries:
    """A plausible summer day: PV bell, morning/evening load, batteries soaking up the midday
    surplus, the stress-day envelope, PV curtailed to the export limit except at one home."""
    t = DAY0 + np.linspace(start_h * 3600.0, (start_h + span_h) * 3600.0, n_samples)
    h = (t - DAY0) / 3600.0
    dt_h = np.diff(h, prepend=h[0])
    export_lim = np.where((h >= 11) & (h < 13), 1500.0, 5000.0)
    export_lim = np.where((h >= 13) & (h < 13.5), 0.0, export_lim)
    import_lim = np.where((h >= 17.5) & (h < 19.5), 2500.0, np.nan)
    homes = []
    for i in range(n_homes):
        kind = KINDS[i % 3]
        scale = 0.8 + 0.4 * ((i * 37) % 11) / 10
        load = scale * (300 + 900 * np.exp(-((h - 7.5) / 1.0) ** 2)
                        + 1600 * np.exp(-((h - 19.0) / 1.6) ** 2)) + 40 * np.sin(h * 7 + i)
        pv_raw = (0.0 if kind == "none" else 4200.0 * scale) * \
            np.clip(np.sin(np.pi * (h - 6) / 14), 0, None) ** 1.4
        bat = np.zeros_like(h)
        soc = np.full_like(h, np.nan)
        if kind == "pv+battery":
            cap_wh, e = 10000.0, 3000.0
            for k in range(h.size):
                surplus = pv_raw[k] - load[k]
                p = min(surplus, 3000.0) if surplus > 0 else -min(-surplus, 2500.0)
                p = min(p, (cap_wh - e) / max(dt_h[k], 1e-9)) if p > 0 else \
                    max(p, -e / max(dt_h[k], 1e-9))
                e += p * dt_h[k]
                bat[k], soc[k] = p, 100 * e / cap_wh
        exp_k = export_lim if limits else np.full_like(h, np.nan)
        imp_k = import_lim if limits else np.full_like(h, np.nan)
        pv = pv_raw
        if i != breach_site:
            # curtail: export (pv - load - bat) at most the limit in force
            pv = np.minimum(pv_raw, load + bat + np.nan_to_num(exp_k, nan=np.inf))
        site = load - pv + bat
        homes.append(HomeSeries(site=f"h{i:02d}", kind=kind, load_w=load, pv_w=pv,
                                battery_w=bat, site_w=site, soc_pct=soc,
                                export_limit_w=exp_k, import_limit_w=imp_k))
    rows = []
    if auctions:
        for k in range(int(start_h * 4), int((start_h + span_h) * 4)):
            s = DAY0 + k * 900.0
            hh = k / 4
            if hh < 7 or hh >= 21:
                rows.append(AuctionRow(s, s + 900.0, None, 0.0))
            else:
                sun = max(0.0, math.sin(math.pi * (hh - 6) / 14))
                rows.append(AuctionRow(s, s + 900.0, round(0.28 - 0.17 * sun, 4),
                                       round(n_homes * 0.25 * (0.3 + sun), 3)))
    bill_map = {}
    if bills:
        for i, home in enumerate(homes):
            base = 2.5 - (1.8 if home.kind != "none" else 0.0) + 0.1 * (i % 5)
            bill_map[home.site] = {"community": base, "no_p2p": base + 0.35,
                                   "fit_only": base + 0.6}
    return DaySeries(t=t, homes=homes, auctions=rows, price_floor=0.08, price_cap=0.30,
                     bills=bill_map, title="hems demo — synthetic stress day")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def distinct_colours(path: Path) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    rgb = (np.asarray(img)[..., :3] * 255).astype(np.uint32).reshape(-1, 3)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def assert_same(a: DaySeries, b: DaySeries) -> None:
    np.testing.assert_array_equal(np.asarray(a.t, float), np.asarray(b.t, float))
    assert len(a.homes) == len(b.homes)
    for ha, hb in zip(a.homes, b.homes, strict=True):
        assert (ha.site, ha.kind) == (hb.site, hb.kind)
        for f in ("load_w", "pv_w", "battery_w", "site_w", "soc_pct", "export_limit_w",
                  "import_limit_w"):
            np.testing.assert_array_equal(np.asarray(getattr(ha, f), float),
                                          np.asarray(getattr(hb, f), float), err_msg=f)
    assert list(a.auctions) == list(b.auctions)
    assert (a.price_floor, a.price_cap, a.title) == (b.price_floor, b.price_cap, b.title)
    assert {k: dict(v) for k, v in a.bills.items()} == {k: dict(v) for k, v in b.bills.items()}


@pytest.fixture(autouse=True)
def _needs_matplotlib() -> None:
    pytest.importorskip("matplotlib")


def coloured_fraction(path: Path) -> float:
    """Share of strongly coloured pixels: axes, grid and text are grey; data is not."""
    import matplotlib.image as mpimg

    rgb = (np.asarray(mpimg.imread(str(path)))[..., :3] * 255).astype(int)
    return float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > 60))


@pytest.mark.parametrize("n_homes", [1, 12])
def test_renders_a_full_day(tmp_path: Path, n_homes: int) -> None:
    out = render_day(synthetic_day(n_homes), tmp_path / "day.png")
    assert out == tmp_path / "day.png"
    assert png_size(out) == (WIDTH_PX, HEIGHT_PX)
    assert out.stat().st_size < 1_000_000
    assert distinct_colours(out) > 1000
    assert coloured_fraction(out) > 0.02  # PV, batteries, bars, bills: the data is drawn
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_no_bills_no_auctions_no_limits(tmp_path: Path) -> None:
    day = synthetic_day(5, auctions=False, bills=False, limits=False)
    out = render_day(day, tmp_path / "d.png")
    assert png_size(out) == (WIDTH_PX, HEIGHT_NO_BILLS_PX)  # no bills: no bills panel
    assert distinct_colours(out) > 1000
    assert coloured_fraction(out) > 0.02


@pytest.mark.parametrize("kwargs", [
    {"auctions": False, "limits": False},  # with bills
    {"n_samples": 2},
    {"n_samples": 5, "start_h": 12.5, "span_h": 1.0, "bills": False},
])
def test_edge_cases_still_draw(tmp_path: Path, kwargs: dict) -> None:
    n_samples = kwargs.pop("n_samples", 97)
    series = synthetic_day(4, n_samples, **kwargs)
    out = render_day(series, tmp_path / "e.png")
    assert png_size(out) == (WIDTH_PX, HEIGHT_PX if series.bills else HEIGHT_NO_BILLS_PX)
    assert coloured_fraction(out) > 0.015


def test_all_nan_series_and_no_trade_at_all(tmp_path: Path) -> None:
    day = synthetic_day(3, 50)
    nan = [math.nan] * 50
    homes = [HomeSeries(h.site, h.kind, nan, nan, nan, nan, nan, nan, nan) for h in day.homes]
    rows = [AuctionRow(DAY0, DAY0 + 900, None, 0.0)]
    out = render_day(DaySeries(day.t, homes, rows, 0.08, 0.3, {}), tmp_path / "n.png")
    assert png_size(out) == (WIDTH_PX, HEIGHT_NO_BILLS_PX)
    # nothing to draw but frames, text and the reference lines
    assert coloured_fraction(out) < 0.01


@pytest.mark.slow
def test_fifty_homes_a_sample_a_minute(tmp_path: Path) -> None:
    out = render_day(synthetic_day(50, 1440), tmp_path / "big.png")
    assert png_size(out) == (WIDTH_PX, HEIGHT_PX)
    assert out.stat().st_size < 1_000_000


def test_size_matches_dpi_constants() -> None:
    assert WIDTH_PX % DPI == 0 and HEIGHT_PX % DPI == 0 and HEIGHT_NO_BILLS_PX % DPI == 0


def test_mismatched_lengths_name_the_home(tmp_path: Path) -> None:
    day = synthetic_day(2, 20)
    bad = HomeSeries("hX", "pv", [1.0] * 19, *(day.homes[0].pv_w, ) * 6)
    with pytest.raises(ValueError, match=r"hX.*load_w"):
        render_day(DaySeries(day.t, [bad], [], 0.08, 0.3, {}), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_descending_time_is_refused(tmp_path: Path) -> None:
    day = synthetic_day(1, 10)
    with pytest.raises(ValueError, match="ascending"):
        render_day(DaySeries(list(day.t)[::-1], day.homes, [], 0.08, 0.3, {}),
                   tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes the import fail
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[sim\]'"):
        render_day(synthetic_day(1, 5), tmp_path / "x.png")


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, community.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("n_homes", [1, 12])
def test_json_round_trip_is_lossless(n_homes: int) -> None:
    day = synthetic_day(n_homes, 97)
    # the odd values JSON cannot spell directly
    h0 = day.homes[0]
    odd = HomeSeries(h0.site, h0.kind, h0.load_w, h0.pv_w, h0.battery_w, h0.site_w,
                     [math.nan, math.inf, -math.inf, 1e-300, *list(h0.soc_pct)[4:]],
                     h0.export_limit_w, h0.import_limit_w)
    day = DaySeries(day.t, [odd, *day.homes[1:]], day.auctions, day.price_floor,
                    day.price_cap, day.bills, day.title)
    d = to_json(day)
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN/Infinity tokens
    back = from_json(json.loads(text))
    assert_same(day, back)
    assert to_json(back) == d
    assert math.isinf(back.homes[0].soc_pct[1]) and math.isnan(back.homes[0].soc_pct[0])


def test_json_round_trip_of_the_edge_cases() -> None:
    day = synthetic_day(2, 3, auctions=False, bills=False, limits=False)
    back = from_json(json.loads(json.dumps(to_json(day), allow_nan=False)))
    assert_same(day, back)
    assert back.auctions == () and back.bills == {}


def test_from_json_names_the_bad_field() -> None:
    d = to_json(synthetic_day(2, 5))
    d["homes"][1]["pv_w"][3] = "lots"
    with pytest.raises(ValueError, match=r"homes\[1\]\.pv_w\[3\]"):
        from_json(d)
    d = to_json(synthetic_day(2, 5))
    del d["auctions"][0]["end"]
    with pytest.raises(ValueError, match=r"auctions\[0\].*'end'"):
        from_json(d)
    with pytest.raises(ValueError, match="format"):
        from_json({"t": []})


def test_cli_replots_a_stored_day(tmp_path: Path) -> None:
    from community.plot import main

    src = tmp_path / "report.json"
    src.write_text(json.dumps({"day": to_json(synthetic_day(3, 30))}))
    assert main([str(src), str(tmp_path / "r.png")]) == 0
    assert png_size(tmp_path / "r.png") == (WIDTH_PX, HEIGHT_PX)
    src.write_text(json.dumps({"format": "nope"}))
    assert main([str(src), str(tmp_path / "s.png")]) == 1


def test_utilisation_and_breaches() -> None:
    site = np.array([-1000.0, -1600.0, -5.0, -50.0, 2000.0, 3000.0, 100.0, -100.0])
    exp = np.array([1500.0, 1500.0, 0.0, 0.0, 1500.0, 1500.0, np.nan, np.nan])
    imp = np.array([np.nan, np.nan, np.nan, np.nan, 2500.0, 2500.0, np.nan, 2000.0])
    u, breach = utilisation_pct(site, exp, imp, tol_w=10.0)
    np.testing.assert_allclose(u[[0, 1, 4, 5]], [-1000 / 15, -1600 / 15, 80.0, 120.0])
    assert u[2] == 0.0 and u[3] == -math.inf  # zero export: within tolerance, or a breach
    assert math.isnan(u[6]) and math.isnan(u[7])  # no limit in the flow's direction
    assert breach.tolist() == [False, True, False, True, False, True, False, False]
