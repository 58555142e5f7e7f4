"""The ``hems`` command line: the one place that wires drivers, gateway, firmware_sim, community.

Sub-commands import what they need lazily, so ``hems scan`` does not pay for cvxpy.
Every ``--json`` command prints its figures for people first (on stderr when ``--json`` is given,
so stdout stays machine-readable) and, as the last line of stdout, one JSON object on one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Sequence


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_sim(args: argparse.Namespace) -> int:
    from firmware_sim.server import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                host=args.host,
                base_port=args.port,
                speed=args.speed,
                start=args.start,
                home_index=args.home,
            )
        )
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from drivers.modbus import ModbusLink
    from drivers.natures import DeviceError
    from drivers.sunspec.scan import scan

    async def go() -> dict[str, object]:
        link = ModbusLink.tcp(args.host, args.port, args.unit, timeout_s=args.timeout)
        try:
            return await scan(link)
        finally:
            await link.close()

    try:
        result = asyncio.run(go())
    except DeviceError as e:
        print(f"hems scan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    else:
        print(f"SunSpec base {result['base']}")
        for m in result["models"]:  # type: ignore[attr-defined]
            name = m.get("name", "?")
            print(f"  model {m['id']:>4} {name:<24} @{m['address']} len {m['length']}")
            for k, v in (m.get("points") or {}).items():
                if v is not None:
                    print(f"      {k} = {v}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from community.demo import DemoOptions, format_report, run_demo

    opts = DemoOptions(
        sim_hours=args.hours,
        homes=args.homes,
        speed=args.speed,
        cycle_s=args.cycle,
        start=args.start,
        out_dir=args.out,
    )
    report = asyncio.run(run_demo(opts))
    text = format_report(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(text)
    return 0 if report.get("ok", True) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hems", description="Home energy management gateway")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sim", help="serve the simulated inverter, battery and meter (Modbus TCP)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="first port (0 = free ports)")
    s.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    s.add_argument("--start", default=None, help="simulated start time (ISO 8601, UTC)")
    s.add_argument("--home", type=int, default=0, help="household index in the shipped data")
    s.set_defaults(func=_cmd_sim)

    s = sub.add_parser("scan", help="discover and decode a SunSpec device")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, default=502)
    s.add_argument("--unit", type=int, default=1)
    s.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, s")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_scan)

    s = sub.add_parser("demo", help="run the simulated home end to end and print a report")
    s.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    s.add_argument("--homes", type=int, default=1)
    s.add_argument("--speed", type=float, default=1440.0, help="simulated seconds per real second")
    s.add_argument("--cycle", type=float, default=5.0, help="control cycle, simulated seconds")
    s.add_argument("--start", default="2026-06-21T00:00:00Z", help="simulated start (UTC)")
    s.add_argument("--out", default=None, help="directory for the database and report files")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
