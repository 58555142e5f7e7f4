"""Fail-safe behaviour end to end: a SIGKILLed gateway is caught by the devices' own revert
timers; a lost broker moves the limits from the held control to the DSO default to the safe
fallback at the documented times, and contact returning ramps them up at 16 %/min."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon.daemon_helpers import START, profiles, wait_until

from community.dso import DsoPublisher, SiteSchedule
from drivers.clock import SimClock
from firmware_sim.home import HomeConfig
from firmware_sim.server import run_home
from gateway.config import parse_config
from gateway.daemon import Gateway, run_gateway
from gateway.envelope import Control, DefaultControl
from gateway.signing import public_key_to_b64

ROOT = Path(__file__).resolve().parents[2]
SITE = "home-1"


def _schedule(now: float, default_w: float, control_w: float | None = None,
              duration_s: float = 3600.0) -> SiteSchedule:
    d = DefaultControl(id="def", site=SITE, created=now - 100, export_w=default_w)
    cs: tuple[Control, ...] = ()
    if control_w is not None:
        cs = (Control(id="ctl", site=SITE, created=now - 50, start=now - 10,
                      duration_s=duration_s, export_w=control_w),)
    return SiteSchedule(SITE, d, cs)


async def test_sigkill_gateway_devices_revert_on_their_own(mosquitto: Any, tmp_path: Path
                                                          ) -> None:
    speed, revert = 10.0, 30.0
    epoch = time.time()
    clock = SimClock(START, speed, epoch=epoch)
    key = Ed25519PrivateKey.generate()
    load, pv = profiles()
    stop = asyncio.Event()
    async with run_home(clock, HomeConfig(soc0_pct=100.0), load=load, pv=pv) as sim:
        pub = DsoPublisher(mosquitto.url, key, clock, [_schedule(START, 3000.0, 800.0)],
                           identifier="dso-kill")
        pub_task = asyncio.create_task(pub.run(stop))
        devices = "\n".join(f'[[devices]]\nkind = "{e.kind}"\nhost = "{e.host}"\n'
                            f'port = {e.port}\nunit = {e.unit}\n' for e in sim.endpoints)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f"""site_id = "{SITE}"
{devices}
[broker]
url = "{mosquitto.url}"
keepalive_s = 5
[control]
cycle_s = 1.0
revert_s = {revert}
startup_grace_s = 1
[store]
path = "{tmp_path / 'g.db'}"
commit_interval_s = 5
[envelope]
dso_public_key = "{public_key_to_b64(key.public_key())}"
""")
        code = ("import sys; from drivers.clock import SimClock; from gateway.daemon import "
                "main_run; sys.exit(main_run(sys.argv[1], clock=SimClock(float(sys.argv[2]), "
                "float(sys.argv[3]), epoch=float(sys.argv[4]))))")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, str(cfg), str(START), str(speed), str(epoch), cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        phys = sim.physics
        try:
            def held() -> bool:
                phys.advance()
                return (phys.inverter.enabled and phys.inverter.pct < 60.0
                        and phys.storage.mode == 3)

            await wait_until(held, 30, "the gateway to curtail PV and hold the battery")
            # run past several re-sends, then kill without any chance to clean up
            t_held = clock.now()
            await clock.sleep_until(t_held + 2 * revert)
            assert held()
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
            t_kill = clock.now()
            phys.advance()
            inv_dl, bat_dl = phys.inverter.deadline, phys.storage.deadline
            # the timers were being re-sent: both deadlines still ahead, at most revert_s away
            assert inv_dl is not None and t_kill < inv_dl <= t_kill + revert
            assert bat_dl is not None and t_kill < bat_dl <= t_kill + revert
            assert phys.limit_pct_at(t_kill) < 60.0
            await clock.sleep_until(max(inv_dl, bat_dl) + HomeConfig().inverter_ramp_s + 1.0)
            st = phys.state()
            assert not phys.inverter.enabled and st.limit_pct == 100.0  # inverter back to 100 %
            assert phys.storage.mode == 0  # battery back to its own self-consumption mode
            assert st.pv_w > 0 and st.pv_w == min(st.pv_avail_w, phys.inverter.wmax_w)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stop.set()
            await pub_task


async def test_contact_loss_control_then_default_then_fallback_then_ramp(
        mosquitto: Any, tmp_path: Path) -> None:
    speed, timeout_s, ctl_s = 60.0, 120.0, 60.0
    clock = SimClock(START, speed)
    key = Ed25519PrivateKey.generate()
    load, pv = profiles()
    stop = asyncio.Event()
    gws: list[Gateway] = []
    async with run_home(clock, HomeConfig(), load=load, pv=pv) as sim:
        pub = DsoPublisher(mosquitto.url, key, clock, [_schedule(START, 3000.0)],
                           identifier="dso-contact")
        pub_task = asyncio.create_task(pub.run(stop))
        cfg = parse_config({
            "site_id": SITE,
            "devices": [{"kind": e.kind, "name": e.kind, "host": e.host, "port": e.port,
                         "unit": e.unit} for e in sim.endpoints],
            "broker": {"url": mosquitto.url, "keepalive_s": 5, "connect_timeout_s": 2.0},
            "store": {"path": str(tmp_path / "g.db"), "commit_interval_s": 10.0},
            "control": {"cycle_s": 1.0, "revert_s": 30.0, "startup_grace_s": 1.0},
            "envelope": {"dso_public_key": public_key_to_b64(key.public_key()),
                         "fallback_export_w": 2000.0, "contact_timeout_s": timeout_s},
        })
        gw_stop = asyncio.Event()
        gw_task = asyncio.create_task(run_gateway(cfg, clock, stop=gw_stop,
                                                  on_ready=gws.append))
        await wait_until(lambda: bool(gws) and gws[0].envelope is not None
                         and gws[0].envelope.stats.accepted >= 1, 20, "the default")
        agent = gws[0].envelope
        assert agent is not None
        t_c = clock.now()
        pub.add_control(Control(id="ctl", site=SITE, created=t_c, start=t_c,
                                duration_s=ctl_s, export_w=1200.0))
        await wait_until(lambda: agent.stats.accepted >= 2, 20, "the control")
        await wait_until(lambda: agent.target is not None and agent.target.source == "control",
                         20, "the control in force")
        stop.set()
        await pub_task
        mosquitto.stop()
        t_stop = clock.now()
        await clock.sleep_until(t_stop + timeout_s + 30.0)
        assert agent.target is not None and agent.target.source == "fallback"
        assert agent.target.contact_lost and agent.active is not None
        assert agent.active.limits.export_w == 2000.0
        # contact returns: the limit loosens 2000 -> 3000 W at most 16 %/min of the rating
        mosquitto.start()
        effs: list[tuple[float, float]] = []

        def sample() -> bool:
            # the agent's own resolution time, not the test's: the poll may see a value late
            a, at = agent.active, agent.active_at
            assert a is not None and a.limits.export_w is not None and at is not None
            if not effs or effs[-1][0] != at:
                effs.append((at, a.limits.export_w))
            return a.limits.export_w >= 3000.0

        await wait_until(sample, 30, "the ramp to the default")
        gw_stop.set()
        stats = await asyncio.wait_for(gw_task, 20)
    rating = 5000.0 + 5000.0  # inverter + battery discharge of HomeConfig()
    rate = rating * 0.16 / 60.0
    for (t1, e1), (t2, e2) in itertools.pairwise(effs):
        assert e2 - e1 <= rate * (t2 - t1) + rate * 1.5, (t1, e1, t2, e2)  # 1 cycle of slack
    assert effs[-1][1] - effs[0][1] >= 900.0 and effs[-1][0] - effs[0][0] >= 900.0 / rate - 2
    conn = sqlite3.connect(tmp_path / "g.db")
    evs = [(ts, json.loads(d)) for ts, d in conn.execute(
        "SELECT ts, data FROM events WHERE kind = 'envelope_limits' ORDER BY id")]
    conn.close()
    seq = [(ts, d["source"], d["limits"]["export_w"]) for ts, d in evs]
    seq = seq[[s for _, s, _ in seq].index("control"):]
    srcs = [s for _, s, _ in seq]
    i_def = srcs.index("default")
    i_fb = srcs.index("fallback")
    assert srcs[0] == "control" and seq[0][2] == 1200.0
    assert i_def < i_fb and seq[i_def][2] == 3000.0 and seq[i_fb][2] == 2000.0
    # at the documented times: the default when the control ends, the fallback after
    # contact_timeout_s without the broker (cycle 1 s; a few s of slack for scheduling)
    assert t_c + ctl_s <= seq[i_def][0] <= t_c + ctl_s + 5.0
    assert t_stop - 5.0 + timeout_s <= seq[i_fb][0] <= t_stop + timeout_s + 10.0
    assert seq[-1][1] == "default"  # contact back
    assert stats.envelope["accepted"] >= 2
