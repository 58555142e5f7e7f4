"""The daemon as a process (``python -m gateway.daemon CONFIG`` = ``hems run --config``):
SIGKILL mid-write, SIGTERM, the LWT, and exit codes. Devices: simulated, over real Modbus TCP
served by this test process; broker: a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.clock import WallClock
from firmware_sim.home import HomeConfig
from firmware_sim.server import SimulatedHome, run_home
from gateway.store import integrity_check

from .daemon_helpers import Collector, profiles, retained, wait_until

ROOT = Path(__file__).resolve().parents[2]
T = "hems/v1/home-1"
COMMITTED = re.compile(r"store: committed up to seq (\d+)")


def write_config(path: Path, sim: SimulatedHome, broker_url: str, db: Path) -> Path:
    devices = "\n".join(
        f'[[devices]]\nkind = "{e.kind}"\nhost = "{e.host}"\nport = {e.port}\nunit = {e.unit}\n'
        for e in sim.endpoints)
    path.write_text(f"""site_id = "home-1"
{devices}
[broker]
url = "{broker_url}"
keepalive_s = 5
[control]
cycle_s = 0.2
revert_s = 10
startup_grace_s = 1
[store]
path = "{db}"
telemetry_interval_s = 1
commit_interval_s = 0.2
[mqtt]
state_interval_s = 1
""")
    return path


class Daemon:
    """A daemon subprocess whose stderr is followed line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.committed = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            m = COMMITTED.search(line)
            if m:
                self.committed = int(m.group(1))

    async def wait(self, limit_s: float = 30.0) -> int:
        rc = await asyncio.wait_for(self.proc.wait(), limit_s)
        await asyncio.wait_for(self._reader, 5)
        return rc


async def start_daemon(config: Path) -> Daemon:
    env = dict(os.environ, HEMS_LOG_LEVEL="INFO,gateway.daemon=DEBUG", PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.daemon", str(config), cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    return Daemon(proc)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedHome]:
    load, pv = profiles()
    async with run_home(WallClock(), HomeConfig(), load=load, pv=pv) as home:
        yield home


@contextlib.asynccontextmanager
async def killed_on_exit(d: Daemon) -> AsyncIterator[Daemon]:
    try:
        yield d
    finally:
        if d.proc.returncode is None:
            d.proc.kill()
            await d.proc.wait()


async def test_sigkill_mid_write_keeps_every_committed_row(sim: SimulatedHome, mosquitto: Any,
                                                           tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    cfg = write_config(tmp_path / "gw.toml", sim, mosquitto.url, db)
    async with Collector(mosquitto.port, topics=(f"{T}/availability",), client_id="lwt") as col:
        for _ in range(2):  # kill twice: the second run starts from a killed database
            d = await start_daemon(cfg)
            async with killed_on_exit(d):
                def three_commits(d: Daemon = d) -> bool:
                    return d.committed >= 3 or d.proc.returncode is not None

                await wait_until(three_commits, 30, "three commits")
                assert d.proc.returncode is None, "\n".join(d.lines[-20:])
                n_online = sum(m.payload == b"online" for m in col.messages)
                d.proc.send_signal(signal.SIGKILL)
                assert await d.wait() == -signal.SIGKILL
            committed = d.committed
            # The broker saw the connection die and published the will: "offline".
            await wait_until(lambda: bool(col.messages) and col.messages[-1].payload == b"offline",
                             15, "LWT offline")
            assert n_online >= 1
            assert integrity_check(db) == "ok"
            conn = sqlite3.connect(db)
            seqs = [r[0] for r in conn.execute("SELECT seq FROM telemetry ORDER BY seq")]
            conn.close()
            assert seqs == list(range(1, len(seqs) + 1)), "gap in the stored sequence"
            assert seqs[-1] >= committed, f"committed seq {committed} lost (have {seqs[-1]})"

        # A clean restart continues the sequence after the last committed row.
        d = await start_daemon(cfg)
        async with killed_on_exit(d):
            await wait_until(lambda: d.committed > seqs[-1], 30, "a new commit")
            d.proc.send_signal(signal.SIGTERM)
            assert await d.wait() == 0, "\n".join(d.lines[-20:])
        assert integrity_check(db) == "ok"
        kept = await retained(mosquitto.port, f"{T}/availability")
        assert kept[f"{T}/availability"] == b"offline"
    assert any("battery released" in line for line in d.lines)
    assert sim.physics.storage.mode == 0


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('site_id = "x"\n[broker]\nurl = "tcp://h"\n[[devices]]\nkind = "meter"\n'
                   'host = "127.0.0.1"\n')
    d = await start_daemon(cfg)
    assert await d.wait() == 2
    assert d.lines == ["hems: config key 'broker.url': must start with mqtt:// or mqtts://, "
                       "got 'tcp://h'"]


async def test_corrupt_database_exits_3_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    db.write_bytes(b"garbage" * 1000)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'site_id = "x"\n[broker]\nurl = "mqtt://127.0.0.1:1"\n[[devices]]\n'
                   f'kind = "meter"\nhost = "127.0.0.1"\n[store]\npath = "{db}"\n')
    d = await start_daemon(cfg)
    assert await d.wait() == 3
    assert any("is corrupt or not an SQLite file" in line and str(db) in line
               for line in d.lines), d.lines
    assert db.read_bytes() == b"garbage" * 1000  # untouched: nothing stored is destroyed
