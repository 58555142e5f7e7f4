"""The household battery + grid LP in cvxpy: DPP, compiled once per (steps, step_s), re-solved.

The model itself (columns, rows, objective, and why each limit is hard or soft) is documented in
:mod:`gateway.optimize.coefficients`, which computes its numbers. Here it is written for cvxpy:
each bounded column is ``cap * u`` with a constant bound ``u in [0, 1]``, every number that changes
between solves is a ``cp.Parameter``, and every product of two input quantities is precomputed in
numpy so that each term is "parameter x variable" (the DPP rule). cvxpy therefore canonicalises
the problem once per shape; a re-solve only re-applies parameter values. (Parameters inside
``Variable(bounds=...)`` would break DPP and recompile on every solve.)

Feasibility: u = 0 for charge/discharge/export, u = 1 for curtailment, and import plus its slack
covering the load satisfies every row for any validated input. Boundedness: every column is
bounded or carries a non-negative cost (the export price is capped at the import price).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cvxpy as cp
import numpy as np

from gateway.optimize.coefficients import LpCoefficients, lp_coefficients, soc_penalty_per_step
from gateway.optimize.inputs import FloatArray, PlanInputs, validate
from gateway.optimize.plan import Plan, assemble

_SOLVERS = (cp.HIGHS, cp.CLARABEL)
# Every limit is a column bound and coefficients are O(1) (kW, kWh, [0, 1] fractions), so HiGHS's
# presolve and scaling find nothing to do; skipping them measured ~40 % off the HiGHS time at 288
# steps (bench/optimize.py).
_SOLVER_OPTS: dict[str, dict[str, object]] = {
    cp.HIGHS: {"presolve": "off", "simplex_scale_strategy": 0},
    cp.CLARABEL: {},
}

_VECTOR_PARAMS = (
    "pv",
    "cc",
    "dc",
    "ec",
    "ic",
    "net",
    "kcc",
    "kdd",
    "gen_room",
    "a",
    "a_ec",
    "a_ic",
    "a_q",
    "o_c",
    "o_d",
    "o_e",
    "o_i",
    "w_simp",
    "w_short",
)
_SCALAR_PARAMS = ("sh", "soc0", "soc_min", "tvsh")


class SolveFailed(RuntimeError):
    """Neither solver returned an optimal solution."""


@dataclass
class _Compiled:
    """One cvxpy Problem with its Parameters and Variables, reused across solves."""

    problem: cp.Problem
    params: dict[str, cp.Parameter]
    vars: dict[str, cp.Variable]


@lru_cache(maxsize=16)
def compiled(steps: int, step_s: float) -> _Compiled:
    """Build (once per shape) the parametrised LP; see :mod:`gateway.optimize.coefficients`."""
    n = steps
    p = {k: cp.Parameter(n, name=k) for k in _VECTOR_PARAMS}
    p.update({k: cp.Parameter(name=k) for k in _SCALAR_PARAMS})
    v = {
        k: cp.Variable(n, name=k, bounds=[0.0, 1.0])
        for k in ("u_c", "u_d", "u_t", "u_e", "u_i", "u_s")
    }
    v.update({k: cp.Variable(n, name=k, nonneg=True) for k in ("s_imp", "s_lo", "short")})
    u_c, u_d, u_t, u_e, u_i, u_s = (v[k] for k in ("u_c", "u_d", "u_t", "u_e", "u_i", "u_s"))
    mul = cp.multiply
    soc = p["sh"] * u_s
    constraints = [
        # balance: imp + s_imp + dis - chg - exp - curt == load - pv
        mul(p["ic"], u_i)
        + v["s_imp"]
        + mul(p["dc"], u_d)
        - mul(p["cc"], u_c)
        - mul(p["ec"], u_e)
        - mul(p["pv"], u_t)
        == p["net"],
        # dynamics: soc[t] - soc[t-1] - kc*chg + kd*dis == 0, soc[-1] = soc0
        soc[0] - p["kcc"][0] * u_c[0] + p["kdd"][0] * u_d[0] == p["soc0"],
        soc[1:] - soc[:-1] - mul(p["kcc"][1:], u_c[1:]) + mul(p["kdd"][1:], u_d[1:]) == 0,
        # generation: dis - curt <= gen - pv
        mul(p["dc"], u_d) - mul(p["pv"], u_t) <= p["gen_room"],
        # reserve (soft)
        soc + v["s_lo"] >= p["soc_min"],
        # award shortfall (soft): short >= a * (q - (exp - imp - s_imp))
        v["short"] + mul(p["a_ec"], u_e) - mul(p["a_ic"], u_i) - mul(p["a"], v["s_imp"])
        >= p["a_q"],
    ]
    objective = (
        p["o_c"] @ u_c
        + p["o_d"] @ u_d
        + p["o_e"] @ u_e
        + p["o_i"] @ u_i
        + p["w_simp"] @ v["s_imp"]
        + p["w_short"] @ v["short"]
        + soc_penalty_per_step(n, step_s / 3600.0) * cp.sum(v["s_lo"])
        - p["tvsh"] * u_s[n - 1]
    )
    problem = cp.Problem(cp.Minimize(objective), constraints)
    assert problem.is_dpp(), "the planning LP must stay DPP (parameters only, compiled once)"
    return _Compiled(problem, p, v)


def parameter_values(k: LpCoefficients) -> dict[str, FloatArray | float]:
    """Map LP coefficients onto the compiled problem's parameters (products precomputed)."""
    return {
        "pv": k.pv,
        "cc": k.cc,
        "dc": k.dc,
        "ec": k.ec,
        "ic": k.ic,
        "net": k.load - k.pv,
        "kcc": k.kc * k.cc,
        "kdd": k.kd * k.dc,
        "gen_room": k.gen_room,
        "a": k.a,
        "a_ec": k.a * k.ec,
        "a_ic": k.a * k.ic,
        "a_q": k.a_q,
        "o_c": k.w_chg * k.cc,
        "o_d": k.w_dis * k.dc,
        "o_e": k.w_exp * k.ec,
        "o_i": k.w_imp * k.ic,
        "w_simp": k.w_simp,
        "w_short": k.w_short,
        "sh": k.sh,
        "soc0": k.soc0,
        "soc_min": k.soc_min,
        "tvsh": k.tv * k.sh,
    }


def set_parameters(c: _Compiled, x: PlanInputs) -> LpCoefficients:
    """Load validated inputs into the compiled problem's parameters; return the coefficients."""
    k = lp_coefficients(x)
    for name, value in parameter_values(k).items():
        param = c.params[name]
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != param.shape or not np.all(np.isfinite(arr)):
            raise ValueError(f"LP parameter {name}: bad shape {arr.shape} or non-finite value")
        # ``param.value = ...`` re-validates against attributes this problem does not use
        # (~0.2 ms per parameter, 5 ms a solve); the check above is the one that matters here.
        param.save_value(arr)
    return k


def _run(c: _Compiled, time_limit_s: float | None) -> str:
    """Solve with HiGHS, then Clarabel; return the solver that succeeded or raise SolveFailed."""
    errors = []
    for solver in _SOLVERS:
        opts = dict(_SOLVER_OPTS[solver])
        if time_limit_s is not None:
            # Both HiGHS and Clarabel call their wall-clock cap "time_limit" (seconds).
            opts["time_limit"] = time_limit_s
        try:
            with warnings.catch_warnings():
                # cvxpy warns on inaccurate solutions; the status check below decides instead.
                warnings.simplefilter("ignore", UserWarning)
                c.problem.solve(solver=solver, **opts)
        except (cp.SolverError, ValueError, ArithmeticError) as exc:
            errors.append(f"{solver}: {exc}")
            continue
        if c.problem.status == cp.OPTIMAL:
            return solver
        errors.append(f"{solver}: status {c.problem.status}")
    raise SolveFailed("; ".join(errors))


def solve_plan(inputs: PlanInputs, *, time_limit_s: float | None = None) -> Plan:
    """Solve the planning LP for ``inputs`` and return a physical plan (see :func:`assemble`).

    Raises ``ValueError`` for invalid inputs and :class:`SolveFailed` when no solver succeeds.
    The plan is NOT checked for invariants here; :func:`plan_or_fallback` does that.
    ``solve_ms`` covers validation, parameter update and the solve (the first call per shape also
    pays the one-off compilation). Not thread-safe: the compiled problems are shared, so call it
    from one thread (the slow loop, or a single-worker executor).
    """
    t0 = time.perf_counter()
    x = validate(inputs)
    c = compiled(x.steps, float(x.step_s))
    k = set_parameters(c, x)
    solver = _run(c, time_limit_s)
    solve_ms = (time.perf_counter() - t0) * 1e3

    def watts(name: str, cap: FloatArray) -> FloatArray:
        value = c.vars[name].value
        assert value is not None
        return np.asarray(value, dtype=np.float64) * cap * 1e3

    return assemble(
        x,
        watts("u_c", k.cc),
        watts("u_d", k.dc),
        watts("u_t", k.pv),
        objective=float(c.problem.value),
        status=f"optimal ({solver})",
        solve_ms=solve_ms,
        source="lp",
    )
