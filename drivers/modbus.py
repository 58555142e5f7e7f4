"""One Modbus connection to one device (unit): bounded, reconnecting, with clear errors.

:class:`ModbusLink` wraps a pymodbus 3.16 asyncio client (TCP, RTU-over-TCP for serial gateways,
or RTU on a serial port) and adds what a control loop needs from a wire:

* every connect and every request is bounded (pymodbus' own timeout, plus ``asyncio.timeout`` as
  a hard outer bound), and pymodbus' own retries and auto-reconnect are off: a control loop
  retries on its next cycle, with fresh data, instead of piling up stale requests;
* reconnect happens on the next request, with exponential, jittered backoff (0.5 s .. 30 s) while
  the device stays unreachable, so a dead device costs nothing but a fast :class:`DeviceError`;
* a request that timed out drops the connection, so a late reply can never be taken for the
  answer to the next request (RTU frames carry no transaction id);
* errors are :class:`~drivers.natures.DeviceTimeout`, :class:`~drivers.natures.DeviceRejected`
  (a Modbus exception, named, e.g. ``ILLEGAL DATA ADDRESS (2) reading 40070+107``) or
  :class:`~drivers.natures.DeviceError` (unreachable, connection dropped), each naming the device,
  its ``host:port/unit`` and what was wrong;
* counters (``requests``, ``errors``, ``reconnects``, ``last_error``) for telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerType

from drivers.inproc import InProcessClient
from drivers.natures import DeviceError, DeviceRejected, DeviceTimeout

_UNBOUNDED = contextlib.nullcontext()

#: Modbus limits per request (Modbus application protocol v1.1b3, FC03/04 and FC16).
MAX_READ = 125
MAX_WRITE = 123

#: Modbus exception codes, named as the Modbus specification names them.
EXCEPTION_NAMES: dict[int, str] = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    7: "NEGATIVE ACKNOWLEDGE",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}

class WriteRefused(DeviceRejected):
    """hems refused a write before touching the wire (read-only point, value out of range)."""


BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0

_Client = AsyncModbusTcpClient | AsyncModbusSerialClient | InProcessClient


def exception_name(code: int) -> str:
    """``"ILLEGAL DATA ADDRESS (2)"`` for code 2; unknown codes are named by number."""
    return f"{EXCEPTION_NAMES.get(code, 'UNKNOWN EXCEPTION')} ({code})"


def backoff_delay(failures: int, lo: float = BACKOFF_MIN_S, hi: float = BACKOFF_MAX_S,
                  jitter: float = 0.2) -> float:
    """Delay before the next connect attempt after ``failures`` consecutive failures.

    Doubles from ``lo`` up to ``hi``, then +-``jitter`` so that many gateways restarted together
    do not hammer a shared serial gateway in lock-step.
    """
    if failures <= 0:
        return 0.0
    base = min(hi, lo * 2.0 ** (failures - 1))
    return base * random.uniform(1.0 - jitter, 1.0 + jitter)


class ModbusLink:
    """A bounded, self-reconnecting Modbus client for one unit on one transport.

    Build with :meth:`tcp` or :meth:`rtu` inside a running event loop (pymodbus clients bind
    to it). All I/O methods are coroutines and serialize on an internal lock (one request in
    flight per link, as Modbus requires on a serial line). Nothing connects until the first
    request (or :meth:`connect`).
    """

    def __init__(
        self,
        client: _Client,
        *,
        unit: int,
        where: str,
        name: str,
        timeout_s: float,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        _check_args(name, unit, timeout_s)
        self._client = client
        # A client that answers at once or waits out its own timeout (the in-process transport)
        # needs no outer timer: a fleet simulation makes thousands of requests a second, and
        # every timer armed is a heap entry that lives, cancelled, until its deadline.
        self._bounded = bool(getattr(client, "bounds_its_wait", False))
        self.unit = unit
        self.where = where
        self.name = name
        self.timeout_s = float(timeout_s)
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._lock = asyncio.Lock()
        self._failures = 0  # consecutive failed connects
        self._next_attempt = 0.0  # monotonic time before which no connect is tried
        self._ever_connected = False
        self._closed = False
        # counters
        self.requests = 0
        self.errors = 0
        self.reconnects = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        unit: int,
        *,
        timeout_s: float = 1.0,
        name: str | None = None,
        framer: Literal["socket", "rtu"] = "socket",
    ) -> ModbusLink:
        """Modbus TCP (``framer="socket"``), or RTU frames over a TCP socket (``"rtu"``), as
        spoken by many RS-485-to-Ethernet serial gateways in "transparent" mode."""
        ftype = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU}.get(framer)
        if ftype is None:
            raise ValueError(f"framer must be 'socket' or 'rtu', got {framer!r}")
        _check_args(name or host, unit, timeout_s)
        where = f"{host}:{port}/unit {unit}" + (" (rtu over tcp)" if framer == "rtu" else "")
        client = AsyncModbusTcpClient(
            host,
            port=port,
            framer=ftype,
            name=name or f"{host}:{port}",
            timeout=timeout_s,
            retries=0,
            reconnect_delay=0,  # we reconnect ourselves, on demand, with backoff
        )
        return cls(client, unit=unit, where=where, name=name or where, timeout_s=timeout_s)

    @classmethod
    def rtu(
        cls,
        serial_port: str,
        unit: int,
        *,
        baudrate: int = 9600,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: int = 1,
        timeout_s: float = 1.0,
        name: str | None = None,
    ) -> ModbusLink:
        """Modbus RTU on a serial port (RS-485 adapter)."""
        if parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be 'N', 'E' or 'O', got {parity!r}")
        _check_args(name or serial_port, unit, timeout_s)
        where = f"{serial_port}@{baudrate}{parity}{stopbits}/unit {unit}"
        client = AsyncModbusSerialClient(
            serial_port,
            framer=FramerType.RTU,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            name=name or serial_port,
            timeout=timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        return cls(client, unit=unit, where=where, name=name or where, timeout_s=timeout_s)

    @classmethod
    def inproc(
        cls, name: str, unit: int, *, timeout_s: float = 1.0, label: str | None = None
    ) -> ModbusLink:
        """A device registered in this process under ``name`` (:mod:`drivers.inproc`: for
        simulations of many homes in one process; the same requests, no bytes on a wire)."""
        _check_args(label or name, unit, timeout_s)
        where = f"inproc:{name}/unit {unit}"
        return cls(InProcessClient(name, timeout_s), unit=unit, where=where,
                   name=label or where, timeout_s=timeout_s)

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        """Connect now (normally not needed: requests connect on demand)."""
        async with self._lock:
            self._closed = False
            self._next_attempt = 0.0
            await self._ensure_connected()

    async def close(self) -> None:
        """Close the connection. A later request reconnects."""
        self._client.close()

    async def __aenter__(self) -> ModbusLink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Counters, JSON-able."""
        return {
            "name": self.name,
            "where": self.where,
            "connected": self.connected,
            "requests": self.requests,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        return f"ModbusLink({self.name!r}, {self.where!r})"

    # ------------------------------------------------------------------ requests
    async def read_holding(self, address: int, count: int) -> list[int]:
        """Read ``count`` holding registers (FC03) from ``address``; splits > 125 registers."""
        return await self._read(address, count, "holding")

    async def read_input(self, address: int, count: int) -> list[int]:
        """Read ``count`` input registers (FC04) from ``address``; splits > 125 registers."""
        return await self._read(address, count, "input")

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        """Write holding registers (FC16) from ``address``; splits > 123 registers."""
        vals = [int(v) for v in values]
        _check_span(self.name, address, len(vals))
        if any(not 0 <= v <= 0xFFFF for v in vals):
            raise ValueError(f"{self.name}: register values must be 0..65535, got {vals}")
        for off in range(0, len(vals), MAX_WRITE):
            chunk = vals[off : off + MAX_WRITE]
            addr = address + off
            await self._request(f"writing {addr}+{len(chunk)}", _write_call(addr, chunk, self.unit))

    async def _read(self, address: int, count: int, table: str) -> list[int]:
        _check_span(self.name, address, count)
        out: list[int] = []
        for off in range(0, count, MAX_READ):
            n = min(MAX_READ, count - off)
            addr = address + off
            what = f"reading {addr}+{n}" + (" (input registers)" if table == "input" else "")
            call = _read_call(table, addr, n, self.unit)
            rsp = await self._request(what, call)
            regs = list(getattr(rsp, "registers", []) or [])
            if len(regs) < n:
                err = DeviceError(
                    self.name, f"short reply from {self.where} {what}: got {len(regs)} registers"
                )
                self._count_error(err)
                raise err
            out.extend(regs[:n])
        return out

    @property
    def bounds_its_wait(self) -> bool:
        """True when every request answers at once or fails by itself within ``timeout_s``
        (the in-process transport): a caller need not arm its own timer around a read."""
        return self._bounded

    async def _request(self, what: str, call: Callable[[_Client], Awaitable[Any]]) -> Any:
        async with self._lock:
            self.requests += 1
            try:
                await self._ensure_connected()
                return await self._exchange(what, call)
            except DeviceError as e:
                self._count_error(e)
                raise

    def _count_error(self, e: DeviceError) -> None:
        self.errors += 1
        self.last_error = e.reason

    async def _exchange(self, what: str, call: Callable[[_Client], Awaitable[Any]]) -> Any:
        try:
            # pymodbus bounds the wait itself (timeout_s, no retries); this is the hard outer
            # bound in case anything inside it does not return.
            async with (_UNBOUNDED if self._bounded else asyncio.timeout(self.timeout_s + 0.5)):
                rsp = await call(self._client)
        except asyncio.CancelledError:
            # The caller gave up mid-request: the reply may still come and would be taken for
            # the answer to the next request (RTU has no transaction id), so start afresh.
            self._drop()
            raise
        except TimeoutError:
            self._drop()
            raise DeviceTimeout(
                self.name, f"no reply from {self.where} within {self.timeout_s:g} s {what}"
            ) from None
        except ConnectionException as e:
            self._drop()
            raise DeviceError(self.name, f"connection to {self.where} lost {what}: {e}") from None
        except ModbusException as e:
            # pymodbus raises ModbusIOException for "no response" and for mismatched replies.
            dropped = not self._client.connected
            self._drop()
            if dropped:
                raise DeviceError(
                    self.name, f"connection to {self.where} dropped {what}"
                ) from None
            msg = str(e)
            if "No response" in msg:
                raise DeviceTimeout(
                    self.name, f"no reply from {self.where} within {self.timeout_s:g} s {what}"
                ) from None
            raise DeviceError(self.name, f"bad reply from {self.where} {what}: {msg}") from None
        except OSError as e:
            self._drop()
            raise DeviceError(self.name, f"I/O error on {self.where} {what}: {e}") from None
        if rsp is None:
            raise DeviceError(self.name, f"empty reply from {self.where} {what}")
        if rsp.isError():
            code = int(getattr(rsp, "exception_code", 0))
            hint = ""
            if code in (4, 10, 11):
                hint = " (is the unit id right?)"
            raise DeviceRejected(
                self.name, f"{exception_name(code)} {what} at {self.where}{hint}"
            )
        return rsp

    def _drop(self) -> None:
        """Close after a failed exchange; the next request reconnects at once."""
        self._client.close()

    async def _ensure_connected(self) -> None:
        if self._client.connected:
            return
        now = time.monotonic()
        if now < self._next_attempt:
            raise DeviceError(
                self.name,
                f"{self.where} unreachable ({self.last_error or 'not connected'}); "
                f"next connect attempt in {self._next_attempt - now:.1f} s",
            )
        if self._ever_connected:
            self.reconnects += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):
                ok = await self._client.connect()
        except TimeoutError:
            ok = False
        except OSError:
            ok = False
        if ok and self._client.connected:
            self._failures = 0
            self._next_attempt = 0.0
            self._ever_connected = True
            return
        self._client.close()
        self._failures += 1
        delay = backoff_delay(self._failures, self.backoff_min_s, self.backoff_max_s)
        self._next_attempt = time.monotonic() + delay
        elapsed = time.monotonic() - t0
        why = (
            f"connect timed out after {elapsed:.1f} s"
            if elapsed >= self.timeout_s * 0.9
            else "connection refused or port unavailable"
        )
        raise DeviceError(
            self.name,
            f"cannot connect to {self.where}: {why}; retry in {delay:.1f} s "
            f"(attempt {self._failures})",
        )


def _check_args(name: str, unit: int, timeout_s: float) -> None:
    if not 0 <= unit <= 255:
        raise ValueError(f"{name}: Modbus unit id must be 0..255, got {unit}")
    if not timeout_s > 0:
        raise ValueError(f"{name}: timeout_s must be > 0, got {timeout_s}")


def _check_span(name: str, address: int, count: int) -> None:
    if count <= 0:
        raise ValueError(f"{name}: register count must be > 0, got {count}")
    if address < 0 or address + count > 0x10000:
        raise ValueError(f"{name}: registers {address}+{count} outside 0..65535")


_Call = Callable[[_Client], Awaitable[Any]]


def _read_call(table: str, address: int, count: int, unit: int) -> _Call:
    def call(c: _Client) -> Awaitable[Any]:
        if table == "input":
            return c.read_input_registers(address, count=count, device_id=unit)
        return c.read_holding_registers(address, count=count, device_id=unit)

    return call


def _write_call(address: int, values: list[int], unit: int) -> _Call:
    def call(c: _Client) -> Awaitable[Any]:
        return c.write_registers(address, values, device_id=unit)

    return call
