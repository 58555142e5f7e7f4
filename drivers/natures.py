"""Device natures: the only view of a device that control logic ever gets (cf. OpenEMS).

Sign conventions (used everywhere in hems, documented in docs/architecture.md):

* site power at the connection point (meter): ``+`` import from the grid, ``-`` export to it;
* battery power: ``+`` charging (the battery is a load), ``-`` discharging;
* inverter (PV) AC power: ``+`` generation.

So, at the site: ``site_w = load_w - pv_w + battery_w``.

Energies are Wh and monotonically increasing counters as read from the device. ``None`` means
the device does not implement the point (SunSpec "not implemented" sentinel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class DeviceError(Exception):
    """A device could not be read or commanded. The message names the device and the cause."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device
        self.reason = message


class DeviceTimeout(DeviceError):
    """No reply within the bounded timeout."""


class DeviceRejected(DeviceError):
    """The device answered with a Modbus exception, or a write did not read back as written."""


@dataclass(frozen=True, slots=True)
class MeterReading:
    """Site meter at the connection point."""

    ts: float
    site_w: float  # + import, - export
    phases_w: tuple[float | None, float | None, float | None]
    import_wh: float | None
    export_wh: float | None
    voltage_v: float | None = None
    freq_hz: float | None = None


@dataclass(frozen=True, slots=True)
class InverterReading:
    """PV inverter: output, ratings and the active-power limit in force."""

    ts: float
    ac_w: float  # + generation
    dc_w: float | None
    rated_w: float  # nameplate WRtg (model 120), else WMax
    max_w: float  # WMax setting (model 121), the base of WMaxLimPct
    limit_pct: float | None  # WMaxLimPct, % of max_w
    limit_enabled: bool  # WMaxLim_Ena
    limit_revert_s: float | None  # WMaxLimPct_RvrtTms
    energy_wh: float | None  # lifetime AC energy (WH)
    state: int | None = None  # St (model 10x operating state)


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """Storage: state of charge, power, ratings and the rate window in force."""

    ts: float
    w: float  # + charge, - discharge
    soc_pct: float
    capacity_wh: float
    max_charge_w: float
    max_discharge_w: float
    reserve_pct: float | None  # MinRsvPct
    ctl_mode: int  # StorCtl_Mod bits: 1 = charge limit active, 2 = discharge limit active
    in_rate_pct: float | None  # InWRte, % of WChaMax (charge side of the window)
    out_rate_pct: float | None  # OutWRte, % of WChaMax (discharge side of the window)
    revert_s: float | None  # InOutWRte_RvrtTms
    soh_pct: float | None = None


@runtime_checkable
class Meter(Protocol):
    """A site meter."""

    name: str

    async def read(self) -> MeterReading: ...

    async def close(self) -> None:
        """Release the connection (the device keeps running on its own)."""
        ...


@runtime_checkable
class Inverter(Protocol):
    """A PV inverter whose active power can be limited."""

    name: str

    async def read(self) -> InverterReading: ...

    async def close(self) -> None: ...

    async def set_limit_pct(self, pct: float, revert_s: float) -> None:
        """Limit AC output to ``pct`` % of WMax; the device reverts after ``revert_s``."""
        ...

    async def clear_limit(self) -> None:
        """Remove the limit (WMaxLim_Ena = disabled)."""
        ...


@runtime_checkable
class Battery(Protocol):
    """A battery whose power can be commanded."""

    name: str

    async def read(self) -> BatteryReading: ...

    async def close(self) -> None: ...

    async def set_power(self, w: float, revert_s: float) -> None:
        """Hold battery power at ``w`` (+ charge, - discharge), clamped by the device to its
        ratings and SoC; the device returns to its own mode after ``revert_s``."""
        ...

    async def release(self) -> None:
        """Return the battery to its own (self-consumption) mode now."""
        ...
