"""Serve simulated homes over real Modbus TCP: one pymodbus server per device, like three boxes
on a LAN, each on its own port; or, for large communities in one process, in process
(``transport="inproc"``, :mod:`drivers.inproc`: the same devices and answers, no sockets).

* :func:`run_home` - one home, as an async context manager yielding a :class:`SimulatedHome`;
* :func:`run_homes` - N homes (community demos) sharing the loaded datasets;
* :func:`serve` - what ``hems sim`` runs: start, print one JSON line when ready, run until
  cancelled or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from pymodbus.server import ModbusTcpServer

from drivers import inproc
from drivers.clock import Clock, SimClock, WallClock
from firmware_sim.devices import KINDS, SimulatedDevice, build_devices
from firmware_sim.faults import DeviceFaults
from firmware_sim.home import HomeConfig, HomePhysics, StepProfile
from firmware_sim.image import RegisterImage


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a simulated device answers. ``kind`` is "inverter", "battery" or "meter";
    ``transport`` "tcp" (``host:port``) or "inproc" (``host`` is the in-process name, port 0)."""

    kind: str
    host: str
    port: int
    unit: int
    transport: str = "tcp"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.transport == "tcp":  # the `hems sim` ready line keeps its four keys
            del d["transport"]
        return d


@dataclass
class SimulatedHome:
    """A running home: its physics, devices, servers, endpoints and fault handles."""

    config: HomeConfig
    physics: HomePhysics
    devices: dict[str, SimulatedDevice]
    endpoints: list[Endpoint] = field(default_factory=list)
    servers: dict[str, ModbusTcpServer] = field(default_factory=dict)
    inproc_names: list[str] = field(default_factory=list)

    @property
    def faults(self) -> dict[str, DeviceFaults]:
        return {k: d.faults for k, d in self.devices.items()}

    @property
    def image(self) -> dict[str, RegisterImage]:
        return {k: d.image for k, d in self.devices.items()}

    def endpoint(self, kind: str) -> Endpoint:
        for e in self.endpoints:
            if e.kind == kind:
                return e
        raise KeyError(f"home {self.config.home_index} has no {kind}")

    def ready_line(self) -> str:
        """The one JSON line ``hems sim`` prints when the devices answer."""
        return json.dumps({"devices": [e.as_dict() for e in self.endpoints]})

    async def close(self) -> None:
        for name in self.inproc_names:
            inproc.unserve(name)
        self.inproc_names.clear()
        for srv in self.servers.values():
            with contextlib.suppress(Exception):
                await srv.shutdown()
        self.servers.clear()


def _bound_port(server: ModbusTcpServer) -> int:
    sockets = getattr(server.transport, "sockets", None)
    if not sockets:
        raise RuntimeError("Modbus server has no listening socket")
    return int(sockets[0].getsockname()[1])


async def start_home(
    clock: Clock,
    home: HomeConfig,
    host: str = "127.0.0.1",
    ports: Sequence[int] | None = None,
    units: tuple[int, int, int] = (1, 1, 1),
    base: int = 40000,
    *,
    load: StepProfile | None = None,
    pv: StepProfile | None = None,
    transport: str = "tcp",
    name: str | None = None,
) -> SimulatedHome:
    """Start one home's servers; the caller must :meth:`SimulatedHome.close` it.

    ``ports`` gives (inverter, battery, meter) ports; ``None`` or 0 = a free port each.
    ``transport="inproc"`` registers the devices in this process as ``<name>-<kind>`` instead
    (``name`` unique among the process' homes; :mod:`drivers.inproc`).
    """
    if transport not in ("tcp", "inproc"):
        raise ValueError(f"transport must be 'tcp' or 'inproc', got {transport!r}")
    if transport == "inproc" and not name:
        raise ValueError("an in-process home needs a name")
    physics = HomePhysics(home, clock, load=load, pv=pv)
    devices = build_devices(physics, units=units, base=base)
    sim = SimulatedHome(config=home, physics=physics, devices=devices)
    try:
        for kind in KINDS:
            dev = devices.get(kind)
            if dev is None:
                continue
            if transport == "inproc":
                key = f"{name}-{kind}"
                inproc.serve(key, dev)
                sim.inproc_names.append(key)
                sim.endpoints.append(Endpoint(kind, key, 0, dev.unit, "inproc"))
                continue
            port = int(ports[KINDS.index(kind)]) if ports else 0
            srv = ModbusTcpServer(
                dev.sim_devices(), address=(host, port), trace_packet=dev.trace_packet
            )
            await srv.serve_forever(background=True)
            sim.servers[kind] = srv
            dev.servers.append(srv)
            sim.endpoints.append(Endpoint(kind, host, _bound_port(srv), dev.unit))
    except BaseException:
        await sim.close()
        raise
    return sim


@contextlib.asynccontextmanager
async def run_home(
    clock: Clock,
    home: HomeConfig,
    host: str = "127.0.0.1",
    ports: Sequence[int] | None = None,
    units: tuple[int, int, int] = (1, 1, 1),
    base: int = 40000,
    *,
    load: StepProfile | None = None,
    pv: StepProfile | None = None,
    transport: str = "tcp",
    name: str | None = None,
) -> AsyncIterator[SimulatedHome]:
    """Run one home's three devices on real Modbus TCP servers (or in process, see
    :func:`start_home`); shut them down on exit."""
    sim = await start_home(clock, home, host, ports, units, base, load=load, pv=pv,
                           transport=transport, name=name)
    try:
        yield sim
    finally:
        await sim.close()


@contextlib.asynccontextmanager
async def run_homes(
    clock: Clock,
    configs: Sequence[HomeConfig],
    host: str = "127.0.0.1",
    units: tuple[int, int, int] = (1, 1, 1),
    base: int = 40000,
) -> AsyncIterator[list[SimulatedHome]]:
    """Run N homes (free ports). The datasets are loaded once and shared; a home costs CPU
    only when it is polled (its physics advances lazily)."""
    homes: list[SimulatedHome] = []
    try:
        for cfg in configs:
            homes.append(await start_home(clock, cfg, host, None, units, base))
        yield homes
    finally:
        for h in homes:
            await h.close()


def parse_start(start: float | str) -> float:
    """Unix seconds from a number or an ISO 8601 time (naive times are UTC)."""
    if isinstance(start, (int, float)):
        return float(start)
    try:
        return float(start)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(start.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"start {start!r}: not Unix seconds nor an ISO 8601 time") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


async def serve(
    host: str = "127.0.0.1",
    base_port: int = 0,
    speed: float = 1.0,
    start: float | str | None = None,
    home_index: int = 0,
    *,
    config: HomeConfig | None = None,
    units: tuple[int, int, int] = (1, 1, 1),
    base: int = 40000,
    out: TextIO | None = None,
    clock: Clock | None = None,
) -> None:
    """``hems sim``: start one home's devices, print one JSON line when they answer, then run
    until cancelled or SIGTERM/SIGINT.

    ``base_port`` > 0 puts the inverter, battery and meter on ``base_port``, ``+1``, ``+2``;
    0 picks free ports. ``speed`` > 1 runs an accelerated :class:`SimClock` starting at
    ``start`` (Unix seconds or ISO 8601, e.g. ``2026-06-21T00:00:00Z``; default now), so the
    home lives faster than real time.
    """
    if clock is None:
        if speed == 1.0 and start is None:
            clock = WallClock()
        else:
            clock = SimClock(time.time() if start is None else parse_start(start), speed)
    cfg = config if config is not None else HomeConfig(home_index=home_index)
    ports = (base_port, base_port + 1, base_port + 2) if base_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        async with run_home(clock, cfg, host, ports, units, base) as sim:
            stream = out if out is not None else sys.stdout
            stream.write(sim.ready_line() + "\n")
            stream.flush()
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
