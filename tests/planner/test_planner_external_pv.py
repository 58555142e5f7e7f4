"""The planner takes a weather service's PV forecast from a file when one is configured, and
plans on its own forecast when the file is missing or broken (never no plan)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.forecast.solar import PvArray
from gateway.optimize.inputs import NO_BATTERY, StepLimits
from gateway.planner import PlanJob, compute_plan

T0 = 1_750_032_000.0  # 2025-06-16 00:00 UTC
STEP, N = 900, 96


def _job(path: str | None) -> PlanJob:
    hist_t = np.arange(T0 - 3 * 86400, T0, 300.0)
    return PlanJob(now=T0, start=T0, step_s=STEP, horizon_s=N * STEP, hist_t=hist_t,
                   hist_load=np.full(hist_t.size, 400.0), hist_pv=np.zeros(hist_t.size),
                   import_price=np.full(N, 0.3), export_price=np.full(N, 0.08),
                   battery=NO_BATTERY, limits=StepLimits.unlimited(N), tz=None,
                   array=PvArray(lat=36.0, lon=-80.0, kwp=4.0), budget_ms=5000.0,
                   pv_forecast_file=path)


def test_an_external_forecast_file_is_what_the_plan_uses(tmp_path: Path) -> None:
    f = tmp_path / "pv.json"
    # A flat 100 W "service" forecast over the whole horizon (the forecaster caps it by the
    # array's clear-sky bound, so it reads 0 at night and 100 W in daylight).
    values = [[T0 + k * STEP, 100.0] for k in range(N + 1)]
    f.write_text(json.dumps({"issued_at": T0 - 3600, "values": values}))
    res = compute_plan(_job(str(f)))
    own = compute_plan(_job(None))
    assert res.pv_source == "external"
    assert res.inputs.pv_w.max() == pytest.approx(100.0)
    assert int(np.sum(np.isclose(res.inputs.pv_w, 100.0))) > 20  # daylight steps
    assert not np.allclose(res.inputs.pv_w, own.inputs.pv_w)


@pytest.mark.parametrize("content", [None, b"not json at all", b'{"issued_at": 0, "values": []}',
                                     b"\xff\xfe\x00binary"])
def test_a_missing_or_broken_file_falls_back_to_the_own_forecast(tmp_path: Path,
                                                                content: bytes | None) -> None:
    f = tmp_path / "pv.json"
    if content is not None:
        f.write_bytes(content)
    res = compute_plan(_job(str(f)))
    own = compute_plan(_job(None))
    assert res.pv_source == own.pv_source != "external"
    assert np.allclose(res.inputs.pv_w, own.inputs.pv_w)
