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
from typing import Any


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
    if args.homes > 1:
        return _cmd_community(args)
    from community.demo import DemoOptions, format_report, run_demo

    opts = DemoOptions(
        sim_hours=args.hours,
        homes=args.homes,
        speed=args.speed or 1440.0,
        cycle_s=args.cycle or 5.0,
        start=args.start,
        out_dir=args.out,
        broker=args.broker,
    )
    try:
        report = asyncio.run(run_demo(opts))
    except (ValueError, RuntimeError) as e:  # bad options, no broker available
        print(f"hems demo: {e}", file=sys.stderr)
        return 2
    return _print_report(args, format_report(report), report)


def _print_report(args: argparse.Namespace, text: str, report: dict[str, Any]) -> int:
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(text)
    return 0 if report.get("ok", True) else 1


def _cmd_community(args: argparse.Namespace) -> int:
    from community.community_demo import CommunityOptions, format_report, run_community

    try:
        opts = CommunityOptions(
            homes=args.homes, sim_hours=args.hours, speed=args.speed, cycle_s=args.cycle or 10.0,
            start=args.start, out_dir=args.out, broker=args.broker, workers=args.workers,
            interval_s=args.interval, baseline=not args.no_baseline,
            picture=not args.no_picture, devices=args.devices, solver=args.solver,
            elastic=not args.rigid, plan_process=not args.plan_thread)
        report = asyncio.run(run_community(opts))
    except (ValueError, RuntimeError) as e:
        print(f"hems demo: {e}", file=sys.stderr)
        return 2
    return _print_report(args, format_report(report), report)


def _cmd_backtest(args: argparse.Namespace) -> int:
    from community.backtest import BacktestOptions, format_report, run_backtest

    try:
        opts = BacktestOptions(
            days=args.days, homes=args.homes, first_home=args.first_home, source=args.data,
            start_day=args.start_day, step_s=args.step, tariff=args.tariff, pv_site=args.pv_site,
            pv_kwp=args.pv_kwp, battery_kwh=args.battery_kwh, battery_kw=args.battery_kw,
            seed=args.seed, workers=args.workers, load_forecast=args.load_forecast,
            pv_forecast=args.pv_forecast, pv_forecast_file=args.pv_forecast_file,
            pv_forecast_sigma=args.pv_forecast_sigma,
        )
        report = run_backtest(opts)
    except ValueError as e:
        print(f"hems backtest: {e}", file=sys.stderr)
        return 2
    text = format_report(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import main_run

    return main_run(args.config)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from gateway.config import check_config

    problems = check_config(args.file)
    for p in problems:
        print(f"hems: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.file}: ok")
    return 2 if problems else 0


def _cmd_dso(args: argparse.Namespace) -> int:
    from community.dso import dso_main

    return dso_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hems", description="Home energy management gateway")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="run the gateway daemon (systemd: hems-gateway.service)")
    s.add_argument("--config", default="/etc/hems/gateway.toml")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("config", help="configuration tools")
    csub = s.add_subparsers(dest="config_cmd", required=True)
    c = csub.add_parser("check", help="validate a gateway config file without starting")
    c.add_argument("file")
    c.set_defaults(func=_cmd_config_check)

    s = sub.add_parser("dso", add_help=False,
                       help="DSO envelope publisher: run | publish | keygen (see hems dso --help)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_dso)

    # Parsed by their own modules (see main): listed here for --help only.
    sub.add_parser("market", add_help=False,
                   help="community market operator (double auction over MQTT); hems market -h")
    sub.add_parser("selftest", add_help=False,  # parsed in main (community.selftest)
                   help="short built-in fault run of the real gateway; hems selftest -h")

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
    s.add_argument("--speed", type=float, default=None,
                   help="simulated seconds per real second (default: 1440 for one home; "
                        "chosen from the CPU work for a community)")
    s.add_argument("--cycle", type=float, default=None,
                   help="control cycle, simulated seconds (default: 5 for one home, 10 for a "
                        "community)")
    s.add_argument("--workers", type=int, default=None,
                   help="community: gateway processes (default: one per CPU core)")
    s.add_argument("--interval", type=int, default=900,
                   help="community: market delivery interval = planning step, s")
    s.add_argument("--no-baseline", action="store_true",
                   help="community: skip the day without the market (no costs.no_p2p)")
    s.add_argument("--no-picture", action="store_true", help="community: no PNG")
    s.add_argument("--devices", choices=("auto", "tcp", "inproc"), default="auto",
                   help="community: simulated devices over Modbus TCP or in process (default "
                        "auto: TCP up to 10 homes, in process beyond)")
    s.add_argument("--solver", choices=("highs", "cvxpy"), default="highs",
                   help="community: the planners' LP solve (the same LP either way)")
    s.add_argument("--rigid", action="store_true",
                   help="community: a rigid timeline (default: held while a loop is behind)")
    s.add_argument("--plan-thread", action="store_true",
                   help="community: plan on each worker's thread (default: in a child process "
                        "of the worker at low priority)")
    s.add_argument("--start", default="2026-06-21T00:00:00Z", help="simulated start (UTC)")
    s.add_argument("--out", default=None, help="directory for the database and report files")
    s.add_argument("--broker", default="auto",
                   help="auto (local mosquitto if installed, else amqtt) | mosquitto | amqtt")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("backtest", help="closed-loop backtest of the planner on the shipped data")
    s.add_argument("--days", type=int, default=28)
    s.add_argument("--homes", type=int, default=10)
    s.add_argument("--first-home", type=int, default=10,
                   help="first household index (the forecaster was tuned on 0-9)")
    s.add_argument("--data", default="richardson", help="richardson | synpro")
    s.add_argument("--start-day", type=int, default=305, help="day of year of the first test day")
    s.add_argument("--step", type=int, default=1800, help="planning step, s")
    s.add_argument("--tariff", default="tou", help="tou | flat")
    s.add_argument("--pv-site", default="greensboro")
    s.add_argument("--pv-kwp", type=float, default=4.0)
    s.add_argument("--battery-kwh", type=float, default=10.0)
    s.add_argument("--battery-kw", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="processes (0 = up to 2)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--load-forecast", default="own", choices=("own", "perfect"),
                   help="own | perfect (ORACLE, diagnosis only)")
    s.add_argument("--pv-forecast", default="own", choices=("own", "external", "perfect"),
                   help="own | external (--pv-forecast-file, else a labelled synthetic day-ahead "
                        "forecast) | perfect (ORACLE, diagnosis only)")
    s.add_argument("--pv-forecast-file", default=None,
                   help="CSV issued_at,timestamp,watts (epoch s of the profile year)")
    s.add_argument("--pv-forecast-sigma", type=float, default=0.3,
                   help="daily clear-sky-index error of the synthetic forecast")
    s.set_defaults(func=_cmd_backtest)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dso"]:  # its own parser (run | publish | keygen), options included
        _setup_logging("-v" in argv)
        from community.dso import dso_main

        return dso_main(argv[1:])
    if argv[:1] == ["market"]:  # imported only when used: it costs ~0.4 s
        _setup_logging("-v" in argv)
        from community.market.operator import add_arguments, main_from_args

        mp = argparse.ArgumentParser(prog="hems market",
                                     description="community market operator")
        add_arguments(mp)
        return int(main_from_args(mp.parse_args(argv[1:])))
    if argv[:1] == ["selftest"]:  # imported only when used (simulator, broker, daemon)
        _setup_logging("-v" in argv)
        from community.selftest import add_arguments as st_args
        from community.selftest import main_from_args as st_main

        sp = argparse.ArgumentParser(prog="hems selftest", description="built-in fault run")
        st_args(sp)
        return int(st_main(sp.parse_args([a for a in argv[1:] if a != "-v"])))
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
