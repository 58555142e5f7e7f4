"""The numbers of the planning LP, computed from validated inputs (pure numpy).

The LP (powers in kW, energies in kWh) has, per step t, the columns

    chg in [0, cc]   dis in [0, dc]   curt in [0, pv]   exp in [0, ec]   imp in [0, ic]
    soc in [0, sh] (state at the END of step t)        s_imp, s_lo, short >= 0

and the rows

    balance   imp + s_imp + dis - chg - exp - curt == load - pv
    dynamics  soc[t] - soc[t-1] - kc * chg + kd * dis == 0          (soc[-1] = soc0)
    gen       dis - curt <= gen - pv
    reserve   soc + s_lo >= soc_min
    award     short + a * (exp - imp - s_imp) >= a * q                (a = sign of the award)

minimising  sum(w_chg*chg + w_dis*dis + w_exp*exp + w_imp*imp + w_simp*s_imp + w_short*short)
            + w_slo * sum(s_lo) - tv * soc[end]      (w_slo from soc_penalty_per_step).

Why these shapes:
- Every per-step limit is a column upper bound (cc, dc, pv, ec, ic, sh). The cvxpy model writes
  each column as ``cap * u`` with ``u in [0, 1]`` so that the bounds stay constant (DPP), and HiGHS
  gets bounds instead of singleton rows (presolve would otherwise spend most of the solve on them).
- Caps that the envelope leaves open (inf) are replaced by what physics can use: export never
  needs to exceed PV + discharge, import never needs to exceed load + charge (anything more would
  be exported in the same step). The DSO's finite limits are kept exactly.
- The import limit is the only soft envelope limit (s_imp, penalised ENVELOPE_PENALTY above the
  price): a load larger than the limit plus what PV and the battery can give cannot be shed.
  Export and generation limits are always attainable by curtailing, so they are hard. The penalty
  falls from 2x to 1x ENVELOPE_PENALTY over the horizon: when some excess is unavoidable, the LP
  defers it (the battery covers the limit now rather than charging from the grid over the limit
  to spare its reserve), and later steps are the ones whose forecasts may still change.
- The SoC ceiling sh = min(capacity, max(soc_max, soc0)) is hard: a battery above its soft maximum
  may stay there but never needs to charge further (the export limit can always be met by
  curtailing). The reserve soc_min is soft (s_lo): the DSO import limit outranks it.
- An award is a soft target on the step's net export (exp - imp): falling short of it is penalised
  at ``award_penalty`` per kWh on top of retail settlement; over-delivery settles at retail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.optimize.inputs import (
    ENVELOPE_PENALTY,
    SOC_PENALTY,
    FloatArray,
    PlanInputs,
    effective_prices,
)

KW = 1e-3
# Per kWh: export earlier in the horizon is worth this much less than export later. When storing
# a surplus now or later in the day is worth the same to the LP (the battery fills either way on
# the forecast), this breaks the tie towards charging first. Without it a rolling-horizon plan
# keeps deferring the charge to forecast surplus that may not come (measured in the backtest: the
# battery ended sunny days half empty). Far below any real price difference; never makes export
# worth more than import (the cap in effective_prices still holds).
EXPORT_TIE_BREAK = 1e-4


def soc_penalty_per_step(steps: int, dt_h: float) -> float:
    """Penalty per kWh below the reserve per step: SOC_PENALTY per kWh*hour, capped so that a whole
    horizon below the reserve costs at most half a kWh of import over the DSO limit."""
    return min(SOC_PENALTY * dt_h, ENVELOPE_PENALTY / (2 * steps))


@dataclass(frozen=True)
class LpCoefficients:
    """All numbers of one LP instance (kW, kWh, money). Vectors have one entry per step."""

    dt_h: float
    load: FloatArray
    pv: FloatArray
    cc: FloatArray
    dc: FloatArray
    ec: FloatArray
    ic: FloatArray
    sh: float
    soc0: float
    soc_min: float
    kc: float
    kd: float
    gen_room: FloatArray  # gen limit - pv (may be negative: then PV must be curtailed)
    a: FloatArray
    a_q: FloatArray
    w_chg: FloatArray
    w_dis: FloatArray
    w_exp: FloatArray
    w_imp: FloatArray
    w_simp: FloatArray
    w_short: FloatArray
    w_slo: float
    tv: float


def lp_coefficients(x: PlanInputs) -> LpCoefficients:
    """Compute the LP numbers for validated inputs (see the module docstring for the model)."""
    b = x.battery
    lim = x.limits
    assert lim is not None and x.award_w is not None
    dt = x.dt_h
    load, pv = x.load_w * KW, x.pv_w * KW
    cc = np.minimum(lim.load_w, b.max_charge_w) * KW
    dc = np.full(x.steps, b.max_discharge_w * KW)
    ec = np.minimum(lim.export_w * KW, pv + dc)
    ic = np.minimum(lim.import_w * KW, load + cc)
    # inf - pv stays inf; a bound that cannot bind is replaced by one that surely does not.
    gen_room = np.minimum(lim.generation_w * KW, pv + dc) - pv
    p_imp, p_exp = effective_prices(x)
    a = np.sign(x.award_w)
    deg = b.degradation_per_kwh
    return LpCoefficients(
        dt_h=dt,
        load=load,
        pv=pv,
        cc=cc,
        dc=dc,
        ec=ec,
        ic=ic,
        sh=min(b.capacity_wh, max(b.soc_max, b.soc0_wh)) * KW,
        soc0=b.soc0_wh * KW,
        soc_min=b.soc_min_wh * KW,
        kc=dt * b.eta_charge,
        kd=dt / b.eta_discharge,
        gen_room=gen_room,
        a=a,
        a_q=a * x.award_w * KW,
        w_chg=np.full(x.steps, dt * deg),
        w_dis=np.full(x.steps, dt * deg),
        w_exp=-dt * (p_exp - EXPORT_TIE_BREAK * (1.0 - np.arange(x.steps) / x.steps)),
        w_imp=dt * p_imp,
        w_simp=dt * (p_imp + ENVELOPE_PENALTY * (2.0 - np.arange(x.steps) / x.steps)),
        w_short=dt * np.where(a != 0, x.award_penalty, 0.0),
        w_slo=soc_penalty_per_step(x.steps, dt),
        tv=b.terminal_value_per_kwh,
    )
