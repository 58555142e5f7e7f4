"""ModbusLink against real pymodbus servers: reads, splits, errors, timeouts, reconnects, RTU."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from modbus_servers import ServeFn, free_port, sim_device
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer

from drivers.modbus import ModbusLink, backoff_delay, exception_name
from drivers.natures import DeviceError, DeviceRejected, DeviceTimeout

# A hang guard, not a speed assertion: every test below must end, whatever the device does.
GUARD_S = 10.0


def link_for(s, **kw) -> ModbusLink:  # type: ignore[no-untyped-def]
    return ModbusLink.tcp(s.host, s.port, s.unit, **kw)


async def test_read_write_roundtrip(serve: ServeFn) -> None:
    s = await serve(list(range(100)), base=1000)
    async with link_for(s, name="dev") as link:
        assert await link.read_holding(1010, 3) == [10, 11, 12]
        await link.write_registers(1020, [7, 8])
        assert await link.read_holding(1019, 4) == [19, 7, 8, 22]
        assert s.regs[20] == 7  # the server really holds it
        assert link.requests == 3 and link.errors == 0


async def test_reads_and_writes_longer_than_one_request_are_split(serve: ServeFn) -> None:
    regs = [(i * 7) & 0xFFFF for i in range(400)]
    s = await serve(regs, base=0)
    async with link_for(s) as link:
        assert await link.read_holding(0, 400) == regs
        assert link.requests == 4  # 125 + 125 + 125 + 25
        await link.write_registers(10, list(range(200)))
        assert link.requests == 6  # 123 + 77
        assert await link.read_holding(10, 200) == list(range(200))


async def test_modbus_exception_is_named(serve: ServeFn) -> None:
    s = await serve([1, 2, 3], base=40000)
    async with link_for(s, name="meter1") as link:
        with pytest.raises(DeviceRejected) as ei:
            await link.read_holding(40070, 107)
        msg = str(ei.value)
        assert "meter1" in msg
        assert "ILLEGAL DATA ADDRESS (2) reading 40070+107" in msg
        assert f"127.0.0.1:{s.port}/unit 1" in msg
        assert link.errors == 1 and link.last_error is not None
        # the connection survives an exception reply
        assert await link.read_holding(40000, 3) == [1, 2, 3]


def test_exception_names() -> None:
    assert exception_name(3) == "ILLEGAL DATA VALUE (3)"
    assert exception_name(99) == "UNKNOWN EXCEPTION (99)"


async def test_write_rejected_with_illegal_value(serve: ServeFn) -> None:
    async def reject_writes(fc, start, addr, count, regs, values):
        return ExcCodes.ILLEGAL_VALUE if values is not None else None

    s = await serve([0] * 10, base=0, action=reject_writes)
    async with link_for(s) as link:
        with pytest.raises(DeviceRejected, match=r"ILLEGAL DATA VALUE \(3\) writing 2\+1"):
            await link.write_registers(2, [5])


async def test_timeout_is_bounded(serve: ServeFn) -> None:
    async def slow(fc, start, addr, count, regs, values):
        await asyncio.sleep(3.0)

    s = await serve([0] * 10, base=0, action=slow)
    link = link_for(s, timeout_s=0.2, name="slowdev")
    async with asyncio.timeout(GUARD_S):
        with pytest.raises(
            DeviceTimeout, match=r"slowdev: no reply from .* within 0.2 s reading 0\+2"
        ):
            await link.read_holding(0, 2)
    assert link.errors == 1
    await link.close()


async def test_unreachable_port_fails_fast_then_backs_off() -> None:
    port = free_port()  # nothing listens there
    link = ModbusLink.tcp("127.0.0.1", port, 1, timeout_s=0.5, name="gone")
    async with asyncio.timeout(GUARD_S):
        with pytest.raises(
            DeviceError, match=r"gone: cannot connect to 127.0.0.1:\d+/unit 1"
        ) as ei:
            await link.read_holding(0, 1)
        assert not isinstance(ei.value, DeviceTimeout | DeviceRejected)
        # within the backoff window the link does not even try: it says when it will
        with pytest.raises(DeviceError, match="next connect attempt in"):
            await link.read_holding(0, 1)
    assert link.errors == 2


def test_backoff_doubles_bounded_and_jittered() -> None:
    assert backoff_delay(0) == 0.0
    for n, base in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)]:
        d = backoff_delay(n)
        assert base * 0.8 <= d <= base * 1.2, (n, d)


async def test_dropped_connection_then_reconnect(serve: ServeFn) -> None:
    s = await serve([5, 6, 7], base=0)
    link = link_for(s, timeout_s=0.5, name="flaky")
    link.backoff_min_s = 0.02  # keep the test short; the schedule itself is tested above
    async with asyncio.timeout(GUARD_S):
        assert await link.read_holding(0, 3) == [5, 6, 7]
        await s.stop()  # drops the connection
        with pytest.raises(DeviceError):
            await link.read_holding(0, 3)
        await s.restart()
        for _ in range(100):
            try:
                got = await link.read_holding(0, 3)
                break
            except DeviceError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail(f"never reconnected: {link.stats()}")
    assert got == [5, 6, 7]
    assert link.reconnects >= 1
    assert link.errors >= 1
    await link.close()


async def test_wrong_unit_id_is_named(serve: ServeFn) -> None:
    s = await serve([1, 2], base=0, unit=1)
    link = ModbusLink.tcp(s.host, s.port, 7, timeout_s=0.3)
    with pytest.raises(DeviceRejected, match=r"unit 7.*is the unit id right"):
        await link.read_holding(0, 2)
    await link.close()


async def test_silent_device_times_out() -> None:
    """A gateway that accepts the connection but never answers (e.g. nothing at that unit on
    its RS-485 side) gives DeviceTimeout, and the next request tries again."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(256):
            pass
        writer.close()

    srv = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    link = ModbusLink.tcp("127.0.0.1", port, 7, timeout_s=0.2)
    try:
        async with asyncio.timeout(GUARD_S):
            for _ in range(2):
                with pytest.raises(DeviceTimeout, match=r"no reply from .*unit 7 within 0.2 s"):
                    await link.read_holding(0, 2)
        assert link.errors == 2
    finally:
        await link.close()
        srv.close()
        await srv.wait_closed()


async def test_rtu_framing_over_tcp(serve: ServeFn) -> None:
    """A serial gateway in transparent mode: RTU frames (with CRC) over a TCP socket."""
    s = await serve(list(range(50)), base=100, unit=3, framer="rtu")
    link = ModbusLink.tcp(s.host, s.port, 3, framer="rtu", timeout_s=0.5)
    assert "rtu over tcp" in link.where
    async with asyncio.timeout(GUARD_S):
        assert await link.read_holding(110, 5) == [10, 11, 12, 13, 14]
        await link.write_registers(120, [999])
        assert await link.read_holding(120, 1) == [999]
    await link.close()


async def test_socket_client_cannot_talk_to_rtu_server(serve: ServeFn) -> None:
    """Framer mismatch gives a bounded error, not a hang."""
    s = await serve([1], base=0, framer="rtu")
    link = ModbusLink.tcp(s.host, s.port, 1, framer="socket", timeout_s=0.3)
    async with asyncio.timeout(GUARD_S):
        with pytest.raises(DeviceError):
            await link.read_holding(0, 1)
    await link.close()


@pytest.fixture
def pty_pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two linked pseudo-terminals (a null-modem cable) made by socat."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed (apt-get install socat): no pty pair for RTU")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if a.exists() and b.exists():
                break
            import time

            time.sleep(0.01)
        else:
            pytest.fail("socat did not create the pty pair")
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def test_rtu_over_a_real_serial_line(pty_pair) -> None:  # type: ignore[no-untyped-def]
    server_port, client_port = pty_pair
    server = ModbusSerialServer(
        context=sim_device(list(range(30)), 40000, unit=5),
        framer=FramerType.RTU,
        port=server_port,
        baudrate=19200,
    )
    await server.serve_forever(background=True)
    link = ModbusLink.rtu(client_port, 5, baudrate=19200, timeout_s=0.5, name="rs485")
    try:
        async with asyncio.timeout(GUARD_S):
            assert await link.read_holding(40003, 4) == [3, 4, 5, 6]
            await link.write_registers(40010, [4242, 7])
            assert await link.read_holding(40009, 4) == [9, 4242, 7, 12]
            with pytest.raises(DeviceRejected, match="ILLEGAL DATA ADDRESS"):
                await link.read_holding(41000, 2)
    finally:
        await link.close()
        await server.shutdown()


async def test_rtu_missing_serial_port_is_a_clear_error(tmp_path: Path) -> None:
    link = ModbusLink.rtu(str(tmp_path / "no-such-tty"), 1, timeout_s=0.3)
    with pytest.raises(DeviceError, match=r"cannot connect to .*no-such-tty"):
        await link.read_holding(0, 1)


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unit id"):
        ModbusLink.tcp("127.0.0.1", 502, 300)
    with pytest.raises(ValueError, match="framer"):
        ModbusLink.tcp("127.0.0.1", 502, 1, framer="ascii")  # type: ignore[arg-type]


async def test_cancelled_request_does_not_leak_its_late_reply(serve: ServeFn) -> None:
    """RTU frames carry no transaction id: after a caller gives up on a request, its late reply
    must not be taken for the answer to the next one."""
    delays = [0.35, 0.3]

    async def slow(fc, start, addr, count, regs, values):
        if delays:
            await asyncio.sleep(delays.pop(0))

    s = await serve([100 + i for i in range(10)], base=0, framer="rtu", action=slow)
    link = ModbusLink.tcp(s.host, s.port, 1, framer="rtu", timeout_s=1.0)
    async with asyncio.timeout(GUARD_S):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await link.read_holding(0, 2)
        # the reply to the abandoned request (at ~0.35 s) would arrive while this one waits
        assert await link.read_holding(5, 2) == [105, 106]
    await link.close()
