"""The slow loop's optimizer fails in the running daemon: a solve that runs past its budget,
then one that fails outright, then a good one. Safe behaviour: each bad round is replaced by the
self-consumption rule (``fallback``, counted, one ``planner`` warning event with the reason);
the fast loop never waits for the planner (it keeps cycling during a long solve) and keeps the
site inside the envelope; a good solve is used again and says so."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.daemon import Gateway
from gateway.optimize import Plan, PlanInputs, solve_plan
from gateway.optimize.problem import SolveFailed
from gateway.planner import Planner

from .harness import running_site, wait_until
from .test_device_faults import longest_exceedance_s

pytestmark = pytest.mark.fault

BUDGET_MS = 300.0
SLOW_S = 1.5  # real seconds: 5x the budget


class FlakySolver:
    """Round 1: correct but 5x over budget; round 2: fails; then the real solver."""

    def __init__(self) -> None:
        self.calls = 0
        self.slow_started: float | None = None
        self.slow_ended: float | None = None

    def __call__(self, inputs: PlanInputs, /, *, time_limit_s: float | None = None) -> Plan:
        self.calls += 1
        if self.calls == 1:
            self.slow_started = time.monotonic()
            t0 = time.perf_counter()
            plan = solve_plan(inputs, time_limit_s=time_limit_s)
            time.sleep(SLOW_S)  # a solver that ignores its time limit
            self.slow_ended = time.monotonic()
            return replace(plan, solve_ms=(time.perf_counter() - t0) * 1e3)
        if self.calls == 2:
            raise SolveFailed("both solvers failed (injected)")
        return solve_plan(inputs, time_limit_s=time_limit_s)


async def test_solver_over_budget_then_failing_then_back(mosquitto: Any, tmp_path: Path) -> None:
    solver = FlakySolver()
    cycles_at: dict[str, int] = {}

    def ready(gw: Gateway) -> None:
        gw.planner = Planner(gw.cfg, solver=solver)

    async with running_site(mosquitto, tmp_path, speed=60.0, on_ready=ready,
                            planner={"enabled": True, "step_s": 300, "horizon_s": 7200,
                                     "budget_ms": BUDGET_MS}) as site:
        gw = site.gw
        n0 = len(site.observer.samples)
        p = gw.planner
        assert isinstance(p, Planner)

        def mark() -> bool:
            if solver.slow_started is not None and "start" not in cycles_at:
                cycles_at["start"] = gw.stats.cycles
            if solver.slow_ended is not None and "end" not in cycles_at:
                cycles_at["end"] = gw.stats.cycles
            return p.stats.plans >= 3

        await wait_until(mark, 60, "three planning rounds")
        s = p.stats
        assert s.fallbacks >= 2 and s.lp >= 1 and s.errors == 0, s
        # the fast loop ran through the long solve (60 domain s per real second)
        assert cycles_at["end"] - cycles_at["start"] >= 20, cycles_at
        longest, worst = longest_exceedance_s(site, n0)
        assert longest <= 15.0, (longest, worst)
        gw.commit_now.set()
        await site.settle(5.0)
        evs = [(lv, m) for _, lv, _, m in site.events("planner")]
        assert ("warning", next(m for lv, m in evs if "over budget" in m)) in evs, evs
        assert any(lv == "info" and "plans again" in m for lv, m in evs), evs
        stats = await site.finish()
    assert stats.task_restarts == 0 and stats.planner["fallbacks"] >= 2
