"""A local MQTT broker for the demo: Mosquitto when installed, else an embedded amqtt broker.

Production never uses this: a gateway connects to the broker in its config. ``hems demo`` (and
the bench) need *some* broker and must not require a system package, so:

1. ``mosquitto`` on ``$PATH`` or at ``/usr/sbin/mosquitto`` -> started as a child process with a
   generated config on a free 127.0.0.1 port (anonymous, loopback only);
2. else the ``amqtt`` package (pure Python, MQTT 3.1.1 only) -> an embedded broker in this event
   loop. The gateway's client only uses 3.1.1 features (QoS 0/1, retain, will, clean sessions),
   so it behaves the same on both;
3. else :class:`BrokerUnavailable` saying what to install.

The caller reports which one it got (``LocalBroker.kind``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """Neither Mosquitto nor amqtt can be started."""


@dataclass(frozen=True)
class LocalBroker:
    """A running local broker."""

    kind: str  # "mosquitto" | "amqtt"
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, if installed."""
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _wait_listening(host: str, port: int, timeout_s: float,
                          alive: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise BrokerUnavailable("the broker exited during start-up")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return
    raise BrokerUnavailable(f"the broker did not listen on {host}:{port} within {timeout_s} s")


@contextlib.asynccontextmanager
async def _mosquitto(exe: str, host: str, port: int) -> AsyncIterator[LocalBroker]:
    with tempfile.TemporaryDirectory(prefix="hems-mosquitto-") as d:
        conf = Path(d) / "mosquitto.conf"
        lines = [f"listener {port} {host}", "allow_anonymous true", "persistence false",
                 "max_queued_messages 100000", "log_dest stderr", "log_type error",
                 "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read d
        conf.write_text("\n".join(lines) + "\n")
        proc = await asyncio.create_subprocess_exec(
            exe, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            try:
                await _wait_listening(host, port, 10.0, alive=lambda: proc.returncode is None)
            except BrokerUnavailable as e:
                err = b""
                if proc.stderr is not None and proc.returncode is not None:
                    err = await proc.stderr.read()
                raise BrokerUnavailable(f"mosquitto ({exe}): {e} {err.decode()[-300:]}") from None
            yield LocalBroker("mosquitto", host, port)
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


@contextlib.asynccontextmanager
async def _amqtt(host: str, port: int) -> AsyncIterator[LocalBroker]:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Anonymous auth only: no $SYS publisher, no packet logger (CPU on a Pi).
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    try:
        await _wait_listening(host, port, 10.0)
        yield LocalBroker("amqtt", host, port)
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()


@contextlib.asynccontextmanager
async def local_broker(prefer: str = "auto", host: str = "127.0.0.1",
                       port: int = 0) -> AsyncIterator[LocalBroker]:
    """Start a loopback broker for the demo; ``prefer``: auto | mosquitto | amqtt."""
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"prefer must be auto, mosquitto or amqtt, got {prefer!r}")
    port = port or _free_port(host)
    exe = find_mosquitto() if prefer in ("auto", "mosquitto") else None
    if exe is not None:
        async with _mosquitto(exe, host, port) as b:
            yield b
        return
    if prefer in ("auto", "amqtt") and amqtt_available():
        async with _amqtt(host, port) as b:
            yield b
        return
    want = {"auto": "mosquitto (apt-get install mosquitto) or amqtt (pip install amqtt)",
            "mosquitto": "mosquitto (apt-get install mosquitto)",
            "amqtt": "amqtt (pip install amqtt)"}[prefer]
    raise BrokerUnavailable(f"no MQTT broker available for the demo: install {want}")
