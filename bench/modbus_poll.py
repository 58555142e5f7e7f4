"""Time one full poll cycle (meter + inverter + battery) over Modbus TCP.

The devices are the real simulated ones, served by ``hems sim`` in a separate process (as the
devices of a home are separate boxes), and the gateway side uses the production drivers.
Prints median and p99 wall time of a cycle and the gateway's CPU time per cycle; the last line
of stdout is one JSON object. Target: a full cycle well under 50 ms here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from drivers.factory import DeviceSpec, connect_device


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(ready: dict[str, Any], cycles: int, warmup: int) -> dict[str, float]:
    devs = [
        await connect_device(DeviceSpec(d["kind"], host=d["host"], port=d["port"], unit=d["unit"]))
        for d in ready["devices"]
    ]
    try:
        for _ in range(warmup):
            for d in devs:
                await d.read()
        walls: list[float] = []
        cpus: list[float] = []
        for _ in range(cycles):
            t, c = time.perf_counter(), time.process_time()
            await asyncio.gather(*(d.read() for d in devs))
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    finally:
        for d in devs:
            await d.close()
    return {
        "cycles": cycles,
        "median_ms": round(1e3 * statistics.median(walls), 3),
        "p99_ms": round(1e3 * _pct(walls, 0.99), 3),
        "cpu_ms_per_cycle": round(1e3 * statistics.mean(cpus), 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    a = ap.parse_args()
    # The simulated devices run in their own process, as separate boxes would.
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "sim", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        r = asyncio.run(measure(json.loads(proc.stdout.readline()), a.cycles, a.warmup))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(
        f"full poll cycle (meter + inverter + battery, concurrent) over {r['cycles']} cycles: "
        f"median {r['median_ms']} ms, p99 {r['p99_ms']} ms, "
        f"gateway CPU {r['cpu_ms_per_cycle']} ms/cycle"
    )
    print(json.dumps(r))
