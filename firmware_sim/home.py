"""One physical home: household load, PV, an AC-coupled battery and the site meter.

Sign conventions (the hems conventions of :mod:`drivers.natures`):

* ``load_w``    household consumption, ``>= 0``;
* ``pv_w``      inverter AC output, ``+`` generation (``pv_avail_w`` is what the array could give);
* ``battery_w`` AC power into the battery, ``+`` charging, ``-`` discharging;
* ``site_w``    power at the connection point, ``+`` import from the grid, ``-`` export,
  and always ``site_w = load_w - pv_w + battery_w`` (per phase likewise, summing to the total).

Time is domain time from the injected :class:`~drivers.clock.Clock`. The model is advanced
*lazily*: every access integrates from the last update to ``clock.now()``. Inside the
integration every quantity is piecewise constant: the load and PV profiles are step functions
(mean power over each profile step, which is what energy data means), the inverter's limit ramp
moves in ticks aligned to the command time, and the battery's state of charge is linear in
between. Segments are cut at every profile step, ramp tick, revert deadline and at the instant
the battery reaches full or its reserve, so the energy counters are *exact* integrals whatever
the poll rate (polling every second or once an hour gives the same counters).

Controls (what the Modbus devices write, see :mod:`firmware_sim.devices`):

* inverter: ``WMaxLimPct`` (% of ``WMax``), ``WMaxLim_Ena``, ``WMaxLimPct_RvrtTms`` (after which
  the limit is disabled and the setpoint goes back to 100 %), ``WMaxLimPct_RmpTms`` (time to move
  from the current limit to the new one; :attr:`HomeConfig.inverter_ramp_s` when not given);
* battery: model 124 rate window. By default the battery runs its own self-consumption mode
  (charge from surplus, discharge to cover the load, within its rates, SoC and reserve). With
  ``StorCtl_Mod`` bit 0 (1) the charge side is limited to ``+InWRte`` % of ``WChaMax``, with
  bit 1 (2) the discharge side to ``-OutWRte`` % of ``WChaMax``: the self-consumption power is
  clamped into ``[-OutWRte, +InWRte] % * WChaMax``. So ``StorCtl_Mod=3, InWRte=p, OutWRte=-p``
  holds the battery at ``+p`` % (charging) and ``InWRte=-p, OutWRte=p`` at ``-p`` %. If the two
  sides cross, the charge side wins. The battery never charges above 100 % nor discharges below
  its reserve (``MinRsvPct``), whatever the window. ``InOutWRte_RvrtTms`` returns it to
  self-consumption (``StorCtl_Mod=0``, rates 100 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from drivers.clock import Clock

#: Ramp tick: the inverter limit moves in steps of at most this many domain seconds, aligned to
#: the command time, so a ramp is piecewise constant and integrates exactly.
RAMP_TICK_S = 1.0

_EPS_WH = 1e-9

#: (load, pv_avail, pv_out, battery, limit_pct) W/%: the flows from an instant on.
Flows = tuple[float, float, float, float, float]
#: A probe: called with (t, flows at t) as the integration passes one of its grid times.
Probe = Callable[[float, Flows], None]


@dataclass(slots=True)
class _ProbeSlot:
    fn: Probe
    step_s: float
    phase_s: float
    k: int  # the next call is at phase_s + k * step_s

    @property
    def next_t(self) -> float:
        return self.phase_s + self.k * self.step_s


@dataclass(frozen=True, slots=True)
class HomeConfig:
    """What one simulated home is made of. Powers in W, energies in Wh, percentages 0..100."""

    home_index: int = 0
    load_source: str = "richardson"
    pv_kwp: float = 5.0  # 0 = no PV
    pv_site: str = "greensboro"
    inverter_rated_w: float = 5000.0
    battery_wh: float = 10000.0  # 0 = no battery
    battery_max_charge_w: float = 5000.0
    battery_max_discharge_w: float = 5000.0
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    soc0_pct: float = 50.0
    reserve_pct: float = 10.0
    seed: int = 0  # per-home variation: which phase carries the largest load share
    load_scale: float = 1.0
    pv_seed: int = 0  # the weather realisation; homes of one community share it (same sky)
    inverter_ramp_s: float = 2.0  # default WMaxLimPct ramp when RmpTms is not written
    phase_split: tuple[float, float, float] = (0.40, 0.35, 0.25)  # load share per phase
    # How often the devices' measurement registers update (domain s): a real meter or inverter
    # refreshes them every 0.1-1 s, not at every request. 0: every read sees the physics at
    # that instant. A write that commands the physics is seen by the next read either way.
    register_update_s: float = 0.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"HomeConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("pv_kwp", "battery_wh", "load_scale", "inverter_ramp_s",
                     "register_update_s"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        for name in ("inverter_rated_w", "battery_max_charge_w", "battery_max_discharge_w"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        for name in ("charge_efficiency", "discharge_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "must be in (0, 1]")
        for name in ("soc0_pct", "reserve_pct"):
            if not 0 <= getattr(self, name) <= 100:
                raise bad(name, "must be in [0, 100]")
        if len(self.phase_split) != 3 or abs(sum(self.phase_split) - 1) > 1e-9:
            raise bad("phase_split", "must be three shares summing to 1")
        if self.home_index < 0:
            raise bad("home_index", "must be >= 0")

    @property
    def phases(self) -> tuple[float, float, float]:
        """The load share per phase, rotated by ``seed`` so homes differ."""
        k = self.seed % 3
        a, b, c = self.phase_split
        return ((a, b, c), (c, a, b), (b, c, a))[k]

    @property
    def has_pv(self) -> bool:
        return self.pv_kwp > 0

    @property
    def has_battery(self) -> bool:
        return self.battery_wh > 0


# ----------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class StepProfile:
    """A yearly step series: ``values[i] * scale`` W holds over ``[i*step_s, (i+1)*step_s)`` seconds
    since Jan 1 00:00 UTC; it wraps yearly (a profile is one year, repeated)."""

    values: Any  # 1-D numpy array or sequence of float
    step_s: int
    scale: float = 1.0  # W per unit of ``values`` (lets homes share one dataset array)

    def __post_init__(self) -> None:
        if self.step_s <= 0 or 86400 % self.step_s:
            raise ValueError(f"profile step {self.step_s} s must divide a day")
        if len(self.values) == 0:
            raise ValueError("empty profile")


def _year_bounds(t: float) -> tuple[float, float]:
    """Unix times of Jan 1 00:00 UTC of the year containing ``t`` and of the next year."""
    y = datetime.fromtimestamp(t, UTC).year
    return (
        datetime(y, 1, 1, tzinfo=UTC).timestamp(),
        datetime(y + 1, 1, 1, tzinfo=UTC).timestamp(),
    )


@cache
def _load_households(source: str) -> Any:
    from firmware_sim.profiles import load_households  # the shipped data (other module)

    return load_households(source)


@cache
def _pv_profile(site: str, step_s: int, seed: int) -> Any:
    from firmware_sim.profiles import pv_profile

    return pv_profile(site, step_s=step_s, seed=seed)


def profiles_for(config: HomeConfig) -> tuple[StepProfile, StepProfile]:
    """Load and PV step profiles (W) for ``config`` from :mod:`firmware_sim.profiles`.

    Datasets are loaded once per process and shared by all homes; home ``i`` takes household
    ``i mod homes`` of the dataset.
    """
    ls = _load_households(config.load_source)
    watts = ls.watts
    row = watts[config.home_index % watts.shape[0]]
    # The arrays stay shared between homes (a year at 60 s is 2 MB); each home scales on lookup.
    load = StepProfile(row, int(ls.step_s), config.load_scale)
    if config.has_pv:
        pv = _pv_profile(config.pv_site, 60, config.pv_seed)
        pvp = StepProfile(pv.w_per_kwp, int(pv.step_s), config.pv_kwp)
    else:
        pvp = StepProfile([0.0], 86400)
    return load, pvp


# --------------------------------------------------------------------------- pure functions


def ramp_pct(t: float, t0: float, start: float, target: float, duration: float) -> float:
    """The inverter limit (%) at ``t`` of a ramp from ``start`` to ``target`` commanded at
    ``t0`` taking ``duration`` s, moving in :data:`RAMP_TICK_S` ticks (the first at ``t0``)."""
    if duration <= 0 or t >= t0 + duration or start == target:
        return target
    if t < t0:
        return start
    tick = min(RAMP_TICK_S, duration)
    k = math.floor((t - t0) / tick) + 1
    frac = min(1.0, k * tick / duration)
    return start + (target - start) * frac


def next_ramp_tick(t: float, t0: float, duration: float) -> float:
    """The next instant after ``t`` at which the ramp's value changes (``inf`` if none)."""
    if duration <= 0 or t >= t0 + duration:
        return math.inf
    tick = min(RAMP_TICK_S, duration)
    k = math.floor((t - t0) / tick) + 1
    nxt = t0 + k * tick
    return nxt if nxt < t0 + duration else math.inf


def inverter_output(pv_avail_w: float, wmax_w: float, limit_pct: float) -> float:
    """AC output: what the array gives, capped by ``WMax`` and the active-power limit."""
    return max(0.0, min(pv_avail_w, wmax_w, wmax_w * limit_pct / 100.0))


def battery_window(
    mode: int, in_pct: float, out_pct: float, wchamax_w: float, max_charge_w: float,
    max_discharge_w: float,
) -> tuple[float, float]:
    """The model 124 power window ``(lo, hi)`` in W (``+`` charge), before SoC limits."""
    lo, hi = -max_discharge_w, max_charge_w
    if mode & 1:
        hi = in_pct / 100.0 * wchamax_w
    if mode & 2:
        lo = -out_pct / 100.0 * wchamax_w
    return lo, hi


def battery_power(
    surplus_w: float, lo: float, hi: float, max_charge_w: float, max_discharge_w: float,
    can_charge: bool, can_discharge: bool,
) -> float:
    """Battery AC power (``+`` charge): self-consumption wish ``surplus_w`` (PV - load) clamped
    into the control window ``[lo, hi]`` (``hi`` wins if they cross), then into the physical
    rates, then stopped at full / at the reserve."""
    p = min(max(surplus_w, lo), hi)
    p = min(max(p, -max_discharge_w), max_charge_w)
    if p > 0 and not can_charge:
        return 0.0
    if p < 0 and not can_discharge:
        return 0.0
    return p


def stored_rate_wh_per_s(battery_w: float, eta_charge: float, eta_discharge: float) -> float:
    """Rate of change of stored energy (Wh/s) for an AC battery power (``+`` charge)."""
    if battery_w >= 0:
        return battery_w * eta_charge / 3600.0
    return battery_w / eta_discharge / 3600.0


def split_phases(
    load_w: float, pv_w: float, battery_w: float, split: Sequence[float]
) -> tuple[float, float, float]:
    """Per-phase site power: load split by ``split``, inverter and battery three-phase balanced."""
    gen = (pv_w - battery_w) / 3.0
    return (load_w * split[0] - gen, load_w * split[1] - gen, load_w * split[2] - gen)


# -------------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class HomeState:
    """A snapshot of the home at ``t`` (powers W as they are from ``t`` on, counters Wh)."""

    t: float
    load_w: float
    pv_avail_w: float
    pv_w: float
    battery_w: float
    site_w: float
    phases_w: tuple[float, float, float]
    soc_pct: float
    stored_wh: float
    limit_pct: float  # the limit in force now (ramping), % of WMax
    import_wh: float
    export_wh: float
    pv_wh: float  # inverter lifetime output since the model started
    load_wh: float
    pv_avail_wh: float
    charge_wh: float  # AC energy into the battery
    discharge_wh: float  # AC energy out of the battery


@dataclass
class InverterControls:
    """Model 121/123 state as the inverter holds it."""

    rated_w: float
    wmax_w: float
    pct: float = 100.0  # WMaxLimPct setpoint
    enabled: bool = False  # WMaxLim_Ena
    revert_s: float = 0.0  # WMaxLimPct_RvrtTms, 0 = never
    ramp_s: float | None = None  # WMaxLimPct_RmpTms, None = the config default
    deadline: float | None = None  # absolute domain time of the revert
    # the ramp in progress (the limit moves from r_start to r_target from r_t0 over r_dur)
    r_t0: float = 0.0
    r_start: float = 100.0
    r_target: float = 100.0
    r_dur: float = 0.0

    @property
    def target_pct(self) -> float:
        return self.pct if self.enabled else 100.0


@dataclass
class StorageControls:
    """Model 124 state as the battery holds it."""

    wchamax_w: float
    max_discharge_w: float
    reserve_pct: float
    mode: int = 0  # StorCtl_Mod bits
    in_pct: float = 100.0  # InWRte
    out_pct: float = 100.0  # OutWRte
    revert_s: float = 0.0  # InOutWRte_RvrtTms, 0 = never
    deadline: float | None = None


@dataclass
class _Totals:
    import_wh: float = 0.0
    export_wh: float = 0.0
    pv_wh: float = 0.0
    load_wh: float = 0.0
    pv_avail_wh: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0


class HomePhysics:
    """The physical home, advanced lazily to ``clock.now()`` on every access.

    ``load`` and ``pv`` default to :func:`profiles_for` (the shipped datasets); tests may pass
    their own :class:`StepProfile`.
    """

    def __init__(
        self,
        config: HomeConfig,
        clock: Clock,
        *,
        load: StepProfile | None = None,
        pv: StepProfile | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        if load is None or pv is None:
            dl, dp = profiles_for(config)
            load = load if load is not None else dl
            pv = pv if pv is not None else dp
        self._load_profile = load
        self._pv_profile = pv
        self.inverter = InverterControls(
            rated_w=config.inverter_rated_w, wmax_w=config.inverter_rated_w
        )
        self.storage = StorageControls(
            wchamax_w=config.battery_max_charge_w,
            max_discharge_w=config.battery_max_discharge_w,
            reserve_pct=config.reserve_pct,
        )
        self.capacity_wh = config.battery_wh
        self.stored_wh = config.battery_wh * config.soc0_pct / 100.0
        self._tot = _Totals()
        self.t = clock.now()
        self.t0 = self.t
        self._y0, self._y1 = _year_bounds(self.t)
        self.segments = 0  # integration segments so far (a cost figure)
        self._phases = config.phases
        self._register_snap: HomeState | None = None
        self._probes: list[_ProbeSlot] = []
        self._next_probe = math.inf
        # The flows of the segment the integration stands in, valid for t < _seg_until (until
        # a profile step, a ramp tick, a revert deadline or a battery bound, or a command):
        # (flows, stored rate Wh/s, the bound it runs into at _seg_until or None)
        self._seg: tuple[Flows, float, float | None] = ((0.0, 0.0, 0.0, 0.0, 0.0), 0.0, None)
        self._seg_until = -math.inf

    # ---- profiles -------------------------------------------------------------------------
    @property
    def load_profile(self) -> StepProfile:
        """The household's load (W). Replacing it changes the home from now on (the time
        before is integrated under the old one), like a command."""
        return self._load_profile

    @load_profile.setter
    def load_profile(self, p: StepProfile) -> None:
        self._changed()
        self._load_profile = p

    @property
    def pv_profile(self) -> StepProfile:
        """The array's available power (W); replacing it takes effect now (see load_profile)."""
        return self._pv_profile

    @pv_profile.setter
    def pv_profile(self, p: StepProfile) -> None:
        self._changed()
        self._pv_profile = p

    def _changed(self) -> None:
        # Integrate up to now under what held so far; the flows are worked out again.
        self.advance()
        self._seg_until = -math.inf

    # ---- profile lookup -----------------------------------------------------------------
    def _year_offset(self, t: float) -> float:
        if not self._y0 <= t < self._y1:
            self._y0, self._y1 = _year_bounds(t)
        return t - self._y0

    @staticmethod
    def _at(p: StepProfile, ty: float) -> float:
        return float(p.values[int(ty // p.step_s) % len(p.values)]) * p.scale

    def load_at(self, t: float) -> float:
        return self._at(self._load_profile, self._year_offset(t))

    def pv_avail_at(self, t: float) -> float:
        return self._at(self._pv_profile, self._year_offset(t)) if self.config.has_pv else 0.0

    # ---- instantaneous flows --------------------------------------------------------------
    def limit_pct_at(self, t: float) -> float:
        inv = self.inverter
        return ramp_pct(t, inv.r_t0, inv.r_start, inv.r_target, inv.r_dur)

    def _flows(self, t: float) -> Flows:
        """(load, pv_avail, pv_out, battery, limit_pct) from ``t`` on."""
        load = self.load_at(t)
        avail = self.pv_avail_at(t)
        lim = self.limit_pct_at(t)
        pv = inverter_output(avail, self.inverter.wmax_w, lim) if self.config.has_pv else 0.0
        bat = 0.0
        if self.capacity_wh > 0:
            st = self.storage
            lo, hi = battery_window(
                st.mode, st.in_pct, st.out_pct, st.wchamax_w, st.wchamax_w, st.max_discharge_w
            )
            bat = battery_power(
                pv - load, lo, hi, st.wchamax_w, st.max_discharge_w,
                can_charge=self.stored_wh < self.capacity_wh - _EPS_WH,
                can_discharge=self.stored_wh > self._reserve_wh() + _EPS_WH,
            )
        return load, avail, pv, bat, lim

    def _reserve_wh(self) -> float:
        return self.capacity_wh * self.storage.reserve_pct / 100.0

    # ---- integration ------------------------------------------------------------------------
    def advance(self, t_end: float | None = None) -> None:
        """Integrate up to ``t_end`` (default ``clock.now()``). Never goes back in time.

        Flows are constant between change points (profile steps, ramp ticks, revert deadlines,
        a battery reaching a bound) and commands; a segment cut by anything else (a read, a
        probe) continues on the flows already worked out (many reads and probes fall between
        two profile steps)."""
        t_end = self.clock.now() if t_end is None else t_end
        t = self.t
        tot = self._tot
        while t < t_end:
            self._fire_events(t)
            if t < self._seg_until:
                flows, rate, bound = self._seg
            else:
                flows, rate, bound = self._segment(t)
            if t >= self._next_probe:
                self._run_probes(t, flows)
            change = self._seg_until
            t_next = min(t_end, self._next_probe, change)
            load, avail, pv, bat, _ = flows
            dt_h = (t_next - t) / 3600.0
            site = load - pv + bat
            if site >= 0:
                tot.import_wh += site * dt_h
            else:
                tot.export_wh -= site * dt_h
            tot.load_wh += load * dt_h
            tot.pv_avail_wh += avail * dt_h
            tot.pv_wh += pv * dt_h
            if bat >= 0:
                tot.charge_wh += bat * dt_h
            else:
                tot.discharge_wh -= bat * dt_h
            if bound is not None and t_next == change:
                self.stored_wh = bound  # exactly at the limit, no float creep
            else:
                self.stored_wh = min(
                    self.capacity_wh, max(0.0, self.stored_wh + rate * (t_next - t))
                )
            self.segments += 1
            t = t_next
        if t_end > self.t:
            self.t = t_end
        self._fire_events(self.t)

    def _segment(self, t: float) -> tuple[Flows, float, float | None]:
        """Work out the flows from ``t`` on and until when they hold (``_seg_until``)."""
        cfg = self.config
        flows = self._flows(t)
        bat = flows[3]
        until = math.inf
        for p in (self._load_profile, self._pv_profile):
            step = p.step_s
            until = min(until, (math.floor(t / step) + 1) * step)
        inv = self.inverter
        until = min(until, next_ramp_tick(t, inv.r_t0, inv.r_dur))
        for dl in (inv.deadline, self.storage.deadline):
            if dl is not None and dl > t:
                until = min(until, dl)
        rate = stored_rate_wh_per_s(bat, cfg.charge_efficiency, cfg.discharge_efficiency)
        bound: float | None = None
        if rate > 0:
            bound = self.capacity_wh
        elif rate < 0:
            bound = self._reserve_wh()
        if bound is not None:
            t_hit = t + (bound - self.stored_wh) / rate
            if t_hit < until:
                until = max(t_hit, t)
            else:
                bound = None
        if until <= t:
            # Already at the bound: these flows hold for this instant only (the next segment
            # starts from the bound with charging or discharging blocked).
            until = t
        self._seg = (flows, rate, bound)
        self._seg_until = until
        return self._seg

    def _flows_now(self) -> Flows:
        """The flows at ``self.t`` (after :meth:`advance`)."""
        return self._seg[0] if self.t < self._seg_until else self._flows(self.t)

    # ---- probes -------------------------------------------------------------------------------
    def add_probe(self, step_s: float, fn: Probe, phase_s: float = 0.0) -> None:
        """Call ``fn(t, flows)`` at every ``t = phase_s + k * step_s`` from the model's present
        on, as the integration passes it: exactly what :meth:`site_now` (or :meth:`snapshot`
        inside ``fn``) would have shown at ``t``, with no task woken at ``t`` (an observer of
        many homes sampling every few seconds cost more than the homes' physics).

        Calls come late (when something next advances the model: a device read, a command,
        :meth:`advance`), in time order. ``fn`` may read the model through :meth:`snapshot`
        only; it must not advance or command it."""
        if not (step_s > 0 and math.isfinite(step_s) and math.isfinite(phase_s)):
            raise ValueError(f"probe step {step_s} / phase {phase_s}: need a finite step > 0")
        slot = _ProbeSlot(fn, float(step_s), float(phase_s),
                          math.ceil((self.t - phase_s) / step_s))
        self._probes.append(slot)
        self._next_probe = min(self._next_probe, slot.next_t)

    def _run_probes(self, t: float, flows: Flows) -> None:
        nxt = math.inf
        for p in self._probes:
            if t >= p.next_t:
                p.fn(t, flows)
                p.k += 1
                while p.next_t <= t:  # (only after float rounding at the grid time)
                    p.k += 1
            nxt = min(nxt, p.next_t)
        self._next_probe = nxt

    def _fire_events(self, t: float) -> None:
        inv = self.inverter
        if inv.deadline is not None and t >= inv.deadline:
            # Revert: the limit is disabled and the setpoint back at 100 %, ramping from where
            # it was at the deadline.
            at = inv.deadline
            inv.deadline = None
            inv.enabled = False
            inv.pct = 100.0
            self._start_ramp(at)
        st = self.storage
        if st.deadline is not None and t >= st.deadline:
            st.deadline = None
            st.mode = 0
            st.in_pct = 100.0
            st.out_pct = 100.0

    def _start_ramp(self, t: float) -> None:
        inv = self.inverter
        cur = self.limit_pct_at(t)
        inv.r_t0 = t
        inv.r_start = cur
        inv.r_target = inv.target_pct
        inv.r_dur = self.config.inverter_ramp_s if inv.ramp_s is None else inv.ramp_s

    # ---- commands (applied at clock.now()) --------------------------------------------------
    def _command(self) -> None:
        """Integrate up to now under the old controls; the registers' snapshot is stale."""
        self._changed()
        self._register_snap = None

    def command_inverter_limit(
        self,
        pct: float | None = None,
        enabled: bool | None = None,
        revert_s: float | None = None,
        ramp_s: float | None = None,
    ) -> None:
        """A write to the model 123 limit points: arguments given are the new values. Every
        such write (re)starts the revert timer when the limit is enabled and ``revert_s > 0``."""
        self._command()
        inv = self.inverter
        if pct is not None:
            if not 0 <= pct <= 100:
                raise ValueError(f"WMaxLimPct {pct} outside 0..100")
            inv.pct = float(pct)
        if enabled is not None:
            inv.enabled = bool(enabled)
        if revert_s is not None:
            inv.revert_s = max(0.0, float(revert_s))
        if ramp_s is not None:
            inv.ramp_s = max(0.0, float(ramp_s))
        now = self.t
        inv.deadline = now + inv.revert_s if inv.enabled and inv.revert_s > 0 else None
        if inv.target_pct != inv.r_target:
            self._start_ramp(now)

    def command_storage(
        self,
        mode: int | None = None,
        in_pct: float | None = None,
        out_pct: float | None = None,
        revert_s: float | None = None,
    ) -> None:
        """A write to the model 124 rate-window points; (re)starts the revert timer when a
        limit is active and ``revert_s > 0``."""
        self._command()
        st = self.storage
        if mode is not None:
            if not 0 <= mode <= 3:
                raise ValueError(f"StorCtl_Mod {mode} has bits outside 0..3")
            st.mode = int(mode)
        for name, v in (("InWRte", in_pct), ("OutWRte", out_pct)):
            if v is not None and not -100 <= v <= 100:
                raise ValueError(f"{name} {v} outside -100..100")
        if in_pct is not None:
            st.in_pct = float(in_pct)
        if out_pct is not None:
            st.out_pct = float(out_pct)
        if revert_s is not None:
            st.revert_s = max(0.0, float(revert_s))
        st.deadline = self.t + st.revert_s if st.mode and st.revert_s > 0 else None

    def set_reserve_pct(self, pct: float) -> None:
        self._command()
        if not 0 <= pct <= 100:
            raise ValueError(f"MinRsvPct {pct} outside 0..100")
        self.storage.reserve_pct = float(pct)

    def set_wmax(self, w: float) -> None:
        """WMax (model 121), the base of WMaxLimPct; at most the rating."""
        self._command()
        if not 0 < w <= self.inverter.rated_w:
            raise ValueError(f"WMax {w} outside (0, {self.inverter.rated_w}]")
        self.inverter.wmax_w = float(w)

    def set_wchamax(self, w: float) -> None:
        """WChaMax (model 124): the charge rate, and the base of InWRte/OutWRte."""
        self._command()
        if not w > 0:
            raise ValueError(f"WChaMax {w} must be > 0")
        self.storage.wchamax_w = float(w)

    def set_ratings(
        self, inverter_rated_w: float | None = None, battery_max_w: float | None = None
    ) -> None:
        """Change nameplate ratings (a device replaced or reconfigured)."""
        self._command()
        if inverter_rated_w is not None:
            self.inverter.rated_w = float(inverter_rated_w)
            self.inverter.wmax_w = float(inverter_rated_w)
        if battery_max_w is not None:
            self.storage.wchamax_w = float(battery_max_w)
            self.storage.max_discharge_w = float(battery_max_w)

    # ---- reading ----------------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        """Energy since the model started, in kWh, keyed like the demo report's ``energy_kwh``
        (the ground truth a gateway's own accounting can be checked against)."""
        self.advance()
        t = self._tot
        return {
            "load": t.load_wh / 1000.0,
            "pv": t.pv_wh / 1000.0,
            "pv_available": t.pv_avail_wh / 1000.0,
            "import": t.import_wh / 1000.0,
            "export": t.export_wh / 1000.0,
            "battery_charge": t.charge_wh / 1000.0,
            "battery_discharge": t.discharge_wh / 1000.0,
        }

    def site_now(self) -> tuple[float, float, float]:
        """Advance to now and return (t, site W, load W): what a compliance observer samples,
        without the full :class:`HomeState` (phases, counters) a device refresh needs."""
        self.advance()
        load, _avail, pv, bat, _lim = self._flows_now()
        return self.t, load - pv + bat, load

    def register_state(self) -> HomeState:
        """What the devices' registers show now: the last :meth:`state` if it is younger than
        ``config.register_update_s`` and nothing was commanded since, else a fresh one."""
        snap = self._register_snap
        if snap is not None and self.clock.now() - snap.t < self.config.register_update_s:
            return snap
        snap = self._register_snap = self.state()
        return snap

    def state(self) -> HomeState:
        """Advance to now and return a snapshot."""
        self.advance()
        return self.snapshot(self.t, self._flows_now())

    def snapshot(self, t: float, flows: Flows) -> HomeState:
        """The state at ``t`` with ``flows`` from ``t`` on, the counters as integrated so far
        (``t`` must be where the integration stands: :meth:`state`, or inside a probe)."""
        load, avail, pv, bat, lim = flows
        tot = self._tot
        cap = self.capacity_wh
        return HomeState(
            t=t,
            load_w=load,
            pv_avail_w=avail,
            pv_w=pv,
            battery_w=bat,
            site_w=load - pv + bat,
            phases_w=split_phases(load, pv, bat, self._phases),
            soc_pct=100.0 * self.stored_wh / cap if cap > 0 else 0.0,
            stored_wh=self.stored_wh,
            limit_pct=lim,
            import_wh=tot.import_wh,
            export_wh=tot.export_wh,
            pv_wh=tot.pv_wh,
            load_wh=tot.load_wh,
            pv_avail_wh=tot.pv_avail_wh,
            charge_wh=tot.charge_wh,
            discharge_wh=tot.discharge_wh,
        )
