"""The community demo: ``hems demo --homes N`` (N >= 2).

N simulated homes, each with its own gateway (the real daemon, :func:`gateway.daemon.run_gateway`,
talking Modbus TCP to its own ``firmware_sim`` devices), one community market operator
(:class:`community.market.MarketOperator`), one DSO publishing a signed envelope to every site
(:class:`community.dso.DsoPublisher`) and one local broker, all on one shared accelerated
timeline (:class:`drivers.clock.SimClock` with a common epoch). The homes are heterogeneous:
PV + battery, PV only, neither (:func:`home_mix`).

The gateways run in worker processes (one per core by default; a home's fast loop, planner and
bid curves are CPU work, and one Python process runs one thread at a time). The operator, the DSO
and the broker run in the parent. Each worker samples its homes' *physics* (the truth, not what
the gateways believe): every minute for the picture and the bills, every ``envelope_sample_s`` for
envelope compliance.

Costs are computed on the physics with one settlement rule for every strategy (per delivery
interval, the home's net exchange settles with the retailer: export at the feed-in tariff, import
at the retail price; awards settle at their price and only the deviation goes to the retailer,
:func:`community.market.settlement.settle_site`):

* ``community``: the run with the market, bills from the operator's awards and the metered physics;
* ``no_p2p``: the same homes, devices, forecasts, envelope and planners, run again without the
  market (every home optimizing alone against the retailer);
* ``fit_only``: no battery control (batteries idle) and no market: the home's available PV minus its
  load, export curtailed to the DSO's export limit (as a static export limiter would), settled
  with the retailer. Computed from the same physics' counters of the community run (available PV
  and load do not depend on control).

Battery homes' costs are corrected by the change of stored energy over the day at
``terminal_value`` per kWh (what the planners were told stored energy is worth), so a strategy
cannot look cheap by emptying batteries.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from community.scenarios import STRESS_WINDOWS, StressDay, stress_day
from firmware_sim.home import HomeConfig

log = logging.getLogger(__name__)

COMMUNITY = "demo-community"
KINDS = ("pv+battery", "pv", "none")
TCP_HOMES = 10  # devices "auto": Modbus TCP up to this many homes, in process beyond
# The nice of a worker's planning child (``plan_process``): the worker's fast loops win the
# core whenever both want it, the plans take what is left (a worker is busy about 80 % of the
# time). Measured, 50 homes, 3 h from 05:00 at x450: on the planning thread the day took
# 34.1-36.6 s; in a child at nice 0 36.8 s, 5 34.8 s, 10 31.7-32.3 s, 15 29.9-32.6 s, 19
# 31.1 s. Beyond 10 the plans of a busy worker wait longer for no clear gain.
PLAN_NICE = 10
Floats = Sequence[float] | npt.NDArray[np.float64]


@dataclass(frozen=True)
class CommunityOptions:
    """What to simulate (``hems demo --homes N``)."""

    homes: int = 10
    sim_hours: float = 24.0
    speed: float | None = None  # None: chosen from the CPU work (see :func:`auto_speed`)
    cycle_s: float = 10.0  # 5 s for one home; 10 s keeps ten homes within two cores
    start: str | None = "2026-06-21T00:00:00Z"
    out_dir: str | None = None
    broker: str = "auto"
    workers: int | None = None  # None: one per CPU core (at most one per home)
    interval_s: int = 900  # market delivery interval = planning step
    gate_lead_s: float = 120.0
    price_floor: float = 0.08  # feed-in tariff (currency/kWh)
    price_cap: float = 0.30  # retail import price
    bid_prices: int = 6  # price points per bid curve
    terminal_value: float = 0.19  # currency/kWh of energy left in a battery (both runs)
    baseline: bool = True  # run the no_p2p day too (doubles the wall time)
    picture: bool = True
    envelope_sample_s: float = 5.0  # domain s between physics samples for compliance
    response_s: float = 15.0  # an exceedance shorter than this is a response, not a breach
    # how gateways reach their simulated devices: "tcp" (a pymodbus server per device, real
    # Modbus TCP), "inproc" (the same devices and requests without sockets, drivers.inproc:
    # for communities too large for the wire's CPU cost, ~1 ms per request on each side) or
    # "auto": TCP up to TCP_HOMES homes, in process beyond
    devices: str = "auto"
    # hold the shared timeline while a process' event loop is behind (drivers.clock.govern):
    # the speed becomes the most the day runs at, and a short CPU slows it instead of leaving
    # sites uncontrolled for the domain time a stall lasts
    elastic: bool = True
    # the planners' LP solve ([planner] solver): "highs" (the LP held in HiGHS, ~3x less CPU
    # per solve) or "cvxpy" (the reference model); the same LP, the same plans
    solver: str = "highs"
    # plan in a child process of each worker at PLAN_NICE (True) or on the worker's planning
    # thread (False: as a daemon does, one interpreter for the fast loops and the plans)
    plan_process: bool = True

    def __post_init__(self) -> None:
        if self.homes < 2:
            raise ValueError(f"a community needs at least 2 homes, got {self.homes}")
        if not 0 < self.sim_hours <= 24 * 7:
            raise ValueError(f"sim_hours must be in (0, 168], got {self.sim_hours}")
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        if not 1.0 <= self.cycle_s <= 300.0:
            raise ValueError(f"cycle_s must be in [1, 300], got {self.cycle_s}")
        if self.interval_s < 300 or 86400 % self.interval_s:
            raise ValueError(f"interval_s must be >= 300 and divide a day, got {self.interval_s}")
        if not 0 <= self.price_floor < self.price_cap:
            raise ValueError("need 0 <= price_floor < price_cap")
        if self.devices not in ("auto", "tcp", "inproc"):
            raise ValueError(f"devices must be 'auto', 'tcp' or 'inproc', got {self.devices!r}")
        if self.solver not in ("highs", "cvxpy"):
            raise ValueError(f"solver must be 'highs' or 'cvxpy', got {self.solver!r}")

    @property
    def transport(self) -> str:
        """The device transport in use ("tcp" or "inproc"), ``devices`` resolved."""
        if self.devices != "auto":
            return self.devices
        return "tcp" if self.homes <= TCP_HOMES else "inproc"


@dataclass(frozen=True)
class HomeSpec:
    """One member of the community: its site id, kind and simulated hardware."""

    site: str
    kind: str
    config: HomeConfig
    # where in every period (control cycle, compliance sample) this home runs, a fraction in
    # [0, 1): members spread evenly, so a worker's gateways do not all poll at the same instant
    phase: float = 0.0


def site_day(site: str, kind: str, day_start: float) -> StressDay:
    """The DSO's day for a member: the default (5 kW export) for everyone, the stress day's
    export windows for homes with PV and its evening import window only for homes with a battery
    (an envelope constrains what a site can control: a DSO does not send an import limit to a
    home with nothing to dispatch, and an export limit means nothing without generation)."""
    windows = tuple(w for w in STRESS_WINDOWS
                    if (w.limit == "export_w" and kind != "none")
                    or (w.limit == "import_w" and kind == "pv+battery"))
    return stress_day(site, day_start, windows=windows)


def home_mix(n: int) -> list[HomeSpec]:
    """``n`` heterogeneous homes, deterministic: kinds rotate PV + battery, PV only, neither;
    PV size, battery size and load scale vary; load profiles are distinct households of the
    shipped Richardson set (wrapping after 20); all homes share one sky (same PV weather)."""
    out = []
    for i in range(n):
        kind = KINDS[i % 3]
        kwp = (3.0, 4.0, 5.0, 6.0, 7.0)[(i * 7 // 3) % 5]
        cfg = HomeConfig(
            home_index=i % 20,
            pv_kwp=kwp if kind != "none" else 0.0,
            inverter_rated_w=max(3000.0, 1000.0 * kwp),
            battery_wh=(5000.0, 10000.0, 13500.0)[(i // 3) % 3] if kind == "pv+battery" else 0.0,
            battery_max_charge_w=3300.0, battery_max_discharge_w=3300.0,
            soc0_pct=50.0, reserve_pct=10.0, seed=i,
            load_scale=(0.8, 1.0, 1.25, 1.5)[(i // 2) % 4] * (1.0 + (i // 20) * 0.1),
            # registers refresh once a second, as a meter's do: a cycle's reads of one home
            # (meter, inverter, battery, a write's read-back) share one snapshot of its physics
            register_update_s=1.0,
        )
        out.append(HomeSpec(f"home-{i:02d}", kind, cfg, phase=i / n))
    return out


# CPU seconds on a 2-core x86 machine (Python 3.11, pymodbus 3.16), all processes counted (the
# workers, the parent's operator and DSO, the broker): one home's fast-loop cycle with its
# simulated devices answering (~3.3 ms over Modbus TCP, the client and server sides about
# equally; ~1.0 ms in process, physics and compliance probes included), one interval's plans
# (periodic and award replan) and bid curve (~0.17 s through cvxpy, ~0.016 s held in HiGHS).
# The in-process and HiGHS parts are fitted to whole runs: a 50-home day in process with HiGHS
# measured 493-516 CPU s, 9.9-10.3 per home (the model: 10.2).
CPU_PER_CYCLE_S = {"tcp": 0.0033, "inproc": 0.001}
CPU_PER_INTERVAL_S = {"cvxpy": 0.17, "highs": 0.016}
# An elastic timeline holds after a stall; the stall itself still delays cycles by its length
# times the speed: keep the longest common stall under a control cycle. Over Modbus TCP stalls
# of 30-50 ms are common with many homes per process (socket bursts at interval boundaries);
# measured, 10 homes over TCP, elastic: at x330 (a 30 ms bound) 3 excursions ran 15.0-16.0 s,
# just beyond the 15 s tolerance (0 at x200). In process there is no wire and the workers are
# pinned: measured, 50 homes, 3 simulated hours from 05:00 on two cores, ceiling x400: 39.6-39.8
# s, late cycles 0.0 %; x450: 37.8-38.5 s, 0.01-0.03 %; x500: 37.7-37.8 s, 0.09-0.12 %; no
# episode beyond tolerance in any (x450 is the knee: beyond it only late cycles grow).
STALL_S = {"tcp": 0.05, "inproc": 0.022}
# Elastic: the timeline holds while the CPU is short, so the ceiling may ask for more CPU than
# the cores have; 1.4x their time puts 50 homes in process at the knee above.
ELASTIC_SHARE = 1.4


def cpu_per_domain_s(opts: CommunityOptions) -> float:
    """CPU seconds the community costs per simulated second (the model above)."""
    return opts.homes * (CPU_PER_CYCLE_S[opts.transport] / opts.cycle_s
                         + CPU_PER_INTERVAL_S[opts.solver] / opts.interval_s)


def auto_speed(opts: CommunityOptions) -> float:
    """The speed to run at when none is given.

    Rigid timeline: about 35 % of the cores busy on average, so that cycles start on time
    (lateness is domain time during which a site is not controlled). Why so much headroom:
    planning and bidding come in bursts at each 15-minute boundary, and a fast loop delayed
    0.2 s of wall time is 50 domain seconds at x240. Measured on this 2-core machine, 10 homes,
    10 s cycles, 10:30-13:30 under a 1.5 kW export limit: at 70 % (x240) 3.4 % of cycles were
    late and 4-7 homes exceeded the limit for 15-28 s; at 35 % (x120) 0.07 % were late and none
    exceeded it for more than 5.5 s.

    Elastic timeline (the default): the speed is a ceiling; bursts hold the timeline instead of
    making cycles late, so it may ask for ``ELASTIC_SHARE`` of the cores' time, but no more than
    keeps a ``STALL_S`` stall (by transport) under one control cycle of domain time."""
    cores = len(usable_cpus())
    share = ELASTIC_SHARE if opts.elastic else 0.35
    speed = share * cores / cpu_per_domain_s(opts)
    if opts.elastic:
        speed = min(speed, opts.cycle_s / STALL_S[opts.transport])
    return float(min(1440.0, max(20.0, round(speed, -1))))


# ============================================================================================
# Worker processes: a share of the homes, each with its devices, gateway and physics sampler


@dataclass(frozen=True)
class WorkerJob:
    """What one worker runs (picklable)."""

    homes: tuple[HomeSpec, ...]
    broker_url: str
    dso_public_key: str
    start: float
    end: float
    speed: float
    cycle_s: float
    out_dir: str
    market: bool
    planner: dict[str, Any]  # [planner] keys common to every home
    market_table: dict[str, Any]
    tariff_table: dict[str, Any]
    envelope_sample_s: float
    tolerance_w: float
    day_start: float
    stuck_after_s: float = 600.0
    devices: str = "tcp"
    hold: Any = None  # drivers.clock.TimeHold shared with the parent (None: a rigid timeline)
    cpu: int | None = None  # the core this worker runs on (None: wherever the OS puts it)
    plan_nice: int | None = None  # plan in a child process at this nice (None: on a thread)


def usable_cpus() -> list[int]:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share),
    at least one entry even where the platform cannot tell."""
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if cpus:
            return cpus
    return list(range(max(1, os.cpu_count() or 1)))


def worker_cpus(n: int, cpus: Sequence[int]) -> list[int | None]:
    """The core each of ``n`` workers is pinned to: one core each while there are at least as
    many cores as workers (and more than one), else none (the OS balances an oversubscribed
    set better than a fixed round robin that doubles some cores up).

    Why pin: each worker is one busy interpreter (its fast loops and planning thread share one
    lock, so it never uses more than about one core); left free, the scheduler moves it between
    cores as the parent, the broker and the other worker wake, and every move starts it on cold
    caches and makes its event loop late, which holds the shared timeline for every process.
    Measured, 50 homes in two workers, 3 simulated hours at x400 on two cores: 40.4-42.4 s
    wall and 62.8-66.4 CPU s pinned, 45.0-45.3 s and 69.8-71.7 s free."""
    if len(cpus) < 2 or n > len(cpus):
        return [None] * n
    return list(cpus[:n])


def _pin(cpu: int) -> None:
    # Every thread the process has by now (numpy's BLAS pool starts at import): a thread
    # started later inherits its creator's mask.
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError as e:  # a thread that just ended, or a mask the container forbids
            log.debug("worker: thread %d not pinned to CPU %d: %s", tid, cpu, e)


def _gateway_config(spec: HomeSpec, job: WorkerJob, sim: Any) -> Any:
    from community.demo import _planner_table
    from gateway.config import parse_config

    planner = {**_planner_table(spec.config, True), **job.planner}
    if not spec.config.has_pv:
        planner["pv_kwp"] = 0.0
        planner.pop("pv_ac_limit_w", None)
    return parse_config({
        "site_id": spec.site,
        "devices": [{"kind": e.kind, "name": f"{spec.site}-{e.kind}", "host": e.host,
                     "transport": e.transport, "unit": e.unit, "timeout_s": 1.0,
                     **({"port": e.port} if e.transport == "tcp" else {})}
                    for e in sim.endpoints],
        "broker": {"url": job.broker_url, "keepalive_s": 30, "connect_timeout_s": 10.0},
        "store": {"path": str(Path(job.out_dir) / f"{spec.site}.db"),
                  "telemetry_interval_s": 60.0, "commit_interval_s": 300.0},
        "mqtt": {"state_interval_s": 300.0},
        "control": {"cycle_s": job.cycle_s, "startup_grace_s": 5.0,
                    "phase_s": round(spec.phase * job.cycle_s, 3) % job.cycle_s},
        "tariff": job.tariff_table,
        # each home's envelope status every 5 min (and on every change), not every minute: less
        # broker traffic and CPU for a fleet, the same compliance data (telemetry carries it)
        "envelope": {"dso_public_key": job.dso_public_key, "status_interval_s": 300.0},
        "planner": planner,
        "market": job.market_table if job.market else {"enabled": False},
    })


@dataclass
class _Samples:
    """Minute samples of one home's physics (cumulative counters in Wh)."""

    t: list[float] = field(default_factory=list)
    load_w: list[float] = field(default_factory=list)
    pv_w: list[float] = field(default_factory=list)
    battery_w: list[float] = field(default_factory=list)
    site_w: list[float] = field(default_factory=list)
    soc_pct: list[float] = field(default_factory=list)
    import_wh: list[float] = field(default_factory=list)
    export_wh: list[float] = field(default_factory=list)
    load_wh: list[float] = field(default_factory=list)
    pv_avail_wh: list[float] = field(default_factory=list)
    stored_wh: list[float] = field(default_factory=list)

    def add(self, s: Any, has_battery: bool) -> None:
        self.t.append(s.t)
        self.load_w.append(s.load_w)
        self.pv_w.append(s.pv_w)
        self.battery_w.append(s.battery_w)
        self.site_w.append(s.site_w)
        self.soc_pct.append(s.soc_pct if has_battery else math.nan)
        self.import_wh.append(s.import_wh)
        self.export_wh.append(s.export_wh)
        self.load_wh.append(s.load_wh)
        self.pv_avail_wh.append(s.pv_avail_wh)
        self.stored_wh.append(s.stored_wh)


async def _sample(physics: Any, clock: Any, until: float, out: _Samples, has_battery: bool,
                  step_s: float = 60.0) -> None:
    """Samples every ``step_s`` from now through ``until`` (the last one at ``until`` or just
    after), taken by the physics' integration as it passes the grid (no task woken each)."""
    out.add(physics.state(), has_battery)
    t0 = physics.t

    def probe(t: float, flows: Any) -> None:
        if t0 < t < until:
            out.add(physics.snapshot(t, flows), has_battery)

    physics.add_probe(step_s, probe, t0)
    await clock.sleep_until(until)
    physics.advance(until)
    out.add(physics.state(), has_battery)


async def _run_worker(job: WorkerJob, conn: Connection) -> list[dict[str, Any]]:
    from gateway.planner import close_plan_executor, use_plan_process

    step = int(job.planner["step_s"])
    if job.plan_nice is not None:
        use_plan_process(job.plan_nice, int(job.planner["horizon_s"]) // step, float(step))
    try:
        return await _worker_day(job, conn)
    finally:
        await asyncio.to_thread(close_plan_executor)


async def _worker_day(job: WorkerJob, conn: Connection) -> list[dict[str, Any]]:
    from community.demo import EnvelopeObserver
    from drivers.clock import SimClock, govern
    from firmware_sim.server import run_home
    from gateway.daemon import run_gateway
    from gateway.planner import in_plan_thread, warm_up

    step = int(job.planner["step_s"])
    # import cvxpy and compile the LP on the planning thread before time runs
    await in_plan_thread(warm_up, int(job.planner["horizon_s"]) // step, float(step))
    # Everything imported so far (cvxpy, scipy, numpy: ~10^6 objects) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it (measured, 25
    # homes in one worker: full collections of 35-107 ms, each a stall of every fast loop).
    gc.collect()
    gc.freeze()
    # What is left is the day's churn (readings, futures, handles): young collections every
    # 20,000 allocations instead of 700, the middle generation every 50 of them instead of 10.
    # Measured (25 homes, one worker): ~4 % of the worker's CPU; the garbage held in between is
    # a few MB.
    gc.set_threshold(20_000, 50, 1000)
    conn.send(("ready", os.getpid()))
    msg = await asyncio.to_thread(conn.recv)
    epoch = float(msg[1])
    clock = SimClock(start=job.start, speed=job.speed, epoch=epoch, hold=job.hold)
    results: list[dict[str, Any]] = []
    governor = (asyncio.create_task(govern(job.hold, slack_s=_slack_s(job.speed)))
                if job.hold is not None else None)
    async with contextlib.AsyncExitStack() as stack:
        runs = []
        for spec in job.homes:
            sim = await stack.enter_async_context(
                run_home(clock, spec.config, transport=job.devices, name=spec.site))
            day = site_day(spec.site, spec.kind, job.day_start)
            obs = EnvelopeObserver(sim.physics, clock, day.limits_at, job.tolerance_w,
                                   step_s=job.envelope_sample_s,
                                   phase_s=spec.phase * job.envelope_sample_s, by_probe=True)
            smp = _Samples()
            cfg = _gateway_config(spec, job, sim)
            runs.append((spec, sim, day, obs, smp, cfg))
        tasks: list[asyncio.Task[Any]] = []
        for spec, sim, _day, obs, smp, cfg in runs:
            tasks.append(asyncio.create_task(run_gateway(cfg, clock, until=job.end),
                                             name=f"gw-{spec.site}"))
            tasks.append(asyncio.create_task(obs.run(job.end), name=f"envelope-{spec.site}"))
            tasks.append(asyncio.create_task(
                _sample(sim.physics, clock, job.end, smp, spec.config.has_battery),
                name=f"sampler-{spec.site}"))
        # The day ends at ``job.end`` of domain time; a gateway gets its shutdown bound and a
        # margin on top, then whatever still runs is reported (with its stack) and cancelled:
        # a stuck gateway must show up in the report, not hang the demo.
        await _until_domain(clock, job.end, tasks)
        done = await _gather_bounded(tasks, 60.0)
        for i, (spec, _sim, day, obs, smp, _cfg) in enumerate(runs):
            stats = done[3 * i]
            errors = [repr(x) for x in done[3 * i: 3 * i + 3] if isinstance(x, BaseException)]
            results.append({
                "site": spec.site, "kind": spec.kind, "config": asdict(spec.config),
                "errors": errors,
                "gateway": stats.as_dict() if not isinstance(stats, BaseException) else None,
                "envelope": obs.report(day.change_times()),
                "episodes": obs.episodes(),
                "samples": asdict(smp),
            })
        if governor is not None:
            governor.cancel()
        # Send before the servers and sessions close: a slow teardown must not lose the day.
        conn.send(("done", results))
    return results


def _slack_s(speed: float) -> float:
    """The lag (real s) an elastic timeline accepts without holding: half a domain second (a
    slow device reply; a cycle is 10 s and the envelope's tolerance 15 s), at least 2 ms.
    Measured, 50 homes, x300 ceiling: one domain second held 150 s of 447 s and let 10
    excursions run beyond tolerance; 2 ms summed over processes held 418 s of 717 s, 1."""
    return max(0.002, 0.5 / speed)


async def _until_domain(clock: Any, end: float, tasks: list[asyncio.Task[Any]]) -> None:
    """Until domain time reaches ``end`` or every task is done (an elastic timeline may take
    longer than ``end / speed`` real seconds: wait on domain time, not on a real deadline)."""
    while clock.now() < end:
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        await asyncio.wait(pending, timeout=max(0.5, (end - clock.now()) / clock.speed))


async def _gather_bounded(tasks: list[asyncio.Task[Any]], timeout_s: float) -> list[Any]:
    """Results (or exceptions) of ``tasks`` in order; tasks still running after ``timeout_s``
    real seconds are cancelled (repeatedly: some libraries swallow one cancellation) and give
    a ``TimeoutError`` naming them."""

    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        log.error("community worker: %s still running %.0f s after the end; cancelling",
                  t.get_name(), timeout_s)
        t.print_stack(limit=8, file=sys.stderr)
    for _ in range(20):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    out: list[Any] = []
    for t in tasks:
        if not t.done():
            out.append(TimeoutError(f"{t.get_name()} did not stop"))
        elif t.cancelled():
            out.append(TimeoutError(f"{t.get_name()} did not stop (cancelled)"))
        else:
            exc = t.exception()
            out.append(exc if exc is not None else t.result())
    return out


def worker_main(job: WorkerJob, conn: Connection) -> None:
    """Entry point of a worker process (``multiprocessing`` spawn target)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The parent's stdout carries the report (its last line is the JSON); solver banners that
    # native libraries print on fd 1 go to stderr instead.
    os.dup2(2, 1)
    # The planning thread (cvxpy: long pure-Python stretches) and the fast loops share one GIL;
    # at the default 5 ms switch interval every await of a fast loop can wait 5 ms for it, which
    # at x240 is more than a simulated second per hop. Hand the GIL over more often.
    sys.setswitchinterval(0.0005)
    # A worker that outlives its day by far is stuck: say where, on stderr.
    faulthandler.dump_traceback_later(job.stuck_after_s, exit=False)
    if job.cpu is not None:
        _pin(job.cpu)
    try:
        asyncio.run(_run_worker(job, conn))
    except BaseException:  # report any failure to the parent, never hang it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ============================================================================================
# The parent: broker, DSO, operator, workers; one day with the market and (optionally) one
# without; then the accounting


@dataclass
class _DayRun:
    homes: list[dict[str, Any]]
    market: dict[str, Any]
    wall_s: float
    awards: dict[str, dict[str, tuple[float, float]]]  # site -> interval start -> (kWh, money)
    auctions: list[dict[str, Any]]
    dso_acks: dict[str, int]
    operator: dict[str, Any]
    held_s: float = 0.0  # real seconds the timeline was held (elastic runs)


def _split(items: Sequence[HomeSpec], k: int) -> list[tuple[HomeSpec, ...]]:
    return [tuple(items[i::k]) for i in range(k) if items[i::k]]


async def _day(opts: CommunityOptions, specs: list[HomeSpec], broker: Any, out: Path,
               start: float, speed: float, market: bool, tag: str) -> _DayRun:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from community.dso import DsoPublisher
    from community.market import MarketOperator
    from community.market.ledger import Ledger
    from drivers.clock import SimClock, TimeHold, govern
    from gateway.signing import public_key_to_b64

    day_start = start - start % 86400.0
    end = start + opts.sim_hours * 3600.0
    run_dir = out / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in run_dir.glob("*.db*"):  # every day starts from empty stores and ledger
        f.unlink()
    key = Ed25519PrivateKey.generate()
    hold = TimeHold() if opts.elastic else None
    mqtt_v = 5 if broker.kind == "mosquitto" else 3
    job0 = dict(
        broker_url=broker.url, dso_public_key=public_key_to_b64(key.public_key()),
        start=start, end=end, speed=speed, cycle_s=opts.cycle_s, out_dir=str(run_dir),
        market=market,
        # Spread the homes' periodic work (plans, bid curves) over a minute or two, as a
        # fleet should: in lockstep, ten plans and bid curves at each boundary stall the fast
        # loops sharing a worker's interpreter.
        planner={"step_s": opts.interval_s, "horizon_s": 86400, "budget_ms": 2000.0,
                 "solver": opts.solver,
                 "terminal_value_per_kwh": opts.terminal_value,
                 "spread_s": min(60.0, opts.interval_s / 4)},
        market_table={"enabled": True, "community": COMMUNITY, "price_floor": opts.price_floor,
                      "price_cap": opts.price_cap, "prices": opts.bid_prices,
                      "gate_margin_s": 10.0, "retry_s": 30.0, "meter_delay_s": 5.0,
                      "bid_spread_s": min(120.0, opts.interval_s / 4)},
        tariff_table={"import_per_kwh": opts.price_cap, "feed_in_per_kwh": opts.price_floor},
        envelope_sample_s=opts.envelope_sample_s,
        tolerance_w=100.0, day_start=day_start, devices=opts.transport, hold=hold,
        stuck_after_s=opts.sim_hours * 3600.0 / speed * 6.0 + 120.0,
        plan_nice=PLAN_NICE if opts.plan_process else None,
    )
    cpus = usable_cpus()
    shares = _split(specs, min(opts.workers or len(cpus), len(specs)))
    ctx = mp.get_context("spawn")
    procs: list[tuple[Any, Connection]] = []
    for share, cpu in zip(shares, worker_cpus(len(shares), cpus), strict=True):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(WorkerJob(homes=share, cpu=cpu, **job0),
                                                  child),
                        # a daemonic process may not start the planning child
                        name=f"hems-community-{tag}", daemon=not opts.plan_process)
        p.start()
        child.close()
        procs.append((p, parent))
    try:
        for _p, conn in procs:  # importing cvxpy and compiling the LP: a few real seconds
            msg = await asyncio.to_thread(_recv, conn, 120.0)
            if msg[0] != "ready":
                raise RuntimeError(f"community worker failed to start:\n{msg[1]}")
        epoch = time.time() + 1.0
        clock = SimClock(start=start, speed=speed, epoch=epoch, hold=hold)
        stop = asyncio.Event()
        governor = (asyncio.create_task(govern(hold, slack_s=_slack_s(speed)))
                    if hold is not None else None)
        days = [site_day(s.site, s.kind, day_start) for s in specs]
        # No heartbeats: these gateways judge contact by their broker session (the default),
        # and at x120 N sites' heartbeats would be signing work for nobody.
        pub = DsoPublisher(broker.url, key, clock, [d.schedule() for d in days],
                           identifier=f"hems-community-dso-{tag}", heartbeat_s=0.0)
        pub_task = asyncio.create_task(pub.run(stop))
        await asyncio.wait_for(pub.connected.wait(), 10.0)
        ledger_path = run_dir / "market.db"
        op_task = None
        op = None
        if market:
            op = MarketOperator(broker.url, COMMUNITY, [s.site for s in specs], clock,
                                ledger_path, opts.interval_s, opts.gate_lead_s,
                                opts.price_floor, opts.price_cap, instance=f"op-{tag}",
                                mqtt_version=mqtt_v)
            op_task = asyncio.create_task(op.run(stop))
            await asyncio.wait_for(op.connected.wait(), 10.0)
        wall0 = time.monotonic()
        for _p, conn in procs:
            conn.send(("go", epoch))
        homes: list[dict[str, Any]] = []
        for p, conn in procs:
            # the day's end in domain time (an elastic timeline can run slower than ``speed``),
            # then the worker's own 60 s to stop its gateways, and a margin; a worker that died
            # is reported at once
            while clock.now() < end and p.is_alive() and not conn.poll():
                await asyncio.to_thread(conn.poll, 0.5)
            msg = await asyncio.to_thread(_recv, conn, 180.0)
            if msg[0] != "done":
                raise RuntimeError(f"community worker failed:\n{msg[1]}")
            homes.extend(msg[1])
        wall = time.monotonic() - wall0
        held = hold.seconds if hold is not None else 0.0
        if governor is not None:
            governor.cancel()
        await asyncio.sleep(0.3)  # the last acks and meter reports
        stop.set()
        await pub_task
        if op_task is not None:
            await op_task
        acks = dict(pub.acks.counts)
    finally:
        for p, conn in procs:
            conn.close()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    homes.sort(key=lambda h: str(h["site"]))
    awards: dict[str, dict[str, tuple[float, float]]] = {}
    auctions: list[dict[str, Any]] = []
    mkt: dict[str, Any] = {}
    op_stats: dict[str, Any] = {}
    if market and ledger_path.exists():
        lg = Ledger(str(ledger_path))
        try:
            awards, auctions, mkt = _ledger_summary(lg, start, end)
        finally:
            lg.close()
        if op is not None:
            op_stats = asdict(op.stats)
    return _DayRun(homes, mkt, wall, awards, auctions, acks, op_stats, held)


def _recv(conn: Connection, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise RuntimeError(f"community worker silent for {timeout_s:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError("community worker exited without a result (see its stderr)") from None


def _ledger_summary(lg: Any, start: float, end: float) -> tuple[
        dict[str, dict[str, tuple[float, float]]], list[dict[str, Any]], dict[str, Any]]:
    results = [r for r in lg.results(COMMUNITY)]
    awards: dict[str, dict[str, tuple[float, float]]] = {}
    auctions = []
    vol_wh = 0
    money = 0.0
    trades = 0
    bids = 0
    for r in results:
        a = lg.auction(COMMUNITY, r["interval_id"])
        if a is None or a.delivery_start >= end or a.delivery_end <= start:
            continue
        bids += int(r["bids"])
        trades += int(r["trades"])
        v = int(r["volume_wh"])
        price = r["clearing_price"]
        if v > 0 and price is not None:
            vol_wh += v
            money += v / 1000.0 * float(price)
        auctions.append({"start": a.delivery_start, "end": a.delivery_end,
                         "price": None if v <= 0 else price, "volume_kwh": v / 1000.0,
                         "bids": int(r["bids"])})
        for site, aw in lg.awards(COMMUNITY, r["interval_id"]).items():
            awards.setdefault(site, {})[f"{a.delivery_start:.0f}"] = (aw.export_kwh, aw.credit)
    counts = lg.input_counts(COMMUNITY)
    mkt = {
        "intervals": len(auctions),
        "intervals_traded": sum(1 for a in auctions if a["volume_kwh"] > 0),
        "bids": bids,
        "trades": trades,
        "traded_kwh": round(vol_wh / 1000.0, 3),
        "avg_price": round(money / (vol_wh / 1000.0), 4) if vol_wh else None,
        "inputs": counts,
        "settlements": len(lg.settlements(COMMUNITY)),
    }
    return awards, auctions, mkt


# ============================================================================================
# Accounting (pure)


def interval_net_export_kwh(t: Floats, import_wh: Floats,
                            export_wh: Floats, edges: Floats) -> np.ndarray:
    """Metered net export (kWh, + export) per interval between consecutive ``edges``, from
    cumulative import/export counters sampled at ``t`` (linear between samples)."""
    ts = np.asarray(t, dtype=float)
    net = np.asarray(export_wh, dtype=float) - np.asarray(import_wh, dtype=float)
    at = np.interp(np.asarray(edges, dtype=float), ts, net)
    return np.diff(at) / 1000.0


def fit_only_net_export_kwh(t: Floats, load_wh: Floats,
                            pv_avail_wh: Floats, export_limit_w: Floats,
                            edges: Floats) -> np.ndarray:
    """Net export per interval with the battery idle and no market: available PV minus load over
    each sample window, export curtailed to the export limit in force (nan = none)."""
    ts = np.asarray(t, dtype=float)
    dt_h = np.diff(ts) / 3600.0
    net_wh = np.diff(np.asarray(pv_avail_wh, dtype=float)) - np.diff(np.asarray(load_wh,
                                                                              dtype=float))
    lim = np.asarray(export_limit_w, dtype=float)[:-1]
    cap_wh = np.where(np.isnan(lim), np.inf, lim * dt_h)
    net_wh = np.minimum(net_wh, cap_wh)
    cum = np.concatenate([[0.0], np.cumsum(net_wh)])
    at = np.interp(np.asarray(edges, dtype=float), ts, cum)
    return np.diff(at) / 1000.0


def bill(net_export_kwh: Floats, floor: float, cap: float,
         awards: Sequence[tuple[float, float] | None] | None = None) -> float:
    """Cost of a day (currency; + paid): per interval, the award at its price and the deviation
    (or the whole net exchange, without an award) with the retailer."""
    from community.market.settlement import Award, Tariff, settle_site

    tariff = Tariff(floor, cap)
    total = 0.0
    for i, m in enumerate(net_export_kwh):
        aw = awards[i] if awards is not None else None
        st = settle_site("x", None if aw is None else Award(export_kwh=aw[0], amount=aw[1]),
                         float(m), tariff)
        total += st.total
    return -total


def award_shortfall_kwh(net_export_kwh: Floats,
                        awards: Sequence[tuple[float, float] | None]) -> float:
    """Awarded energy the meter did not deliver: per interval with an award (kWh, + sold), what
    a seller exported short of what it sold, or a buyer imported short of what it bought (it
    settles at the retailer's prices instead of the trade's). Exchange beyond an award in its
    direction is no shortfall: the rest of a surplus goes to the retailer as it would anyway.
    Forecast errors make some; plans that take an award up late make more."""
    short = 0.0
    for m, a in zip(net_export_kwh, awards, strict=True):
        if a is not None:
            short += max(0.0, a[0] - float(m)) if a[0] > 0 else max(0.0, float(m) - a[0])
    return short


def _edges(start: float, end: float, interval_s: int) -> np.ndarray:
    first = math.ceil(start / interval_s) * interval_s
    e = np.arange(first, end + 1e-6, interval_s, dtype=float)
    if e.size == 0 or e[0] > start:
        e = np.concatenate([[start], e])
    if e[-1] < end:
        e = np.concatenate([e, [end]])
    return e


def _limit_series(site: str, kind: str, day_start: float, t: Floats, name: str) -> list[float]:
    day = site_day(site, kind, day_start)
    out = []
    for x in t:
        v = day.limits_at(float(x)).get(name)
        out.append(math.nan if v is None else float(v))
    return out


def _home_costs(h: dict[str, Any], edges: np.ndarray, opts: CommunityOptions,
                awards: dict[str, tuple[float, float]] | None) -> dict[str, float]:
    s = h["samples"]
    net = interval_net_export_kwh(s["t"], s["import_wh"], s["export_wh"], edges)
    aw = None
    if awards is not None:
        aw = [awards.get(f"{e:.0f}") for e in edges[:-1]]
    cost = bill(net, opts.price_floor, opts.price_cap, aw)
    stored = s["stored_wh"]
    cost -= (stored[-1] - stored[0]) / 1000.0 * opts.terminal_value
    short = award_shortfall_kwh(net, aw) if aw is not None else 0.0
    return {"cost": cost, "import_kwh": float(-net[net < 0].sum()),
            "export_kwh": float(net[net > 0].sum()), "shortfall_kwh": short}


def _fit_only(h: dict[str, Any], edges: np.ndarray, opts: CommunityOptions,
              day_start: float) -> float:
    s = h["samples"]
    lim = _limit_series(h["site"], h["kind"], day_start, s["t"], "export_w")
    net = fit_only_net_export_kwh(s["t"], s["load_wh"], s["pv_avail_wh"], lim, edges)
    return bill(net, opts.price_floor, opts.price_cap)


def _compliance(homes: list[dict[str, Any]], opts: CommunityOptions) -> dict[str, Any]:
    worst_w = 0.0
    worst_imp = 0.0
    exceed_s = 0.0
    beyond = 0
    beyond_s = 0.0
    longest = 0.0
    p99 = 0.0
    for h in homes:
        r = h["envelope"]
        worst_w = max(worst_w, r["max_export_exceedance_w"])
        worst_imp = max(worst_imp, r["max_import_exceedance_w"])
        exceed_s += r["exceedance_s"]
        longest = max(longest, r["longest_exceedance_s"])
        p99 = max(p99, r["p99_response_s"])
        for _t0, dur, _w in h["episodes"]:
            if dur > opts.response_s:
                beyond += 1
                beyond_s += dur
    return {
        "homes": len(homes), "tolerance_w": 100.0, "response_s": opts.response_s,
        "max_export_exceedance_w": round(worst_w, 1),
        "max_import_exceedance_w": round(worst_imp, 1),
        "exceedance_s": round(exceed_s, 1), "longest_exceedance_s": round(longest, 1),
        "episodes_beyond_tolerance": beyond, "beyond_tolerance_s": round(beyond_s, 1),
        "worst_p99_response_s": round(p99, 1),
        "homes_with_exceedance": sum(1 for h in homes if h["episodes"]),
    }


async def run_community(opts: CommunityOptions) -> dict[str, Any]:
    """Run the community day (and the no-market day) and return the report."""
    from community.demo import _parse_start
    from gateway.broker import local_broker

    start = _parse_start(opts.start)
    day_start = start - start % 86400.0
    end = start + opts.sim_hours * 3600.0
    speed = opts.speed or auto_speed(opts)
    specs = home_mix(opts.homes)
    wall0 = time.monotonic()
    with contextlib.ExitStack() as es:
        out = Path(opts.out_dir) if opts.out_dir else Path(es.enter_context(
            tempfile.TemporaryDirectory(prefix="hems-community-")))
        out.mkdir(parents=True, exist_ok=True)
        async with local_broker(prefer=opts.broker) as broker:
            comm = await _day(opts, specs, broker, out, start, speed, True, "community")
            base = (await _day(opts, specs, broker, out, start, speed, False, "no_p2p")
                    if opts.baseline else None)
            broker_kind = broker.kind
        edges = _edges(start, end, opts.interval_s)
        bills: dict[str, dict[str, float]] = {}
        per_home = []
        shortfall = 0.0
        for h in comm.homes:
            site = h["site"]
            c = _home_costs(h, edges, opts, comm.awards.get(site, {}))
            fit = _fit_only(h, edges, opts, day_start)
            b: dict[str, float] = {"community": round(c["cost"], 4), "fit_only": round(fit, 4)}
            if base is not None:
                hb = next(x for x in base.homes if x["site"] == site)
                b["no_p2p"] = round(_home_costs(hb, edges, opts, None)["cost"], 4)
            bills[site] = b
            shortfall += c["shortfall_kwh"]
            sold = sum(v[0] for v in comm.awards.get(site, {}).values() if v[0] > 0)
            bought = -sum(v[0] for v in comm.awards.get(site, {}).values() if v[0] < 0)
            g = h["gateway"] or {}
            per_home.append({
                "site": site, "kind": h["kind"], **b,
                "sold_kwh": round(sold, 3), "bought_kwh": round(bought, 3),
                "import_kwh": round(c["import_kwh"], 3), "export_kwh": round(c["export_kwh"], 3),
                "envelope_max_exceedance_w": h["envelope"]["max_export_exceedance_w"],
                # episodes above tolerance longer than response_s: [start, seconds, max W]
                "breaches": [[round(t0, 1), round(d, 1), round(w, 1)]
                             for t0, d, w in h["episodes"] if d > opts.response_s],
                "overruns": g.get("overruns"), "cycles": g.get("cycles"),
                "plans": (g.get("planner") or {}).get("plans"),
                "errors": h["errors"],
            })
        costs = {k: round(sum(b[k] for b in bills.values()), 3)
                 for k in ("community", "no_p2p", "fit_only") if all(k in b for b in
                                                                     bills.values())}
        envelope = _compliance(comm.homes, opts)
        picture = None
        if opts.picture:
            picture = _picture(comm, bills, opts, start, day_start, out / "community-day.png",
                               _verdict(envelope, opts.envelope_sample_s))
        errors = [e for h in comm.homes + (base.homes if base else []) for e in h["errors"]]
        report: dict[str, Any] = {
            "ok": not errors and (not costs.get("no_p2p") or
                                  costs["community"] < costs["no_p2p"] < costs["fit_only"]),
            "homes": opts.homes,
            "kinds": {k: sum(1 for s in specs if s.kind == k) for k in KINDS},
            "sim_hours": opts.sim_hours, "speed": speed, "cycle_s": opts.cycle_s,
            "interval_s": opts.interval_s, "workers": min(opts.workers or len(usable_cpus()),
                                                          opts.homes),
            "broker": broker_kind,
            "devices": opts.transport,
            # elastic timeline: the real seconds it was held and the speed it really ran at
            "held_s": {"community": round(comm.held_s, 1),
                       "no_p2p": round(base.held_s, 1) if base else None},
            "effective_speed": round(opts.sim_hours * 3600.0 / max(comm.wall_s, 1e-9), 1),
            # awarded kWh the homes' meters did not deliver (sold) or take (bought)
            "market": {**comm.market, "award_shortfall_kwh": round(shortfall, 3)},
            "costs": costs,
            "tariff": {"feed_in": opts.price_floor, "retail": opts.price_cap,
                       "terminal_value": opts.terminal_value},
            "bills": per_home,
            "envelope": envelope,
            "envelope_no_p2p": _compliance(base.homes, opts) if base else None,
            "gateways": _gateway_totals(comm.homes),
            "picture": str(picture) if picture else None,
            "wall_s": {"community": round(comm.wall_s, 1),
                       "no_p2p": round(base.wall_s, 1) if base else None,
                       "total": round(time.monotonic() - wall0, 1)},
            "errors": errors[:10],
        }
        if opts.out_dir:
            import json

            (out / "report.json").write_text(json.dumps(report, indent=1))
        return report


def _gateway_totals(homes: list[dict[str, Any]]) -> dict[str, Any]:
    gs = [h["gateway"] for h in homes if h["gateway"]]

    def tot(k: str) -> int:
        return int(sum(g.get(k, 0) or 0 for g in gs))

    plans = sum(int((g.get("planner") or {}).get("plans", 0)) for g in gs)
    fallbacks = sum(int((g.get("planner") or {}).get("fallbacks", 0)) for g in gs)
    return {"cycles": tot("cycles"), "overruns": tot("overruns"), "poll_errors": tot("poll_errors"),
            "telemetry_lost": tot("telemetry_lost"), "task_restarts": tot("task_restarts"),
            "plans": plans, "fallbacks": fallbacks,
            "bids_sent": sum(int((g.get("market") or {}).get("bids_sent", 0)) for g in gs),
            "awards": sum(int((g.get("market") or {}).get("awards", 0)) for g in gs)}


def _verdict(c: dict[str, Any], sample_s: float) -> str:
    """The compliance check's one-line verdict for the picture."""
    return (f"compliance ({sample_s:g} s samples): {c['episodes_beyond_tolerance']} episode(s) "
            f"over the limit by > {c['tolerance_w']:g} W for > {c['response_s']:g} s; "
            f"longest excursion {c['longest_exceedance_s']:g} s")


def _picture(run: _DayRun, bills: dict[str, dict[str, float]], opts: CommunityOptions,
             start: float, day_start: float, path: Path, compliance: str = "") -> Path | None:
    try:
        from community.plot import AuctionRow, DaySeries, HomeSeries, render_day
    except ImportError:
        return None
    if not run.homes:
        return None
    t = np.asarray(run.homes[0]["samples"]["t"], dtype=float)
    homes = []
    for h in run.homes:
        s = h["samples"]

        def on_t(key: str, s: dict[str, Any] = s) -> list[float]:
            return list(np.interp(t, np.asarray(s["t"], float), np.asarray(s[key], float)))

        homes.append(HomeSeries(
            site=h["site"], kind=h["kind"], load_w=on_t("load_w"), pv_w=on_t("pv_w"),
            battery_w=on_t("battery_w"), site_w=on_t("site_w"), soc_pct=on_t("soc_pct"),
            export_limit_w=_limit_series(h["site"], h["kind"], day_start, t, "export_w"),
            import_limit_w=_limit_series(h["site"], h["kind"], day_start, t, "import_w")))
    auctions = [AuctionRow(start=a["start"], end=a["end"], price=a["price"],
                           volume_kwh=a["volume_kwh"]) for a in run.auctions]
    series = DaySeries(t=list(t), homes=homes, auctions=auctions, price_floor=opts.price_floor,
                       price_cap=opts.price_cap, bills=bills,
                       title=f"hems community demo: {len(homes)} homes", compliance=compliance)
    try:
        return render_day(series, path)
    except RuntimeError as e:  # matplotlib missing
        log.warning("%s", e)
        return None


def format_report(r: dict[str, Any]) -> str:
    """A few lines a person reads."""
    m, c, e = r["market"], r["costs"], r["envelope"]
    kinds = ", ".join(f"{v} {k}" for k, v in r["kinds"].items())
    lines = [
        f"hems community demo: {r['homes']} homes ({kinds}), "
        f"{r['sim_hours']:g} simulated h at x{r['speed']:g} at most (x{r['effective_speed']:g} "
        f"in effect, timeline held {r['held_s']['community']} s), {r['workers']} worker "
        f"process(es), devices {r['devices']}, broker {r['broker']}; "
        f"wall {r['wall_s']['total']} s",
        f"  market: {m.get('intervals', 0)} auctions ({m.get('intervals_traded', 0)} traded), "
        f"{m.get('bids', 0)} bids, {m.get('trades', 0)} awards, {m.get('traded_kwh', 0)} kWh at "
        f"avg {m.get('avg_price')} /kWh; awarded energy not delivered or taken "
        f"{m.get('award_shortfall_kwh')} kWh",
        "  costs (community total, + paid): " + ", ".join(f"{k} {v}" for k, v in c.items()),
        f"  envelope: max export exceedance {e['max_export_exceedance_w']} W, "
        f"{e['episodes_beyond_tolerance']} episode(s) above {e['tolerance_w']:g} W for more than "
        f"{e['response_s']:g} s, longest {e['longest_exceedance_s']} s",
        "  bills:",
    ]
    for b in r["bills"]:
        lines.append(f"    {b['site']} {b['kind']:<10} community {b['community']:8.3f}  "
                     f"no_p2p {b.get('no_p2p', float('nan')):8.3f}  fit_only "
                     f"{b['fit_only']:8.3f}  sold {b['sold_kwh']:6.2f}  bought "
                     f"{b['bought_kwh']:6.2f} kWh")
    if r.get("picture"):
        lines.append(f"  picture: {r['picture']}")
    return "\n".join(lines)


__all__ = [
    "CommunityOptions",
    "HomeSpec",
    "auto_speed",
    "bill",
    "cpu_per_domain_s",
    "fit_only_net_export_kwh",
    "format_report",
    "home_mix",
    "interval_net_export_kwh",
    "run_community",
]
