"""Soak: one home for a simulated week (accelerated) with faults sprinkled in.

The daemon runs as its own process (``main_run``, the ``hems run`` code path, planner enabled) on
an accelerated SimClock shared with this process, which serves the simulated home over Modbus TCP,
runs a Mosquitto broker (persistence on), publishes the DSO's stress day every simulated day
(``community.scenarios.stress_day`` via ``community.dso.DsoPublisher``), subscribes to the
telemetry like a dashboard would, and injects faults: device timeouts, Modbus exceptions and
dropped connections every few simulated hours, and a broker restart every simulated day.

Printed: the daemon's RSS at the start (after the first simulated hours: imports, first plans)
and at the end, and the growth; the database size (retention keeps it bounded); telemetry rows
produced / stored / published / received by the subscriber / lost; the envelope's exceedances
as the gateway measured them; cycles, overruns, poll errors, planner rounds.

Usage: ``python bench/soak.py [--days 7] [--speed 3000] [--cycle 5]``. Real time is about
``days * 86400 / speed`` seconds. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = Path(HERE).parents[1]
sys.path.insert(0, str(ROOT))

DAY = 86400.0
START = 1_749_945_600.0  # 2025-06-15 00:00 UTC: a summer week


def _child(argv: list[str]) -> int:
    config, start, speed, epoch = argv[0], float(argv[1]), float(argv[2]), float(argv[3])
    import cvxpy  # noqa: F401  (as the daemon with the planner does)

    from drivers.clock import SimClock
    from gateway.daemon import main_run

    return main_run(config, clock=SimClock(start=start, speed=speed, epoch=epoch))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _db_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("gateway.db*"))


async def _soak(days: float, speed: float, cycle_s: float) -> dict[str, Any]:
    import aiomqtt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from community.dso import DsoPublisher
    from community.scenarios import stress_day
    from drivers.clock import SimClock
    from firmware_sim.home import HomeConfig
    from firmware_sim.server import run_home
    from gateway.signing import public_key_to_b64

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import MOSQUITTO, Mosquitto, free_port

    if MOSQUITTO is None:
        raise SystemExit("soak: mosquitto is not installed (apt-get install mosquitto)")
    tmp = Path(tempfile.mkdtemp(prefix="hems-soak-"))
    (tmp / "broker").mkdir()
    broker = Mosquitto(workdir=tmp / "broker", port=free_port())
    broker.start()
    epoch = time.time() + 3.0
    clock = SimClock(start=START, speed=speed, epoch=epoch)
    end = START + days * DAY
    key = Ed25519PrivateKey.generate()
    site = "soak"
    received: set[int] = set()
    dupes = 0
    faults: dict[str, int] = {}
    restarts = 0
    stop_pub = asyncio.Event()
    try:
        async with run_home(clock, HomeConfig(soc0_pct=50.0)) as sim:
            devices = "\n".join(
                f'[[devices]]\nkind = "{e.kind}"\nhost = "{e.host}"\nport = {e.port}\n'
                f'unit = {e.unit}\ntimeout_s = 0.5\n' for e in sim.endpoints)
            cfg = tmp / "gateway.toml"
            # revert_s: at x3000 a 0.5 s real read timeout is 25 domain minutes; the revert
            # time must cover a stalled cycle, as 60 s covers 2 s timeouts at real time.
            revert = max(60.0, 4 * cycle_s, 2.0 * speed)
            cfg.write_text(f"""site_id = "{site}"
{devices}
[broker]
url = "{broker.url}"
keepalive_s = 10
[control]
cycle_s = {cycle_s}
revert_s = {min(revert, 3600.0)}
read_timeout_s = 0.5
startup_grace_s = 5
[store]
path = "{tmp / 'gateway.db'}"
telemetry_interval_s = 60
commit_interval_s = 60
retention_days = 3
event_retention_days = 3
outbox_retention_days = 2
[mqtt]
state_interval_s = 60
[planner]
enabled = true
lat = 36.0
lon = -79.8
pv_kwp = 5.0
[envelope]
dso_public_key = "{public_key_to_b64(key.public_key())}"
fallback_export_w = 1500
""")
            day0 = stress_day(site, START)
            await clock.sleep_until(START + 1.0)  # the DSO signs nothing dated in the future
            pub = DsoPublisher(broker.url, key, clock, [day0.schedule()], identifier="soak-dso")
            pub_task = asyncio.create_task(pub.run(stop_pub))

            async def subscriber() -> None:
                nonlocal dupes
                while True:
                    try:
                        async with aiomqtt.Client(broker.host, broker.port,
                                                  identifier="soak-watcher",
                                                  clean_session=False, timeout=5) as c:
                            await c.subscribe(f"hems/v1/{site}/telemetry", qos=1)
                            async for m in c.messages:
                                p = m.payload
                                seq = json.loads(p if isinstance(p, bytes | str) else b"{}")["seq"]
                                if seq in received:
                                    dupes += 1
                                received.add(seq)
                    except aiomqtt.MqttError:
                        await asyncio.sleep(0.2)

            sub = asyncio.create_task(subscriber())
            env = dict(os.environ, HEMS_LOG_LEVEL="WARNING,gateway.daemon=INFO")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, HERE, "--child", str(cfg), str(START), str(speed), str(epoch),
                cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            lines: list[str] = []

            async def read_err() -> None:
                assert proc.stderr is not None
                async for raw in proc.stderr:
                    lines.append(raw.decode(errors="replace").rstrip())
                    del lines[:-2000]

            reader = asyncio.create_task(read_err())
            warm = START + min(6 * 3600.0, days * DAY * 0.1)
            await clock.sleep_until(warm)
            rss_start, cpu_start, t_start = _rss_mb(proc.pid), _cpu_s(proc.pid), clock.now()
            rss_samples: list[tuple[float, float]] = []
            kinds = ("timeout", "exception", "drop")
            next_fault = warm + 3 * 3600.0
            next_day = START + DAY
            next_restart = START + 0.6 * DAY  # early afternoon: PV, envelope windows active
            n = 0
            while clock.now() < end and proc.returncode is None:
                now = clock.now()
                if now >= next_day:
                    pub.set_schedule(stress_day(site, next_day).schedule())
                    next_day += DAY
                if now >= next_fault:
                    dev = ("meter", "inverter", "battery")[n % 3]
                    kind = kinds[(n // 3) % 3]
                    # durations in domain seconds, but a timeout costs real seconds per read
                    sim.faults[dev].inject(kind, duration_s=120.0 * max(1.0, speed / 100.0))
                    faults[f"{dev}:{kind}"] = faults.get(f"{dev}:{kind}", 0) + 1
                    n += 1
                    next_fault += 3 * 3600.0
                if now >= next_restart:
                    broker.stop()
                    await asyncio.sleep(1.0)  # real: ~an hour of domain time at x3000
                    broker.start()
                    restarts += 1
                    next_restart += DAY
                rss_samples.append((now, _rss_mb(proc.pid)))
                await asyncio.sleep(0.5)
            rss_end, cpu_end, t_end = _rss_mb(proc.pid), _cpu_s(proc.pid), clock.now()
            # Store-and-forward check: before stopping, give the daemon (bounded, real time)
            # the chance to publish its backlog. Its reconnect backoff is in real seconds, which
            # at x2000 are hours of domain time after the last broker restart.
            import sqlite3

            drain_deadline = time.monotonic() + 120.0
            drained = False
            while time.monotonic() < drain_deadline and proc.returncode is None:
                with contextlib.closing(sqlite3.connect(tmp / "gateway.db", timeout=5)) as c:
                    top = c.execute("SELECT max(seq) FROM telemetry").fetchone()[0] or 0
                if top in received:
                    drained = True
                    break
                await asyncio.sleep(0.5)
            drain_s = 120.0 - max(0.0, drain_deadline - time.monotonic())
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 120)
            await reader
            await asyncio.sleep(1.0)  # the last records published during the clean stop
            sub.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await sub
            stop_pub.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pub_task, 10)
            truth = sim.physics.totals()
    finally:
        broker.stop()
    stats: dict[str, Any] = {}
    for line in lines:
        if "stopped: " in line:
            stats = json.loads(line.split("stopped: ", 1)[1])
    errors = [ln for ln in lines if ln.startswith(("ERROR", "CRITICAL"))]
    db_bytes = _db_bytes(tmp)
    conn = sqlite3.connect(tmp / "gateway.db")
    rows = conn.execute("SELECT count(*), min(seq), max(seq) FROM telemetry").fetchone()
    conn.close()
    produced = int(stats.get("telemetry_produced", 0))
    env = stats.get("envelope") or {}
    pl = stats.get("planner") or {}
    sim_days = (t_end - START) / DAY
    out = {
        "sim_days": round(sim_days, 3), "speed": speed, "cycle_s": cycle_s, "exit_code": rc,
        "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "rss_mb_growth": round(rss_end - rss_start, 2),
        "rss_mb_max": round(max(r for _, r in rss_samples), 1) if rss_samples else None,
        "cpu_s": round(cpu_end - cpu_start, 1),
        "cpu_ms_per_sim_hour": round((cpu_end - cpu_start) / max((t_end - t_start) / 3600.0,
                                                                  1e-9) * 1000.0, 1),
        "db_bytes": db_bytes, "db_rows": rows[0], "db_seq_range": [rows[1], rows[2]],
        "cycles": stats.get("cycles"),
        "cycles_expected": round((t_end - START) / cycle_s),
        "overruns": stats.get("overruns"), "poll_errors": stats.get("poll_errors"),
        "task_restarts": stats.get("task_restarts"),
        "store_errors": stats.get("store_errors"),
        "telemetry": {"produced": produced, "stored": stats.get("telemetry_stored"),
                      "published": stats.get("telemetry_published"),
                      "received": len(received), "duplicates": dupes,
                      "missing_at_subscriber": produced - len(received & set(
                          range(1, produced + 1))),
                      "lost": stats.get("telemetry_lost"), "backlog": stats.get("backlog")},
        "envelope": {k: env.get(k) for k in ("accepted", "rejected", "exceedance_events",
                                             "exceedance_s", "max_episode_s",
                                             "max_export_exceedance_w",
                                             "max_import_exceedance_w", "noncompliant_cycles")},
        "planner": {k: pl.get(k) for k in ("plans", "lp", "fallbacks", "errors", "late",
                                           "solve_ms_max")},
        "faults_injected": sum(faults.values()), "faults": faults,
        "drained_before_stop": drained, "drain_real_s": round(drain_s, 1),
        "broker_restarts": restarts, "broker_connects": stats.get("broker_connects"),
        "error_lines": len(errors),
        "truth_kwh": {k: round(v, 1) for k, v in truth.items()},
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--speed", type=float, default=3000.0)
    ap.add_argument("--cycle", type=float, default=5.0, help="control cycle, domain s")
    args = ap.parse_args()
    r = asyncio.run(_soak(args.days, args.speed, args.cycle))
    t, e, p = r["telemetry"], r["envelope"], r["planner"]
    print(f"soak: {r['sim_days']} simulated days at x{r['speed']:g}, cycle {r['cycle_s']:g} s, "
          f"exit {r['exit_code']}")
    print(f"  RSS: start {r['rss_mb_start']} MB, end {r['rss_mb_end']} MB, growth "
          f"{r['rss_mb_growth']} MB (max {r['rss_mb_max']} MB)")
    print(f"  CPU: {r['cpu_s']} s = {r['cpu_ms_per_sim_hour']} ms per simulated hour; cycles "
          f"{r['cycles']} of {r['cycles_expected']} due, overruns {r['overruns']}, poll errors "
          f"{r['poll_errors']}, task restarts {r['task_restarts']}")
    print(f"  database: {r['db_bytes']} bytes, {r['db_rows']} telemetry rows kept (retention "
          f"3 days), seq {r['db_seq_range']}")
    print(f"  telemetry: produced {t['produced']}, stored {t['stored']}, published "
          f"{t['published']}, received {t['received']} (+{t['duplicates']} duplicates, "
          f"{t['missing_at_subscriber']} missing), lost {t['lost']}, backlog {t['backlog']}; "
          f"backlog drained before stop: {r['drained_before_stop']} ({r['drain_real_s']} s)")
    print(f"  envelope: {e['accepted']} controls accepted, {e['exceedance_events']} exceedance "
          f"episodes ({e['exceedance_s']} s, longest {e['max_episode_s']} s, max export "
          f"{e['max_export_exceedance_w']} W over), noncompliant cycles "
          f"{e['noncompliant_cycles']}")
    print(f"  planner: {p['plans']} plans ({p['lp']} LP, {p['fallbacks']} fallbacks, "
          f"{p['errors']} errors, {p['late']} late), solve ms max {p['solve_ms_max']}")
    print(f"  faults: {r['faults_injected']} device faults {r['faults']}, {r['broker_restarts']} "
          f"broker restarts ({r['broker_connects']} connects), {r['error_lines']} ERROR lines")
    print(json.dumps(r, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
