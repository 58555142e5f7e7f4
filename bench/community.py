"""Benchmark: wall time for a simulated day of a community (``hems demo --homes N``).

Runs :func:`community.community_demo.run_community` for each community size (default 10 and
50 homes) with the market on, the no-market baseline and the picture off: N real gateways in
worker processes (one per core), the market operator, the DSO and a local broker, for one
simulated day. Devices: ``--devices auto`` (the default) serves them over Modbus TCP up to 10
homes and in process beyond (``drivers.inproc``: the same SunSpec requests and answers without
sockets; the wire alone would be ~1 ms of CPU per request on each side); the planners solve the
LP held in HiGHS (``--solver highs``, the same LP as the cvxpy model).

The timeline is elastic unless ``--rigid``: ``--speed`` (default
:func:`community.community_demo.auto_speed`) is a ceiling, and a process whose event loop falls
behind holds simulated time for every process (``drivers.clock.govern``), so a short CPU makes
the day slower rather than leaving sites uncontrolled. The figures printed next to the wall
time say whether the run was healthy: the speed in effect and the seconds held, late cycles
(%), plans and fallbacks, bids, envelope episodes beyond tolerance, CPU seconds of all
processes.

Usage: ``python bench/community.py [--homes 10,50] [--hours 24] [--cycle 10] [--interval 900]
[--speed S] [--workers W] [--devices auto|tcp|inproc] [--solver highs|cvxpy] [--rigid]
[--plan-thread]``.
The last stdout line is one JSON object: ``{"runs": [{"homes", "wall_s", "speed",
"effective_speed", "held_s", "devices", "cycle_s", "interval_s", "cpu_s", "late_cycle_pct",
"plans", "bids_sent", "traded_kwh", "episodes_beyond_tolerance"}, ...], "wall_s_<N>": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.path.abspath(__file__)).parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # joined workers and the broker
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_one(homes: int, args: argparse.Namespace) -> dict[str, Any]:
    from community.community_demo import CommunityOptions, run_community

    opts = CommunityOptions(homes=homes, sim_hours=args.hours, speed=args.speed,
                            cycle_s=args.cycle, interval_s=args.interval, workers=args.workers,
                            start=args.start, baseline=False, picture=False,
                            devices=args.devices, solver=args.solver,
                            elastic=not args.rigid, plan_process=not args.plan_thread)
    cpu0, wall0 = _cpu_s(), time.monotonic()
    r = asyncio.run(run_community(opts))
    wall = time.monotonic() - wall0
    cpu = _cpu_s() - cpu0
    g = r["gateways"]
    due = max(1, int(args.hours * 3600 / args.cycle) * homes)
    return {
        "homes": homes, "wall_s": round(wall, 1), "day_wall_s": r["wall_s"]["community"],
        "speed": r["speed"], "effective_speed": r["effective_speed"],
        "held_s": r["held_s"]["community"], "devices": r["devices"],
        "cycle_s": args.cycle, "interval_s": args.interval,
        "workers": r["workers"], "cpu_s": round(cpu, 1),
        "cycles": g["cycles"], "cycles_due": due,
        "late_cycle_pct": round(100.0 * g["overruns"] / max(1, g["cycles"]), 2),
        "plans": g["plans"], "fallbacks": g["fallbacks"], "bids_sent": g["bids_sent"],
        "awards": g["awards"], "traded_kwh": r["market"].get("traded_kwh"),
        "avg_price": r["market"].get("avg_price"),
        "award_shortfall_kwh": r["market"].get("award_shortfall_kwh"),
        "episodes_beyond_tolerance": r["envelope"]["episodes_beyond_tolerance"],
        "max_export_exceedance_w": r["envelope"]["max_export_exceedance_w"],
        "errors": len(r["errors"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--homes", default="10,50", help="comma-separated community sizes")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--cycle", type=float, default=10.0, help="control cycle, simulated s")
    p.add_argument("--interval", type=int, default=900, help="market interval / plan step, s")
    p.add_argument("--speed", type=float, default=None, help="default: auto_speed")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--start", default="2026-06-21T00:00:00Z")
    p.add_argument("--devices", choices=("auto", "tcp", "inproc"), default="auto",
                   help="auto: Modbus TCP up to 10 homes, in process beyond")
    p.add_argument("--solver", choices=("highs", "cvxpy"), default="highs")
    p.add_argument("--rigid", action="store_true",
                   help="a rigid timeline (no hold while a loop is behind)")
    p.add_argument("--plan-thread", action="store_true",
                   help="plan on each worker's thread (default: in a child process of it)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = []
    for n in [int(x) for x in args.homes.split(",") if x.strip()]:
        r = run_one(n, args)
        runs.append(r)
        print(f"{n:3d} homes: {r['wall_s']:7.1f} s wall for {args.hours:g} simulated h "
              f"(x{r['speed']:g} at most, x{r['effective_speed']:g} in effect, timeline held "
              f"{r['held_s']} s; devices {r['devices']}, solver {args.solver}; cycle "
              f"{r['cycle_s']:g} s, interval {r['interval_s']} s, "
              f"{r['workers']} workers); CPU {r['cpu_s']} s; cycles {r['cycles']}/"
              f"{r['cycles_due']} due, {r['late_cycle_pct']} % late; plans {r['plans']} "
              f"({r['fallbacks']} fallback); bids {r['bids_sent']}, awards {r['awards']}, "
              f"traded {r['traded_kwh']} kWh at {r['avg_price']}; envelope episodes beyond "
              f"tolerance {r['episodes_beyond_tolerance']} (max {r['max_export_exceedance_w']} W)"
              f"; errors {r['errors']}", flush=True)
    out: dict[str, Any] = {"runs": runs}
    for r in runs:
        out[f"wall_s_{r['homes']}"] = r["wall_s"]
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
