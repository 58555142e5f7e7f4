"""Benchmark: the gateway daemon over a simulated hour.

The daemon runs as its own process (``main_run``, the ``hems run`` code path, cvxpy imported as
the daemon will once the optimizer is wired) on an accelerated SimClock shared with this process,
which serves the three simulated devices over Modbus TCP and starts a local broker. Measured on
the daemon process only (``/proc/<pid>``):

* steady-state RSS (after warm-up), median and max;
* CPU time per control cycle (1 s cycle), and what that is as a share of one core at real time;
* SQLite: commits per simulated hour (from the daemon's stats), write syscalls and bytes per
  hour (``/proc/<pid>/io``), and fsync/fdatasync calls per hour (``strace -c``, when installed);
* telemetry produced / published / received by a subscriber / lost.

Usage: ``python bench/daemon.py [--hours 1] [--speed 60] [--no-strace] [--planner]``.
``--planner`` enables the slow loop (forecast -> optimize every 15 domain minutes, cold start:
no history) so the CPU and RSS figures include planning.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = Path(HERE).parents[1]
sys.path.insert(0, str(ROOT))

START = 1_750_000_000.0  # mid-June, 15:06 UTC: PV, load and battery all active


def _child(argv: list[str]) -> int:
    """The daemon process: import cvxpy (as the full daemon will), then ``main_run``."""
    config, start, speed, epoch = argv[0], float(argv[1]), float(argv[2]), float(argv[3])
    import cvxpy  # noqa: F401

    from drivers.clock import SimClock
    from gateway.daemon import main_run

    return main_run(config, clock=SimClock(start=start, speed=speed, epoch=epoch))


def _db_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("gateway.db*"))


def _proc(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
    with contextlib.suppress(OSError), open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = float(v)
    return out


PLANNER_TOML = """
[planner]
enabled = true
lat = 36.0
lon = 0.0
pv_kwp = 4.0
"""  # the bench PV profile is a clear-sky bell centred on 12:00 UTC


async def _bench(hours: float, speed: float, use_strace: bool,
                 planner: bool = False) -> dict[str, Any]:
    import aiomqtt

    from drivers.clock import SimClock
    from firmware_sim.home import HomeConfig
    from firmware_sim.server import run_home
    from gateway.broker import local_broker

    sys.path.insert(0, str(ROOT / "tests"))
    from daemon.daemon_helpers import profiles

    epoch = time.time() + 3.0  # domain time START begins 3 s from now, in both processes
    clock = SimClock(start=START, speed=speed, epoch=epoch)
    load, pv = profiles()
    tmp = Path(tempfile.mkdtemp(prefix="hems-bench-"))
    received: set[int] = set()
    dupes = 0
    async with local_broker() as broker, run_home(clock, HomeConfig(), load=load,
                                                   pv=pv) as sim:
        devices = "\n".join(
            f'[[devices]]\nkind = "{e.kind}"\nhost = "{e.host}"\nport = {e.port}\nunit = {e.unit}\n'
            for e in sim.endpoints)
        cfg = tmp / "gateway.toml"
        cfg.write_text(f"""site_id = "bench"
{devices}
[broker]
url = "{broker.url}"
[control]
cycle_s = 1.0
startup_grace_s = 5
[store]
path = "{tmp / 'gateway.db'}"
telemetry_interval_s = 60
commit_interval_s = 60
[mqtt]
state_interval_s = 10
""" + (PLANNER_TOML if planner else ""))

        async def subscriber() -> None:
            nonlocal dupes
            async with aiomqtt.Client(broker.host, broker.port) as c:
                await c.subscribe("hems/v1/bench/telemetry", qos=1)
                async for m in c.messages:
                    p = m.payload
                    seq = json.loads(p if isinstance(p, bytes | str) else b"{}")["seq"]
                    if seq in received:
                        dupes += 1
                    received.add(seq)

        sub = asyncio.create_task(subscriber())
        env = dict(os.environ, HEMS_LOG_LEVEL="WARNING,gateway.daemon=INFO")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, HERE, "--child", str(cfg), str(START),
            str(speed), str(epoch), cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        lines: list[str] = []

        async def read_err() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                lines.append(raw.decode(errors="replace").rstrip())

        reader = asyncio.create_task(read_err())
        end = START + hours * 3600.0
        warm = START + min(600.0, hours * 3600.0 * 0.15)  # 10 domain minutes of warm-up
        await clock.sleep_until(warm)
        a = _proc(proc.pid)
        ta = clock.now()
        tracer = None
        if use_strace and shutil.which("strace"):
            tracer = await asyncio.create_subprocess_exec(
                "strace", "-f", "-c", "-e", "trace=fsync,fdatasync,write,pwrite64", "-p",
                str(proc.pid), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        rss: list[float] = []
        while clock.now() < end:
            await asyncio.sleep(0.5)
            rss.append(_proc(proc.pid)["rss_mb"])
        b = _proc(proc.pid)
        tb = clock.now()
        syscalls: dict[str, int] = {}
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            _, err = await tracer.communicate()
            for line in err.decode().splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m:
                    syscalls[m.group(2)] = int(m.group(1))
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 60)
        await reader
        await asyncio.sleep(0.5)
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await sub
        broker_kind = broker.kind
    stats: dict[str, Any] = {}
    for line in lines:
        if "stopped: " in line:
            stats = json.loads(line.split("stopped: ", 1)[1])
    db_bytes = _db_bytes(tmp)
    window_h = (tb - ta) / 3600.0
    cycles = (tb - ta) / 1.0
    cpu_per_cycle_ms = (b["cpu_s"] - a["cpu_s"]) / cycles * 1000.0
    per_h = {k: (b.get(k, 0.0) - a.get(k, 0.0)) / window_h for k in ("syscw", "wchar",
                                                                     "write_bytes")}
    produced = int(stats.get("telemetry_produced", 0))
    out = {
        "sim_hours": round(hours, 3), "speed": speed, "broker": broker_kind, "exit_code": rc,
        "planner": stats.get("planner") or None,
        "rss_mb_median": round(statistics.median(rss), 1), "rss_mb_max": round(max(rss), 1),
        "cpu_ms_per_cycle": round(cpu_per_cycle_ms, 3),
        "cpu_pct_of_core_at_1s_cycle": round(cpu_per_cycle_ms / 1000.0 * 100.0, 3),
        "cycles": stats.get("cycles"), "overruns": stats.get("overruns"),
        "poll_errors": stats.get("poll_errors"),
        "sqlite_commits_per_hour": round(stats.get("store_commits", 0) / hours, 1),
        "write_syscalls_per_hour": round(per_h["syscw"]),
        "bytes_written_per_hour": round(per_h["wchar"]),
        "storage_bytes_per_hour": round(per_h["write_bytes"]),
        "fsyncs_per_hour": (round((syscalls.get("fsync", 0) + syscalls.get("fdatasync", 0))
                                  / window_h, 1) if syscalls else None),
        "db_bytes": db_bytes,
        "telemetry": {"produced": produced, "published": stats.get("telemetry_published"),
                      "received": len(received), "duplicates": dupes,
                      "lost": stats.get("telemetry_lost")},
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--speed", type=float, default=60.0)
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--planner", action="store_true", help="enable the planner (slow loop)")
    args = ap.parse_args()
    r = asyncio.run(_bench(args.hours, args.speed, not args.no_strace, args.planner))
    t = r["telemetry"]
    print(f"daemon over {r['sim_hours']} simulated h at x{r['speed']:g} (broker: {r['broker']}),"
          f" exit {r['exit_code']}")
    print(f"  RSS steady state: median {r['rss_mb_median']} MB, max {r['rss_mb_max']} MB "
          "(cvxpy imported)")
    print(f"  CPU per 1 s cycle: {r['cpu_ms_per_cycle']} ms = "
          f"{r['cpu_pct_of_core_at_1s_cycle']} % of one core; cycles {r['cycles']}, overruns "
          f"{r['overruns']}, poll errors {r['poll_errors']}")
    print(f"  SQLite: {r['sqlite_commits_per_hour']} commits/h, {r['write_syscalls_per_hour']} "
          f"write syscalls/h, {r['bytes_written_per_hour']} bytes/h written, fsyncs/h "
          f"{r['fsyncs_per_hour']}, db {r['db_bytes']} bytes")
    print(f"  telemetry: produced {t['produced']}, published {t['published']}, received "
          f"{t['received']} (+{t['duplicates']} duplicates), lost {t['lost']}")
    if r["planner"]:
        pl = r["planner"]
        print(f"  planner: {pl['plans']} plans ({pl['lp']} LP, {pl['fallbacks']} fallbacks, "
              f"{pl['errors']} errors), solve ms max {pl['solve_ms_max']}, last round "
              f"{pl['round_ms_last']} ms")
    print(json.dumps(r, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
