"""From a device description (config) to a connected nature: :func:`connect_device`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drivers.clock import Clock
from drivers.modbus import ModbusLink
from drivers.natures import Battery, DeviceError, Inverter, Meter
from drivers.regmap import MappedMeter, RegisterMapError, load_map
from drivers.sunspec.devices import (
    BATTERY_MODELS,
    INVERTER_MODELS,
    METER_MODELS,
    SunSpecBattery,
    SunSpecInverter,
    SunSpecMeter,
)
from drivers.sunspec.discovery import DEFAULT_BASES, SunSpecMap, discover

Kind = Literal["meter", "inverter", "battery"]
Transport = Literal["tcp", "rtu", "rtu-over-tcp", "inproc"]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """How to reach one device and what it is.

    ``transport``: ``"tcp"`` (Modbus TCP), ``"rtu-over-tcp"`` (RTU frames through a serial
    gateway's TCP port), ``"rtu"`` (a local serial port, ``serial_port``) or ``"inproc"`` (a
    simulated device registered in this process under the name ``host``,
    :mod:`drivers.inproc`). ``register_map`` (a TOML path or a shipped map name such as
    ``"sdm630"``) selects a non-SunSpec device; without it the device is discovered as SunSpec.
    """

    kind: Kind
    transport: Transport = "tcp"
    host: str | None = None
    port: int = 502
    unit: int = 1
    serial_port: str | None = None
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    timeout_s: float = 1.0
    register_map: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        label = self.name or f"{self.kind} device"
        if self.kind not in ("meter", "inverter", "battery"):
            raise ValueError(f"{label}: kind must be meter, inverter or battery, got {self.kind!r}")
        if self.transport not in ("tcp", "rtu", "rtu-over-tcp", "inproc"):
            raise ValueError(f"{label}: transport must be tcp, rtu, rtu-over-tcp or inproc, "
                             f"got {self.transport!r}")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError(f"{label}: transport rtu needs serial_port")
        if self.transport != "rtu" and not self.host:
            raise ValueError(f"{label}: transport {self.transport} needs host")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"{label}: port must be 1..65535, got {self.port}")
        if not 0 <= self.unit <= 255:
            raise ValueError(f"{label}: unit must be 0..255, got {self.unit}")
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"{label}: timeout_s must be in (0, 60], got {self.timeout_s}")


def make_link(spec: DeviceSpec) -> ModbusLink:
    """The Modbus link a spec describes (not yet connected)."""
    if spec.transport == "rtu":
        assert spec.serial_port is not None
        return ModbusLink.rtu(
            spec.serial_port,
            spec.unit,
            baudrate=spec.baudrate,
            parity=spec.parity,
            stopbits=spec.stopbits,
            timeout_s=spec.timeout_s,
            name=spec.name,
        )
    assert spec.host is not None
    if spec.transport == "inproc":
        return ModbusLink.inproc(spec.host, spec.unit, timeout_s=spec.timeout_s, label=spec.name)
    return ModbusLink.tcp(
        spec.host,
        spec.port,
        spec.unit,
        timeout_s=spec.timeout_s,
        name=spec.name,
        framer="rtu" if spec.transport == "rtu-over-tcp" else "socket",
    )


def _looks_like(smap: SunSpecMap) -> str:
    ids = set(smap.ids)
    kinds = [k for k, ms in (("meter", METER_MODELS), ("battery", BATTERY_MODELS),
                             ("inverter", INVERTER_MODELS)) if ids & set(ms)]
    return " or ".join(kinds) if kinds else "none of meter, inverter, battery"


async def connect_device(
    spec: DeviceSpec,
    *,
    clock: Clock | None = None,
    bases: tuple[int, ...] = DEFAULT_BASES,
) -> Meter | Inverter | Battery:
    """Connect, discover (SunSpec) or load the register map, and return the nature.

    Raises :class:`~drivers.natures.DeviceError` (unreachable, not SunSpec, models that do not
    fit ``spec.kind``) or :class:`~drivers.regmap.RegisterMapError` (bad map file); the link is
    closed on failure.
    """
    link = make_link(spec)
    try:
        if spec.register_map is not None:
            rmap = load_map(spec.register_map)
            if rmap.kind != spec.kind:
                raise RegisterMapError(
                    f"{rmap.source}: a {rmap.kind} map, but {link.name} is configured as a "
                    f"{spec.kind}"
                )
            dev = MappedMeter(link, rmap, name=spec.name, clock=clock)
            await dev.read()  # fail now, with a clear error, rather than in the first cycle
            return dev
        smap = await discover(link, bases)
        try:
            if spec.kind == "meter":
                return SunSpecMeter(link, smap, name=spec.name, clock=clock)
            if spec.kind == "inverter":
                return SunSpecInverter(link, smap, name=spec.name, clock=clock)
            return SunSpecBattery(link, smap, name=spec.name, clock=clock)
        except DeviceError as e:
            raise DeviceError(
                link.name,
                f"configured as a {spec.kind} but its SunSpec models {smap.ids} do not fit "
                f"({e.reason}); it looks like: {_looks_like(smap)}",
            ) from None
    except BaseException:
        await link.close()
        raise
