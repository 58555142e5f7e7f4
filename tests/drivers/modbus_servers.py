"""Real pymodbus servers on 127.0.0.1 free ports, serving SunSpec register images (helpers
for the driver tests; the ``serve`` fixture is re-exported by conftest.py).

``serve(image)`` starts a pymodbus 3.16 ``ModbusTcpServer`` whose ``SimDevice`` holds the
image's registers; the returned :class:`Served` exposes the server's *live* register list so a
test can change what the device reports, and an ``action`` hook for fault injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from firmware_sim.image import RegisterImage

Action = SimAction


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_device(
    regs: list[int],
    base: int,
    unit: int = 1,
    action: Action | None = None,
    input_regs: tuple[int, list[int]] | None = None,
) -> SimDevice:
    """A SimDevice with ``regs`` at ``base`` (holding); with ``input_regs`` = (address, regs),
    separate holding and input tables (as a non-SunSpec meter has)."""
    holding = SimData(address=base, values=list(regs), datatype=DataType.REGISTERS)
    if input_regs is None:
        return SimDevice(id=unit, simdata=[holding], action=action)
    bits = SimData(address=0, values=[False] * 16, datatype=DataType.BITS)
    inputs = SimData(address=input_regs[0], values=list(input_regs[1]),
                     datatype=DataType.REGISTERS)
    bits2 = SimData(address=0, values=[False] * 16, datatype=DataType.BITS)
    return SimDevice(id=unit, simdata=([bits], [bits2], [holding], [inputs]), action=action)


def live_block(server: ModbusTcpServer, unit: int, table: str = "x") -> tuple[int, list[int]]:
    """(start address, live register list) inside a running pymodbus simulator.

    pymodbus keeps a private copy of the SimData values; tests reach into it to change what the
    device reports (the firmware_sim devices use the ``action`` hook for the same purpose).
    """
    runtime = server.context.devices[unit]  # type: ignore[union-attr]
    block = runtime.block[table]
    return block[0], block[2]


@dataclass
class Served:
    server: ModbusTcpServer
    host: str
    port: int
    unit: int
    base: int
    device: SimDevice
    framer: FramerType
    tables: dict[str, tuple[int, list[int]]] = field(default_factory=dict)

    @property
    def regs(self) -> list[int]:
        """Live holding registers, index 0 = ``base``."""
        start, regs = live_block(self.server, self.unit, "x" if "x" in self._blocks() else "h")
        off = self.base - start
        return _View(regs, off)  # type: ignore[return-value]

    def _blocks(self) -> dict[str, Any]:
        return self.server.context.devices[self.unit].block  # type: ignore[union-attr]

    def set_from(self, image: RegisterImage) -> None:
        """Copy an image's registers into the live server."""
        r = self.regs
        for i, v in enumerate(image.regs):
            r[i] = v

    async def stop(self) -> None:
        await self.server.shutdown()
        await asyncio.sleep(0.05)

    async def restart(self) -> None:
        """Start a new server on the same port with the same device (fresh registers)."""
        self.server = ModbusTcpServer(
            context=self.device, address=(self.host, self.port), framer=self.framer
        )
        await self.server.serve_forever(background=True)


class _View:
    """A list view with an offset, so tests index registers from the image base."""

    def __init__(self, regs: list[int], off: int) -> None:
        self._regs, self._off = regs, off

    def __getitem__(self, i: int) -> int:
        return self._regs[self._off + i]

    def __setitem__(self, i: int, v: int) -> None:
        self._regs[self._off + i] = v


ServeFn = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    """Factory: ``await serve(image_or_regs, base=..., unit=1, action=None, framer="socket",
    ignore_missing_devices=False, input_regs=None)``; all servers stop at teardown."""
    started: list[Served] = []

    async def _serve(
        image: RegisterImage | list[int],
        *,
        base: int | None = None,
        unit: int = 1,
        action: Action | None = None,
        framer: str = "socket",
        ignore_missing_devices: bool = False,
        input_regs: tuple[int, list[int]] | None = None,
    ) -> Served:
        if isinstance(image, RegisterImage):
            regs, b = image.regs, image.base
        else:
            regs, b = image, 0 if base is None else base
        if base is not None:
            b = base
        dev = sim_device(regs, b, unit, action, input_regs)
        ftype = FramerType.RTU if framer == "rtu" else FramerType.SOCKET
        port = free_port()
        server = ModbusTcpServer(
            context=dev,
            address=("127.0.0.1", port),
            framer=ftype,
            ignore_missing_devices=ignore_missing_devices,
        )
        await server.serve_forever(background=True)
        s = Served(server, "127.0.0.1", port, unit, b, dev, ftype)
        started.append(s)
        return s

    yield _serve
    for s in started:
        with contextlib.suppress(Exception):
            await s.server.shutdown()
