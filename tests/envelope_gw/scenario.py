"""A compressed stress day for integration tests: synthetic full sun, load steps, a nearly full
battery, and the DSO's windows squeezed into ~75 simulated minutes (from 10:50 UTC).

* default: export 5 kW;  10:55-11:20 export 1.5 kW;  11:20-11:35 export 0 W;
* 11:35 the sun goes (PV 0) and a large load starts; 11:40-11:55 import 2.5 kW.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from community.scenarios import StressDay, Window, stress_day
from firmware_sim.home import HomeConfig, StepProfile

DAY = datetime(2026, 6, 21, tzinfo=UTC).timestamp()
START = DAY + 10 * 3600 + 50 * 60
END = DAY + 11 * 3600 + 58 * 60
WINDOWS = (
    Window("export-1500", 10 + 55 / 60, 11 + 20 / 60, "export_w", 1500.0),
    Window("export-zero", 11 + 20 / 60, 11 + 35 / 60, "export_w", 0.0),
    Window("import-2500", 11 + 40 / 60, 11 + 55 / 60, "import_w", 2500.0),
)
HOME = HomeConfig(pv_kwp=5.0, inverter_rated_w=5000.0, battery_wh=10000.0, soc0_pct=97.0)


def scenario(site: str) -> StressDay:
    return stress_day(site, DAY, windows=WINDOWS, created_base=DAY)


def profiles(seed: int = 7) -> tuple[StepProfile, StepProfile]:
    """One-minute yearly profiles: load steps every minute, full sun until 11:35 UTC."""
    n = 365 * 1440
    rng = np.random.default_rng(seed)
    load = rng.choice([250.0, 400.0, 700.0, 1200.0, 2100.0, 2900.0], size=n)
    minute = np.arange(n) % 1440
    pv = np.clip(5600.0 * np.sin((minute / 60.0 - 6.0) / 12.0 * np.pi), 0.0, None)
    pv[minute >= 11 * 60 + 35] = 0.0
    big = (minute >= 11 * 60 + 35) & (minute < 12 * 60)
    load[big] = rng.choice([3000.0, 4500.0, 6000.0, 7000.0, 2000.0], size=int(big.sum()))
    return StepProfile(load, 60), StepProfile(pv, 60)


def config_data(endpoints: Any, broker_url: str, db: str, pub_b64: str, **control: Any
                ) -> dict[str, Any]:
    return {
        "site_id": "home-1",
        "devices": [{"kind": e.kind, "name": e.kind, "host": e.host, "port": e.port,
                     "unit": e.unit, "timeout_s": 1.0} for e in endpoints],
        "broker": {"url": broker_url, "keepalive_s": 5, "connect_timeout_s": 3.0},
        "store": {"path": db, "telemetry_interval_s": 60.0, "commit_interval_s": 60.0},
        "mqtt": {"state_interval_s": 60.0},
        "control": {"cycle_s": 5.0, "revert_s": 60.0, "startup_grace_s": 2.0, **control},
        "envelope": {"dso_public_key": pub_b64, "fallback_export_w": 1500.0},
    }
