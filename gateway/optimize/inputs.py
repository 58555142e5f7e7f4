"""What the household planner is asked: forecasts, prices, battery, envelope, market position.

Units: power in W (average over a step), energy in Wh, prices per kWh, time in seconds. Signs:
``award_w`` is + when the household sold (must export), - when it bought (must import).

Bad input is rejected by :func:`validate` with one ``ValueError`` naming the field and the first bad
step. NaN/inf in forecasts or prices is an error, not filled: the forecaster owns gap filling and
knows better than the planner what a plausible value is. In a limit, ``inf`` means "no limit"; NaN
is an error (treating an unreadable DSO limit as "no limit" would loosen it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Prices beyond this (per kWh) are treated as corrupt input: the slack penalties below must dominate
# every price for "the DSO limit wins" to hold.
MAX_ABS_PRICE = 10.0
# Penalty per kWh of import over the DSO limit, and per kWh*hour spent outside the SoC bounds.
# A kWh kept in the battery by importing over the limit could spare at most one kWh*horizon of
# reserve excursion, so the SoC penalty is also capped at ENVELOPE_PENALTY / (2 * horizon) per
# kWh*step (see coefficients.soc_penalty_per_step): the envelope outranks the reserve at any
# horizon length, and the reserve outranks any realistic price spread.
ENVELOPE_PENALTY = 10_000.0
SOC_PENALTY = 50.0
# Default penalty per kWh of deviation from an awarded trade (on top of retail settlement).
AWARD_PENALTY = 0.5


@dataclass(frozen=True)
class Battery:
    """A battery as the planner sees it. ``soc_min_wh``/``soc_max_wh`` are soft (policy) bounds."""

    capacity_wh: float
    soc0_wh: float
    max_charge_w: float
    max_discharge_w: float
    soc_min_wh: float = 0.0
    soc_max_wh: float | None = None  # None: the full capacity
    eta_charge: float = 0.95
    eta_discharge: float = 0.95
    degradation_per_kwh: float = 0.0  # cost per kWh of throughput (charge + discharge, AC side)
    terminal_value_per_kwh: float = 0.0  # worth of a kWh still stored at the end of the horizon

    @property
    def soc_max(self) -> float:
        return self.capacity_wh if self.soc_max_wh is None else self.soc_max_wh


NO_BATTERY = Battery(capacity_wh=0.0, soc0_wh=0.0, max_charge_w=0.0, max_discharge_w=0.0)


@dataclass(frozen=True)
class StepLimits:
    """The DSO operating envelope per step, in W (``inf`` = no limit).

    ``export_w``/``import_w`` bound the connection point; ``generation_w`` bounds the AC output of
    the site's DER (PV after curtailment plus battery discharge); ``load_w`` bounds controllable
    consumption, i.e. battery charging (household base load is not controllable).
    """

    export_w: FloatArray
    import_w: FloatArray
    generation_w: FloatArray
    load_w: FloatArray

    @classmethod
    def unlimited(cls, steps: int) -> StepLimits:
        inf = np.full(steps, np.inf)
        return cls(inf, inf.copy(), inf.copy(), inf.copy())


@dataclass(frozen=True)
class PlanInputs:
    """Everything one planning solve needs. Arrays all have one entry per step."""

    step_s: float
    load_w: FloatArray
    pv_w: FloatArray
    import_price: FloatArray
    export_price: FloatArray
    battery: Battery = NO_BATTERY
    limits: StepLimits | None = None
    # Expected community price per step and how much of the step's flow trades at it (0..1).
    market_price: FloatArray | None = None
    market_weight: FloatArray | None = None
    # Awarded trades (commitments) per step, W average; + sold, - bought. NaN-free; 0 = none.
    award_w: FloatArray | None = None
    award_penalty: float = AWARD_PENALTY

    @property
    def steps(self) -> int:
        return int(np.asarray(self.load_w).shape[0])

    @property
    def dt_h(self) -> float:
        return self.step_s / 3600.0

    def with_market(self, price: FloatArray, weight: FloatArray) -> PlanInputs:
        return replace(self, market_price=price, market_weight=weight)


def _vector(name: str, value: object, steps: int) -> FloatArray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(steps, float(arr))
    if arr.shape != (steps,):
        raise ValueError(f"{name}: expected {steps} steps, got shape {arr.shape}")
    return arr


def _finite(name: str, arr: FloatArray) -> None:
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}: not finite at step {bad[0]} ({arr[bad[0]]})")


def _nonneg(name: str, arr: FloatArray) -> None:
    bad = np.flatnonzero(arr < 0)
    if bad.size:
        raise ValueError(f"{name}: negative at step {bad[0]} ({arr[bad[0]]})")


def _scalar(name: str, value: float, lo: float, hi: float = math.inf) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name}: must be finite and within [{lo}, {hi}], got {value}")


def _validate_battery(b: Battery) -> Battery:
    _scalar("battery.capacity_wh", b.capacity_wh, 0.0)
    _scalar("battery.max_charge_w", b.max_charge_w, 0.0)
    _scalar("battery.max_discharge_w", b.max_discharge_w, 0.0)
    _scalar("battery.eta_charge", b.eta_charge, 1e-3, 1.0)
    _scalar("battery.eta_discharge", b.eta_discharge, 1e-3, 1.0)
    _scalar("battery.degradation_per_kwh", b.degradation_per_kwh, 0.0, MAX_ABS_PRICE)
    _scalar(
        "battery.terminal_value_per_kwh", b.terminal_value_per_kwh, -MAX_ABS_PRICE, MAX_ABS_PRICE
    )
    cap = b.capacity_wh
    _scalar("battery.soc_min_wh", b.soc_min_wh, 0.0, cap)
    _scalar("battery.soc_max_wh", b.soc_max, b.soc_min_wh, cap)
    # A BMS reading a hair outside [0, capacity] is measurement noise; clip it. More is an error.
    tol = 1e-3 * cap + 1e-6
    _scalar("battery.soc0_wh", b.soc0_wh, -tol, cap + tol)
    soc0 = min(max(b.soc0_wh, 0.0), cap)
    if cap == 0.0:
        # A zero-capacity battery can neither charge nor discharge; zero the rates so that no
        # lossy charge/discharge loop can appear in the plan.
        return replace(b, soc0_wh=0.0, max_charge_w=0.0, max_discharge_w=0.0)
    return replace(b, soc0_wh=soc0)


def validate(inputs: PlanInputs) -> PlanInputs:
    """Return a normalised copy (arrays float64, defaults filled) or raise one clear ValueError."""
    _scalar("step_s", inputs.step_s, 1e-9)
    load = np.asarray(inputs.load_w, dtype=np.float64)
    if load.ndim != 1 or load.shape[0] < 1:
        raise ValueError(f"load_w: need a 1-D array of at least one step, got shape {load.shape}")
    n = load.shape[0]
    arrays: dict[str, FloatArray] = {}
    for name in ("load_w", "pv_w", "import_price", "export_price"):
        arr = _vector(name, getattr(inputs, name), n)
        _finite(name, arr)
        arrays[name] = arr
    _nonneg("load_w", arrays["load_w"])
    _nonneg("pv_w", arrays["pv_w"])
    for name in ("import_price", "export_price"):
        big = np.flatnonzero(np.abs(arrays[name]) > MAX_ABS_PRICE)
        if big.size:
            raise ValueError(f"{name}: |price| > {MAX_ABS_PRICE} per kWh at step {big[0]}")

    lim = inputs.limits or StepLimits.unlimited(n)
    limit_arrays = {}
    for name in ("export_w", "import_w", "generation_w", "load_w"):
        arr = _vector(f"limits.{name}", getattr(lim, name), n)
        nan = np.flatnonzero(np.isnan(arr))
        if nan.size:
            raise ValueError(f"limits.{name}: NaN at step {nan[0]} (use inf for 'no limit')")
        _nonneg(f"limits.{name}", arr)
        limit_arrays[name] = arr

    mprice = _vector("market_price", 0.0 if inputs.market_price is None else inputs.market_price, n)
    mweight = _vector(
        "market_weight", 0.0 if inputs.market_weight is None else inputs.market_weight, n
    )
    _finite("market_price", mprice)
    _finite("market_weight", mweight)
    if np.any(np.abs(mprice) > MAX_ABS_PRICE):
        raise ValueError(f"market_price: |price| > {MAX_ABS_PRICE} per kWh")
    if np.any((mweight < 0) | (mweight > 1)):
        raise ValueError("market_weight: must lie within [0, 1]")
    award = _vector("award_w", 0.0 if inputs.award_w is None else inputs.award_w, n)
    _finite("award_w", award)
    _scalar("award_penalty", inputs.award_penalty, 0.0, 10 * MAX_ABS_PRICE)

    return replace(
        inputs,
        load_w=arrays["load_w"],
        pv_w=arrays["pv_w"],
        import_price=arrays["import_price"],
        export_price=arrays["export_price"],
        battery=_validate_battery(inputs.battery),
        limits=StepLimits(**limit_arrays),
        market_price=mprice,
        market_weight=mweight,
        award_w=award,
    )


def effective_prices(inputs: PlanInputs) -> tuple[FloatArray, FloatArray]:
    """The (import, export) prices the LP optimises against, per kWh, for validated inputs.

    The community price blends in with its weight. Where the export price would exceed the import
    price the LP could "earn" by importing and exporting at once, which no meter allows; the export
    price is capped at the import price there so the LP stays a faithful convex model (the cap
    only undervalues export in those rare steps).
    """
    assert inputs.market_price is not None and inputs.market_weight is not None
    w = inputs.market_weight
    imp = (1 - w) * inputs.import_price + w * inputs.market_price
    exp = (1 - w) * inputs.export_price + w * inputs.market_price
    return imp, np.minimum(exp, imp)
