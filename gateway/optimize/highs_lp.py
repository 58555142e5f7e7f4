"""The planning LP held directly in HiGHS: the same model as the cvxpy one, re-solved in place.

:mod:`gateway.optimize.problem` writes the LP in cvxpy (the reference: readable, DPP, compiled
once); a re-solve there still costs cvxpy's parameter stuffing and result unpacking, about 3-4x
HiGHS's own time (``python bench/optimize.py``). One household re-plans every 15 minutes and does
not care; a community simulation planning 50 households on two cores does, and so do bid curves
(one solve per price point). This module builds the LP of
:mod:`gateway.optimize.coefficients` (columns, rows and costs documented there) in one
``highspy.Highs`` object per shape and per matrix, and a re-solve changes only costs, column
bounds and row bounds, so HiGHS starts from the previous optimal basis (a bid curve's next price
point is a few pivots away from the last).

The matrix holds the charge/discharge efficiencies (scalars) and the award signs (per step): new
awards change the award rows' coefficients in place; other efficiencies rebuild the model.

Same contract as :func:`gateway.optimize.problem.solve_plan`: validated inputs in, a
:class:`~gateway.optimize.plan.Plan` out (not yet checked for invariants), :class:`SolveFailed`
when HiGHS does not reach an optimum; not thread-safe (one planning thread per process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np
import scipy.sparse as sp

from gateway.optimize.coefficients import LpCoefficients, lp_coefficients
from gateway.optimize.inputs import FloatArray, PlanInputs, validate
from gateway.optimize.plan import Plan, assemble
from gateway.optimize.problem import SolveFailed

#: Column blocks, each ``steps`` long, in this order.
COLS = ("chg", "dis", "curt", "exp", "imp", "soc", "s_imp", "s_lo", "short")
_ROW_BLOCKS = 5  # balance, dynamics, generation, reserve, award
_INF = highspy.kHighsInf


def lp_matrix(n: int, kc: float, kd: float, a: FloatArray) -> sp.csc_matrix:
    """The constraint matrix (rows: balance, dynamics, generation, reserve, award; columns
    :data:`COLS`), as in :mod:`gateway.optimize.coefficients`."""
    col = {name: i * n for i, name in enumerate(COLS)}
    t = np.arange(n)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    def put(row0: int, name: str, coef: float | FloatArray, shift: int = 0) -> None:
        idx = t[shift:]
        c = np.broadcast_to(np.asarray(coef, dtype=np.float64), (n,))[shift:]
        rows.append(row0 + idx)
        cols.append(col[name] + idx - shift)
        vals.append(c.copy())

    for name, coef in (("imp", 1.0), ("s_imp", 1.0), ("dis", 1.0), ("chg", -1.0),
                       ("exp", -1.0), ("curt", -1.0)):
        put(0, name, coef)  # balance: imp + s_imp + dis - chg - exp - curt == load - pv
    put(n, "soc", 1.0)  # dynamics: soc[t] - soc[t-1] - kc chg + kd dis == 0 (soc[-1] = soc0)
    put(n, "soc", -1.0, shift=1)
    put(n, "chg", -kc)
    put(n, "dis", kd)
    put(2 * n, "dis", 1.0)  # generation: dis - curt <= gen - pv
    put(2 * n, "curt", -1.0)
    put(3 * n, "soc", 1.0)  # reserve: soc + s_lo >= soc_min
    put(3 * n, "s_lo", 1.0)
    put(4 * n, "short", 1.0)  # award: short + a (exp - imp - s_imp) >= a q
    put(4 * n, "exp", a)
    put(4 * n, "imp", -a)
    put(4 * n, "s_imp", -a)
    m = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(_ROW_BLOCKS * n, len(COLS) * n),
    )
    m.eliminate_zeros()  # steps without an award: no coefficients, not explicit zeros
    return m


def lp_vectors(k: LpCoefficients) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(cost, column upper bounds, row lower bounds, row upper bounds) for ``k``; every column's
    lower bound is 0."""
    n = k.load.shape[0]
    zeros, infs = np.zeros(n), np.full(n, _INF)
    cost = np.concatenate([k.w_chg, k.w_dis, zeros, k.w_exp, k.w_imp, zeros, k.w_simp,
                           np.full(n, k.w_slo), k.w_short])
    cost[COLS.index("soc") * n + n - 1] = -k.tv
    upper = np.concatenate([k.cc, k.dc, k.pv, k.ec, k.ic, np.full(n, k.sh), infs, infs, infs])
    dyn = np.zeros(n)
    dyn[0] = k.soc0
    net = k.load - k.pv
    row_lo = np.concatenate([net, dyn, -infs, np.full(n, k.soc_min), k.a_q])
    row_up = np.concatenate([net, dyn, k.gen_room, infs, infs])
    return cost, upper, row_lo, row_up


@dataclass
class _Held:
    """One HiGHS model and the matrix parameters it was built with."""

    h: highspy.Highs
    kc: float
    kd: float
    a: FloatArray


_HELD: dict[tuple[int, float], _Held] = {}


def highs_model(m: sp.csc_matrix) -> highspy.Highs:
    """A silent ``Highs`` holding constraint matrix ``m``; costs and bounds are set per solve."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # every limit is a column bound and coefficients are O(1): presolve and scaling find nothing
    # (as for the cvxpy path, see problem._SOLVER_OPTS)
    h.setOptionValue("presolve", "off")
    h.setOptionValue("simplex_scale_strategy", 0)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = m.shape[1], m.shape[0]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = m.indptr, m.indices, m.data
    lp.col_cost_ = np.zeros(m.shape[1])
    lp.col_lower_ = np.zeros(m.shape[1])
    lp.col_upper_ = np.zeros(m.shape[1])
    lp.row_lower_ = np.zeros(m.shape[0])
    lp.row_upper_ = np.zeros(m.shape[0])
    h.passModel(lp)
    return h


def _model(n: int, step_s: float, k: LpCoefficients) -> highspy.Highs:
    held = _HELD.get((n, step_s))
    if held is not None and held.kc == k.kc and held.kd == k.kd:
        changed = np.flatnonzero(held.a != k.a)
        if changed.size:  # new awards: change the award rows' coefficients in place
            exp0, imp0, simp0 = (COLS.index(c) * n for c in ("exp", "imp", "s_imp"))
            for t in changed.tolist():
                a = float(k.a[t])
                for col, v in ((exp0 + t, a), (imp0 + t, -a), (simp0 + t, -a)):
                    held.h.changeCoeff(4 * n + t, col, v)
            held.a = k.a.copy()
        return held.h
    h = highs_model(lp_matrix(n, k.kc, k.kd, k.a))
    if len(_HELD) >= 16:  # a few shapes per process; never grow without bound
        _HELD.clear()
    _HELD[(n, step_s)] = _Held(h, k.kc, k.kd, k.a.copy())
    return h


def solve_plan_highs(inputs: PlanInputs, *, time_limit_s: float | None = None) -> Plan:
    """:func:`gateway.optimize.problem.solve_plan`, solved directly in HiGHS (see the module
    docstring). Raises ``ValueError`` for invalid inputs, :class:`SolveFailed` otherwise."""
    t0 = time.perf_counter()
    x = validate(inputs)
    k = lp_coefficients(x)
    cost, upper, row_lo, row_up = lp_vectors(k)
    # costs are finite; bounds may be infinite (open limits) but never NaN
    if not np.all(np.isfinite(cost)) or any(np.isnan(v).any() for v in (upper, row_lo, row_up)):
        raise ValueError("LP coefficients: a NaN or an infinite cost")
    n = x.steps
    h = _model(n, float(x.step_s), k)
    cols = np.arange(cost.size, dtype=np.int32)
    rows = np.arange(row_lo.size, dtype=np.int32)
    h.changeColsCost(cols.size, cols, cost)
    h.changeColsBounds(cols.size, cols, np.zeros(cols.size), upper)
    # present at run time, missing from highspy 1.16's type stub
    h.changeRowsBounds(rows.size, rows, row_lo, row_up)  # type: ignore[attr-defined]
    # HiGHS's run clock accumulates over every run() of a Highs object, and its time limit is
    # checked against that total: a held model would "reach its limit" after enough re-solves.
    h.setOptionValue("time_limit", h.getRunTime() + float(time_limit_s)
                     if time_limit_s is not None else _INF)
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        # a failed run can leave a basis that misleads the next one: start afresh next time
        _HELD.pop((n, float(x.step_s)), None)
        raise SolveFailed(f"highs (direct): {h.modelStatusToString(status)}")
    sol = np.asarray(h.getSolution().col_value, dtype=np.float64)
    objective = float(h.getInfo().objective_function_value)
    solve_ms = (time.perf_counter() - t0) * 1e3

    def watts(name: str) -> FloatArray:
        i = COLS.index(name) * n
        return sol[i : i + n] * 1e3

    return assemble(x, watts("chg"), watts("dis"), watts("curt"), objective=objective,
                    status="optimal (highs direct)", solve_ms=solve_ms, source="lp")
