"""Re-solve time of the planning LP: cvxpy (DPP, warm) next to the same LP solved in highspy.

For 48, 96 and 288 steps over 24 h, every solve gets new load/PV forecasts and a new initial SoC
(only parameter values change). Reported per horizon, median over the timed solves:

- ``cvxpy_ms``: the whole ``solve_plan`` call (validation, parameter update, cvxpy + HiGHS,
  turning the solution into a physical plan) - what the daemon pays per re-plan;
- ``highspy_ms``: the floor - the same LP (same coefficients, from ``lp_coefficients``) held in one
  ``highspy.Highs`` object whose bounds, costs and right-hand sides are updated in place before
  each ``run()`` (so it also keeps the previous basis);
- ``ratio`` = cvxpy_ms / highspy_ms. The objective values of both are compared on every solve;
- ``highs_direct_ms``: the planner's other path (``[planner] solver = "highs"``,
  :func:`gateway.optimize.highs_lp.solve_plan_highs`): the floor plus validation and plan
  assembly, with its objective compared too.

Also reported: HiGHS's own run time inside the cvxpy call (the rest is cvxpy's parameter
application and result unpacking, plus our validation and plan assembly) and the process CPU
time of both, which is steadier than wall time on a busy machine.

Usage: ``.venv/bin/python bench/optimize.py [--solves N]``. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import highspy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.optimize.coefficients import LpCoefficients, lp_coefficients
from gateway.optimize.highs_lp import highs_model, lp_matrix, lp_vectors, solve_plan_highs
from gateway.optimize.inputs import Battery, PlanInputs, validate
from gateway.optimize.problem import compiled, solve_plan
from gateway.tariff import DEFAULT_TOU

START_S = 1_700_000_000.0  # a Tuesday, 22:13 UTC: the horizon crosses every tariff period


def random_inputs(rng: np.random.Generator, steps: int) -> PlanInputs:
    step_s = 86_400 / steps
    hours = (START_S / 3600 + np.arange(steps) * step_s / 3600) % 24
    load = 300 + 400 * rng.random(steps) + 1500 * (rng.random(steps) < 0.1)
    pv = np.clip(np.sin((hours - 6) / 12 * np.pi), 0, None) * 5000 * rng.uniform(0.2, 1.0)
    imp, exp = DEFAULT_TOU.prices(START_S, steps, step_s)
    battery = Battery(
        capacity_wh=10_000,
        soc0_wh=rng.uniform(1000, 10_000),
        max_charge_w=5000,
        max_discharge_w=5000,
        soc_min_wh=1000,
        degradation_per_kwh=0.02,
        terminal_value_per_kwh=0.10,
    )
    return PlanInputs(step_s, load, pv, imp, exp, battery)


class HighsFloor:
    """The same LP as the cvxpy model, in its natural form (limits as column bounds): the
    matrix and vectors of :mod:`gateway.optimize.highs_lp`, without its validation and plan
    assembly (the floor)."""

    def __init__(self, k: LpCoefficients) -> None:
        self.n = k.load.shape[0]
        self.h = highs_model(lp_matrix(self.n, k.kc, k.kd, k.a))

    def solve(self, k: LpCoefficients) -> float:
        cost, upper, lower, row_up = lp_vectors(k)
        all_cols = np.arange(cost.size, dtype=np.int32)
        all_rows = np.arange(lower.size, dtype=np.int32)
        self.h.changeColsCost(all_cols.size, all_cols, cost)
        self.h.changeColsBounds(all_cols.size, all_cols, np.zeros(all_cols.size), upper)
        # present at run time, missing from highspy 1.16's type stub
        self.h.changeRowsBounds(all_rows.size, all_rows, lower, row_up)  # type: ignore[attr-defined]
        self.h.run()
        if self.h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"highspy: {self.h.modelStatusToString(self.h.getModelStatus())}")
        return float(self.h.getInfo().objective_function_value)


def bench(steps: int, solves: int, rng: np.random.Generator) -> dict[str, float]:
    cases = [random_inputs(rng, steps) for _ in range(solves + 2)]
    coeffs = [lp_coefficients(validate(x)) for x in cases]
    floor = HighsFloor(coeffs[0])
    wall: dict[str, list[float]] = {"cvxpy": [], "highs_in_cvxpy": [], "highspy": [],
                                    "direct": []}
    cpu: dict[str, list[float]] = {"cvxpy": [], "highspy": [], "direct": []}
    gaps = []
    for i, (x, k) in enumerate(zip(cases, coeffs, strict=True)):
        c0, t0 = time.process_time(), time.perf_counter()
        plan = solve_plan(x)
        c1, t1 = time.process_time(), time.perf_counter()
        hs_obj = floor.solve(k)
        c2, t2 = time.process_time(), time.perf_counter()
        direct = solve_plan_highs(x)
        c3, t3 = time.process_time(), time.perf_counter()
        if i < 2:  # the first solves compile / build: they are not re-solves
            continue
        wall["cvxpy"].append((t1 - t0) * 1e3)
        stats = compiled(steps, x.step_s).problem.solver_stats
        wall["highs_in_cvxpy"].append((stats.solve_time or 0.0) * 1e3)
        wall["highspy"].append((t2 - t1) * 1e3)
        cpu["cvxpy"].append((c1 - c0) * 1e3)
        cpu["highspy"].append((c2 - c1) * 1e3)
        wall["direct"].append((t3 - t2) * 1e3)
        cpu["direct"].append((c3 - c2) * 1e3)
        gaps.append(max(abs(plan.objective - hs_obj), abs(direct.objective - hs_obj))
                    / max(1.0, abs(hs_obj)))
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "cvxpy_ms": round(med["cvxpy"], 2),
        "highspy_ms": round(med["highspy"], 2),
        "ratio": round(med["cvxpy"] / med["highspy"], 2),
        "highs_inside_cvxpy_ms": round(med["highs_in_cvxpy"], 2),
        "cvxpy_cpu_ms": round(cpu_med["cvxpy"], 2),
        "highspy_cpu_ms": round(cpu_med["highspy"], 2),
        "highs_direct_ms": round(med["direct"], 2),
        "highs_direct_cpu_ms": round(cpu_med["direct"], 2),
        "max_rel_objective_gap": float(f"{max(gaps):.2e}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solves", type=int, default=30, help="timed re-solves per horizon")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {}
    for steps in (48, 96, 288):
        r = bench(steps, args.solves, rng)
        results[str(steps)] = r
        print(
            f"{steps:4d} steps: cvxpy solve_plan {r['cvxpy_ms']:6.2f} ms "
            f"(HiGHS inside: {r['highs_inside_cvxpy_ms']:5.2f} ms), "
            f"highspy floor {r['highspy_ms']:5.2f} ms, ratio {r['ratio']:5.2f} | "
            f"CPU {r['cvxpy_cpu_ms']:6.2f} vs {r['highspy_cpu_ms']:5.2f} ms | "
            f"planner's direct HiGHS path {r['highs_direct_ms']:5.2f} ms | "
            f"objective gap {r['max_rel_objective_gap']:.0e}"
        )
    print(f"target: <= 25 ms at 288 steps; median of {args.solves} re-solves each")
    print(json.dumps({"steps": results}))


if __name__ == "__main__":
    main()
