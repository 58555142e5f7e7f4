"""Scenario of the planner tests (tests/planner/helpers.py, copied: tests is no package):
an evening-peak tariff, a steady ~1.5 kW household, no PV, a 4 kWh battery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from firmware_sim.home import HomeConfig, StepProfile
from gateway.config import Config, parse_config
from gateway.store import Batch, Store

DAY = 86400.0
T0 = 1_750_090_800.0  # Monday 2025-06-16 16:20 UTC
PEAK = T0 + 40 * 60  # 17:00
STEP = 900

TARIFF = {"import_per_kwh": 0.30, "feed_in_per_kwh": 0.05,
          "import_periods": [[17, 18, 0.40], [18, 21, 0.36], [0, 7, 0.15]]}
HOME = HomeConfig(pv_kwp=0.0, battery_wh=4000.0, soc0_pct=50.0, reserve_pct=10.0)


def load_at(t: np.ndarray | float) -> np.ndarray:
    """1400 W / 1600 W in alternating 15-minute steps (a flat line would look like a stuck
    sensor to the forecaster)."""
    return np.where((np.floor(np.asarray(t, dtype=np.float64) / STEP) % 2) == 0, 1400.0, 1600.0)


def home_profiles() -> tuple[StepProfile, StepProfile]:
    n = 365 * 96
    t = np.arange(n) * float(STEP)
    return StepProfile(load_at(t), STEP), StepProfile(np.zeros(n), STEP)


def planner_config(db_path: str, broker_url: str = "mqtt://127.0.0.1:1", *,
                   endpoints: Any = None, **planner: Any) -> Config:
    devices = ([{"kind": e.kind, "name": e.kind, "host": e.host, "port": e.port,
                 "unit": e.unit, "timeout_s": 1.0} for e in endpoints] if endpoints else
               [{"kind": k, "host": "127.0.0.1", "port": 1} for k in ("meter", "battery")])
    data: dict[str, Any] = {
        "site_id": "home-1",
        "devices": devices,
        "broker": {"url": broker_url, "keepalive_s": 5, "connect_timeout_s": 3.0},
        "store": {"path": db_path, "telemetry_interval_s": 60.0, "commit_interval_s": 30.0},
        "mqtt": {"state_interval_s": 60.0},
        "control": {"cycle_s": 10.0, "revert_s": 120.0, "startup_grace_s": 2.0},
        "tariff": TARIFF,
        "planner": {"enabled": True, "degradation_per_kwh": 0.05, "budget_ms": 5000.0,
                    **planner},
    }
    return parse_config(data)


def seed_history(path: str, start: float, end: float, interval_s: float = 300.0) -> int:
    """Write telemetry rows (the household above) for [start, end); return the last seq."""
    st = Store.open(path)
    try:
        t = np.arange(start, end, interval_s)
        rows = [{"seq": i + 1, "ts": float(x + interval_s), "start": float(x),
                 "interval_s": interval_s, "samples": 30, "errors": 0, "mode": "auto",
                 "site_w": float(w), "pv_w": 0.0, "battery_w": 0.0, "load_w": float(w),
                 "soc_pct": 50.0} for i, (x, w) in enumerate(zip(t, load_at(t + 1.0),
                                                                  strict=True))]
        st.write(Batch(telemetry=rows, kv={"seq_hwm": str(len(rows))}))
        return len(rows)
    finally:
        st.close()


async def wait_until(pred: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``pred`` until true; fail with ``what`` after a generous real-time bound."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or pred}")
        await asyncio.sleep(0.02)
