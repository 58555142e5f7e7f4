"""Device faults end to end: each simulated device (meter, inverter, battery) goes through every
fault kind of ``firmware_sim.faults`` in turn while the DSO's export limit binds, and after each
one the safe behaviour is checked on the physics (the truth) and in the gateway's store:

* the site stays inside the envelope (no exceedance above tolerance lasting > 15 s, AS/NZS 4777.2);
* no setpoint outside the device ratings is ever written;
* the fast loop keeps cycling (no task restart) and the device reads again afterwards;
* a clear event says what happened; at the end, every telemetry row is stored (seq 1..n).

One gateway run per device (the phases in sequence) keeps the suite fast; a failure names the
phase."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import TOLERANCE_W, Site, running_site, telemetry_rows, wait_until

pytestmark = pytest.mark.fault

FAULT_S = 40.0  # domain seconds each fault lasts (8x the 5 s static tolerance of 4777.2 is moot:
# the limit must hold for the whole fault, not be regained within 15 s of it)


def longest_exceedance_s(site: Site, since: int) -> tuple[float, float]:
    """(longest episode s, largest exceedance W) in the observer's samples from ``since``."""
    smp = site.observer.samples[since:]
    longest = worst = 0.0
    start: float | None = None
    for t, _, e in smp:
        worst = max(worst, abs(e))
        if abs(e) > TOLERANCE_W:
            start = t if start is None else start
            longest = max(longest, t - start)
        else:
            start = None
    return longest, worst


def device_events(site: Site, kind: str, since_ts: float) -> list[str]:
    return [f"{lv} {k}: {m}" for ts, lv, k, m in site.events() if ts >= since_ts
            and m.startswith(kind)]


async def run_phase(site: Site, kind: str, fault: str, *, fault_s: float = FAULT_S,
                    cleared: list[float] | None = None,
                    hold_until: Callable[[], bool] | None = None, **kw: Any) -> list[str]:
    """Inject ``fault`` on ``kind`` for ``fault_s`` (FAULT_S) and until ``hold_until()`` holds,
    wait for recovery, check the envelope held. Returns the events logged about the device
    since the injection; the domain time the fault was cleared is appended to ``cleared``."""
    gw = site.gw
    n0, c0, t0 = len(site.observer.samples), gw.stats.cycles, site.clock.now()
    faults = site.sim.faults[kind]
    faults.inject(fault, duration_s=3600.0, **kw)  # cleared below
    # A device that does not answer costs a cycle its (real-time) read timeout, many domain
    # seconds at this speed: the fault lasts FAULT_S domain seconds AND at least 4 cycles.
    await site.settle(fault_s)
    await wait_until(lambda: gw.stats.cycles >= c0 + 4, 20, f"{kind}/{fault}: cycles go on")
    if hold_until is not None:
        await wait_until(hold_until, 20, f"{kind}/{fault}: the phase's condition")
    faults.clear()
    if cleared is not None:
        cleared.append(site.clock.now())

    def back() -> bool:
        live = gw.live
        return (not gw.slots[kind].failing and live is not None
                and getattr(live, kind) is not None and live.ts > t0 + fault_s
                and live.ts > site.clock.now() - 5.0)

    await wait_until(back, 30, f"{kind} to read again after {fault}")
    await site.settle(20.0)
    longest, worst = longest_exceedance_s(site, n0)
    assert longest <= 15.0, f"{kind}/{fault}: exceedance of {worst:.0f} W for {longest:.0f} s"
    assert gw.stats.task_restarts == 0, f"{kind}/{fault}: a task restarted"
    await gw._in_db(lambda: None)  # the store thread is alive
    gw.commit_now.set()
    await site.settle(2.0)
    return device_events(site, kind, t0)


def _rating_ts(site: Site, since: float) -> float:
    """Domain time of the first "battery ratings changed" event since ``since`` (inf: none)."""
    return min((ts for ts, _, _, m in site.events("device")
                if ts >= since and "battery ratings changed" in m), default=math.inf)


def assert_setpoints_within_ratings(site: Site, max_battery_w: float) -> None:
    for t, bat, pct in site.setpoints:
        assert bat is None or abs(bat) <= max_battery_w + 1e-6, (t, bat)
        assert pct is None or 0.0 < pct <= 100.0, (t, pct)


async def finish_and_check_rows(site: Site) -> None:
    stats = await site.finish()
    assert stats.telemetry_lost == 0
    seqs = [s for s, _ in telemetry_rows(site.db)]
    assert seqs == list(range(1, stats.telemetry_produced + 1)), "a telemetry row is missing"


def has(evs: list[str], *words: str) -> bool:
    return any(all(w in e for w in words) for e in evs)


async def test_meter_faults(mosquitto: Any, tmp_path: Path) -> None:
    async with running_site(mosquitto, tmp_path) as site:
        for fault in ("timeout", "exception", "drop"):
            evs = await run_phase(site, "meter", fault)
            assert has(evs, "error device", "meter"), (fault, evs)
            assert has(evs, "info device", "meter reads again"), (fault, evs)
            # After 3 cycles without the meter the failsafe curtailed PV to 500 W + the 1 kW
            # charge; it is lifted at the envelope's ramp once the meter reads again.
            fs = [m for _, _, k, m in site.events("failsafe")]
            assert len(fs) >= 2 and fs[-2].startswith("meter lost: failsafe curtailment to 1"), fs
            assert fs[-1].startswith("meter reads again: failsafe ended"), (fault, fs)
            await wait_until(lambda: site.gw._resume is None, 30, "the PV limit ramped back")
        # Frozen registers: the readings look fine but are stale; the energy counters stop
        # while power flows. The gateway must notice and treat the meter as failed.
        evs = await run_phase(site, "meter", "frozen")
        assert has(evs, "error device", "meter", "frozen"), evs
        # An absurd reading (int16 saturated: +32.8 kW import) must not lift the curtailment.
        evs = await run_phase(site, "meter", "out_of_range")
        assert has(evs, "error device", "meter", "implausible"), evs
        assert_setpoints_within_ratings(site, 1000.0)
        await finish_and_check_rows(site)


async def test_inverter_faults(mosquitto: Any, tmp_path: Path) -> None:
    async with running_site(mosquitto, tmp_path) as site:
        for fault in ("timeout", "exception", "drop"):
            evs = await run_phase(site, "inverter", fault)
            assert has(evs, "error device", "inverter"), (fault, evs)
            assert has(evs, "info device", "inverter reads again"), (fault, evs)
        # Frozen: the energy counter stops while AC power is reported (30 s window, 3 Wh).
        # Judged like a failed read; the held limit is re-sent (the inverter still takes
        # writes): the fault outlasts the revert time (120 s), so a limit left to lapse would
        # show as an export exceedance in the physics.
        evs = await run_phase(site, "inverter", "frozen", fault_s=200.0)
        assert has(evs, "error device", "inverter", "frozen"), evs
        assert has(evs, "info device", "inverter reads again"), evs
        evs = await run_phase(site, "inverter", "out_of_range")  # W = 32767 on a 5 kW inverter
        assert has(evs, "error device", "inverter", "implausible"), evs
        evs = await run_phase(site, "inverter", "ratings_change")  # reboots as a 3 kW inverter
        assert has(evs, "device", "inverter", "ratings"), evs
        assert_setpoints_within_ratings(site, 1000.0)
        await finish_and_check_rows(site)


async def test_battery_faults(mosquitto: Any, tmp_path: Path) -> None:
    async with running_site(mosquitto, tmp_path) as site:
        for fault in ("timeout", "exception", "drop"):
            evs = await run_phase(site, "battery", fault)
            assert has(evs, "error device", "battery"), (fault, evs)
            assert has(evs, "info device", "battery reads again"), (fault, evs)
        # Frozen: SoC and power stay bit-identical while 1 kW should move the SoC (3 steps of
        # 0.1 % of 10 kWh: ~2 min), so this fault lasts longer than the others.
        evs = await run_phase(site, "battery", "frozen", fault_s=180.0)
        assert has(evs, "error device", "battery", "frozen"), evs
        assert has(evs, "info device", "battery reads again"), evs
        evs = await run_phase(site, "battery", "out_of_range")  # SoC 250 %
        assert has(evs, "error device", "battery", "implausible"), evs
        n, cleared = len(site.setpoints), []
        t_inject = site.clock.now()
        # reboots at 500 W; lasts until the gateway read that (a reboot may first cost a
        # timed-out read, many domain seconds at this speed) and 20 s of setpoints more
        evs = await run_phase(site, "battery", "ratings_change", cleared=cleared,
                              hold_until=lambda: bool(site.setpoints) and site.setpoints[-1][0]
                              > _rating_ts(site, t_inject) + 20.0)
        assert has(evs, "device", "battery", "ratings"), evs
        assert_setpoints_within_ratings(site, 1000.0)
        # from the new rating's reading until the fault ends, no setpoint beyond it
        t_new = _rating_ts(site, t_inject)
        late = [b for t, b, _ in site.setpoints[n:] if b is not None
                and t_new < t < cleared[0]]
        assert late and max(abs(b) for b in late) <= 500.0 + 1e-6, late
        await finish_and_check_rows(site)
