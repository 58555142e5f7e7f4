"""Operator commands (mode, battery reserve) and what the commanded mode means for the battery.

A command arrives as raw bytes on ``<root>/<site>/cmd/<name>``; :func:`handle_command` checks size,
JSON, schema and device limits, and returns either a new :class:`ModeState` or the reason it was
rejected. It never raises on bad input: every message gets a result.

:func:`rule_setpoints` is the fast loop's policy until the optimizer and the envelope are wired:
it is the one function the daemon calls to turn (state, mode) into setpoints, so a later issue
replaces it by plan-following + envelope enforcement without touching the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from drivers.natures import BatteryReading, InverterReading, MeterReading
from gateway import messages

MODES = ("auto", "self_consumption", "idle", "force_charge", "force_discharge")
FORCE_MODES = ("force_charge", "force_discharge")
COMMANDS = ("mode", "reserve")
MAX_FORCE_S = 604800.0  # a force mode ends within a week: ``duration_s``'s schema maximum


@dataclass(frozen=True)
class ModeState:
    """What the operator asked for. Persisted in the store so it survives a restart."""

    mode: str = "auto"
    power_w: float | None = None  # force modes only, positive
    until: float | None = None  # force modes only, Unix seconds; then back to auto
    reserve_soc_pct: float = 10.0

    def current(self, now: float) -> ModeState:
        """This state at ``now``: an expired force mode has returned to auto."""
        if self.until is not None and now >= self.until:
            return replace(self, mode="auto", power_w=None, until=None)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "power_w": self.power_w, "until": self.until,
                "reserve_soc_pct": self.reserve_soc_pct}

    @classmethod
    def from_json(cls, d: dict[str, Any], default: ModeState) -> ModeState:
        try:
            m = cls(mode=str(d["mode"]), power_w=d.get("power_w"), until=d.get("until"),
                    reserve_soc_pct=float(d["reserve_soc_pct"]))
        except (KeyError, TypeError, ValueError):
            return default
        return m if m.mode in MODES else default


@dataclass(frozen=True)
class CommandOutcome:
    """Result of one received command message."""

    command: str
    cmd_id: str | None
    applied: bool
    reason: str | None  # why rejected (None when applied)
    category: str  # applied | oversize | malformed | unknown | invalid | limit
    state: ModeState | None = None  # the new state when applied


def _reject(command: str, cmd_id: str | None, category: str, reason: str) -> CommandOutcome:
    return CommandOutcome(command, cmd_id, False, reason, category)


def handle_command(name: str, payload: bytes, current: ModeState, battery: BatteryReading | None,
                   now: float, max_bytes: int = 4096) -> CommandOutcome:
    """Validate one command and compute the state it leads to. Never raises on bad input."""
    if len(payload) > max_bytes:
        return _reject(name, None, "oversize",
                       f"payload too large: {len(payload)} bytes > {max_bytes}")
    if name not in COMMANDS:
        return _reject(name, None, "unknown",
                       f"unknown command {name[:40]!r}; known: {', '.join(COMMANDS)}")
    try:
        data = json.loads(payload.decode("utf-8"))
    # ValueError also covers an integer literal beyond Python's digit limit (not a
    # JSONDecodeError), reachable when max_bytes is configured above ~4.3 kB.
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return _reject(name, None, "malformed", f"malformed JSON: {str(e)[:120]}")
    cmd_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(cmd_id, str) or len(cmd_id) > 64:
        cmd_id = None
    errors = messages.validate(f"cmd_{name}", data)
    if errors:
        return _reject(name, cmd_id, "invalid", "; ".join(errors[:3]))
    if name == "reserve":
        return CommandOutcome(name, cmd_id, True, None, "applied",
                              replace(current, reserve_soc_pct=float(data["soc_pct"])))
    return _mode(data, cmd_id, current, battery, now)


def _mode(data: dict[str, Any], cmd_id: str | None, current: ModeState,
          battery: BatteryReading | None, now: float) -> CommandOutcome:
    mode = data["mode"]
    if mode not in FORCE_MODES:
        extra = [k for k in ("power_w", "until", "duration_s") if k in data]
        if extra:
            return _reject("mode", cmd_id, "invalid",
                           f"field '{extra[0]}': only allowed with force_charge/force_discharge")
        return CommandOutcome("mode", cmd_id, True, None, "applied",
                              replace(current, mode=mode, power_w=None, until=None))
    if ("until" in data) == ("duration_s" in data):
        return _reject("mode", cmd_id, "invalid",
                       f"{mode} needs exactly one end: 'until' (Unix seconds) or 'duration_s'")
    try:
        until = float(data["until"]) if "until" in data else now + float(data["duration_s"])
    except OverflowError:  # a JSON integer beyond float range passes the schema's number
        return _reject("mode", cmd_id, "invalid", "field 'until': number too large")
    if until <= now:
        return _reject("mode", cmd_id, "invalid",
                       f"field 'until': {until:.0f} is not in the future (now {now:.0f})")
    if until - now > MAX_FORCE_S:
        # The same bound as duration_s, so 'until' is no way around it.
        return _reject("mode", cmd_id, "invalid",
                       f"field 'until': {until - now:.0f} s ahead, at most {MAX_FORCE_S:.0f} s")
    if battery is None:
        return _reject("mode", cmd_id, "limit",
                       "no battery reading yet (no battery configured or not reachable)")
    power = float(data["power_w"])
    limit = battery.max_charge_w if mode == "force_charge" else battery.max_discharge_w
    side = "charge" if mode == "force_charge" else "discharge"
    if not power <= limit:  # a NaN rating refuses, never admits
        return _reject("mode", cmd_id, "limit",
                       f"power_w {power:g} exceeds the battery's max {side} power {limit:g} W")
    return CommandOutcome("mode", cmd_id, True, None, "applied",
                          replace(current, mode=mode, power_w=power, until=until))


# --------------------------------------------------------------------------------------------
# Policy: what the mode means for the devices


@dataclass(frozen=True)
class SiteState:
    """One cycle's readings (any may be missing when a device failed this cycle)."""

    ts: float
    meter: MeterReading | None
    inverter: InverterReading | None
    battery: BatteryReading | None


@dataclass(frozen=True)
class Setpoints:
    """What the fast loop writes. ``None`` = leave the device to its own control."""

    battery_w: float | None  # + charge / - discharge; None -> battery.release()
    inverter_limit_pct: float | None = None  # None -> write nothing (no limit from us)


def rule_setpoints(state: SiteState, mode: ModeState) -> Setpoints:
    """Rule-based policy: self-consumption within device limits and the reserve.

    ``auto`` means self-consumption until the optimizer's plan is wired. The battery never
    discharges below the reserve; if the meter is missing this cycle, the battery is released
    to its own control rather than steered blind.
    """
    b = state.battery
    if b is None:
        return Setpoints(None)
    if mode.mode == "idle":
        target = 0.0
    elif mode.mode == "force_charge":
        target = float(mode.power_w or 0.0)
    elif mode.mode == "force_discharge":
        target = -float(mode.power_w or 0.0)
    else:
        if state.meter is None:
            return Setpoints(None)
        # Drive the site to zero: new battery power = current battery power - site power.
        target = b.w - state.meter.site_w
    target = min(max(target, -b.max_discharge_w), b.max_charge_w)
    if target < 0 and b.soc_pct <= mode.reserve_soc_pct:
        target = 0.0
    return Setpoints(battery_w=round(target, 1))
