"""An in-process Modbus transport, for simulations that run many homes in one process.

A Modbus TCP round trip through pymodbus costs about 1 ms of CPU on each side (framing, the
asyncio transports, the server's request handler), and a community of 50 simulated homes polls
three devices each every few seconds: the wire, not the gateways, would use most of the CPU.
``transport = "inproc"`` keeps everything a gateway does with a device (SunSpec discovery and
decoding, scale factors, read-back of writes, the :class:`~drivers.modbus.ModbusLink` error
mapping: exception codes, timeouts, dropped connections) and replaces only the bytes on the wire
with a call to a device registered in the same process under a name (the config's ``host``).

It is for simulations (``firmware_sim`` registers its devices here); a gateway on real hardware
never has anything registered, and a link to an unknown name fails like a refused connection.
Faults keep their meaning: a device that does not answer makes the request wait until the link's
timeout, a dropped connection is a lost connection, a Modbus exception is an exception response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from pymodbus.exceptions import ConnectionException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
)

#: Modbus function codes the transport carries (what :class:`~drivers.modbus.ModbusLink` sends).
READ_HOLDING = 3
READ_INPUT = 4
WRITE_MULTIPLE = 16


class DropConnection(Exception):
    """Raised by a :class:`RegisterServer` to drop the connection (as a TCP reset would)."""


class NoReply(Exception):
    """Raised by a :class:`RegisterServer` that does not answer: the client waits its timeout
    and fails as pymodbus would (no timer is armed for requests that are answered)."""


class RegisterServer(Protocol):
    """What a device registered in this process answers (see :func:`serve`)."""

    async def modbus_request(
        self, unit: int, function_code: int, address: int, count: int,
        values: list[int] | None,
    ) -> list[int] | int:
        """The registers read (FC 3/4), ``[]`` for a good write (FC 16), or a Modbus exception
        code (int). May raise :class:`DropConnection`, or :class:`NoReply` (no reply). Must not
        suspend for long: the client arms no timer around it."""
        ...


class _Entry:
    """A registered server and its connection generation (bumped to drop every client)."""

    __slots__ = ("generation", "server")

    def __init__(self, server: RegisterServer) -> None:
        self.server = server
        self.generation = 0


_SERVERS: dict[str, _Entry] = {}


def serve(name: str, server: RegisterServer) -> None:
    """Register ``server`` under ``name`` (a link with ``host = name`` reaches it)."""
    if not name:
        raise ValueError("an in-process device needs a name")
    if name in _SERVERS:
        raise ValueError(f"in-process device name {name!r} is already served")
    _SERVERS[name] = _Entry(server)


def unserve(name: str) -> None:
    """Remove ``name``; links to it then fail as a refused connection would."""
    _SERVERS.pop(name, None)


def disconnect(server: RegisterServer) -> int:
    """Drop every client connected to ``server`` (under any name), as closing its TCP
    connections would; clients reconnect on their next request. Returns the names affected."""
    n = 0
    for e in _SERVERS.values():
        if e.server is server:
            e.generation += 1
            n += 1
    return n


def served() -> list[str]:
    """Names currently registered (for diagnostics)."""
    return sorted(_SERVERS)


class InProcessClient:
    """The small part of pymodbus' async client API that :class:`~drivers.modbus.ModbusLink`
    uses, answered by a registered :class:`RegisterServer` instead of a socket."""

    #: A request returns at once (servers do not suspend: :class:`RegisterServer`) or, for a
    #: server that does not answer, after this client's own ``timeout_s``; the link arms no
    #: timer of its own (:class:`~drivers.modbus.ModbusLink`).
    bounds_its_wait = True

    def __init__(self, name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self._entry: _Entry | None = None
        self._generation = -1

    @property
    def connected(self) -> bool:
        e = self._entry
        return (e is not None and _SERVERS.get(self.name) is e
                and e.generation == self._generation)

    async def connect(self) -> bool:
        e = _SERVERS.get(self.name)
        self._entry = e
        self._generation = e.generation if e is not None else -1
        return e is not None

    def close(self) -> None:
        self._entry = None

    async def read_holding_registers(self, address: int, *, count: int = 1,
                                     device_id: int = 1) -> ModbusPDU:
        return await self._call(device_id, READ_HOLDING, address, count, None)

    async def read_input_registers(self, address: int, *, count: int = 1,
                                   device_id: int = 1) -> ModbusPDU:
        return await self._call(device_id, READ_INPUT, address, count, None)

    async def write_registers(self, address: int, values: Sequence[int], *,
                              device_id: int = 1) -> ModbusPDU:
        return await self._call(device_id, WRITE_MULTIPLE, address, len(values), list(values))

    async def _call(self, unit: int, fc: int, address: int, count: int,
                    values: list[int] | None) -> ModbusPDU:
        if not self.connected:
            self._entry = None
            raise ConnectionException(f"in-process device {self.name!r}: not connected")
        assert self._entry is not None
        try:
            # No timer per request (a fleet simulation makes thousands a second): a server
            # answers at once or raises NoReply; the link's own hard bound covers the rest.
            out = await self._entry.server.modbus_request(unit, fc, address, count, values)
        except DropConnection:
            self._entry = None
            raise ConnectionException(
                f"in-process device {self.name!r} dropped the connection") from None
        except NoReply:
            # as pymodbus would: wait out the timeout, then give up on this request
            await asyncio.sleep(self.timeout_s)
            raise TimeoutError(f"in-process device {self.name!r}: no reply within "
                               f"{self.timeout_s:g} s") from None
        if isinstance(out, int):
            return ExceptionResponse(fc, out, device_id=unit)
        if fc == WRITE_MULTIPLE:
            return WriteMultipleRegistersResponse(dev_id=unit, address=address, count=count)
        cls = ReadInputRegistersResponse if fc == READ_INPUT else ReadHoldingRegistersResponse
        return cls(dev_id=unit, registers=out)
