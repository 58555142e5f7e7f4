"""``hems demo --homes 3``: three gateways (PV + battery, PV only, neither) in worker processes,
each on its own simulated devices over Modbus TCP, the market operator, the DSO and a local
Mosquitto, for 75 simulated minutes around noon, with the market and again without it.

The report is checked against the ledger the operator wrote and against itself: awards balance,
every awarded interval is settled, the bills follow from awards and metered energy, and the home
that cannot control anything (no PV, no battery) costs the same in both runs and in ``fit_only``
(its physics do not depend on control: an independent check of the accounting)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="needs mosquitto")
def test_community_demo_trades_settles_and_accounts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--homes", "3", "--hours", "1.25",
         "--start", "2026-06-21T10:45:00Z", "--speed", "150", "--workers", "2",
         "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["errors"] == [], r["errors"]
    assert r["kinds"] == {"pv+battery": 1, "pv": 1, "none": 1}

    # The market traded, and the report agrees with the operator's ledger.
    m = r["market"]
    assert m["traded_kwh"] > 0 and m["trades"] > 0 and m["bids"] >= m["intervals_traded"]
    assert r["tariff"]["feed_in"] <= m["avg_price"] <= r["tariff"]["retail"]
    # what the meters missed of the awards: at most everything sold and bought
    assert 0.0 <= m["award_shortfall_kwh"] <= 2.0 * m["traded_kwh"] + 1e-9
    end = datetime(2026, 6, 21, 12, 0, tzinfo=UTC).timestamp()  # start + 1.25 h
    db = sqlite3.connect(out / "community" / "market.db")
    try:
        # The operator also clears auctions whose delivery starts after the day: not counted.
        day = "SELECT interval_id FROM auctions WHERE delivery_start < ?"
        vol = db.execute(f"SELECT SUM(volume_wh) FROM results WHERE interval_id IN ({day})",
                         (end,)).fetchone()[0]
        awards = db.execute(f"SELECT interval_id, site, net_wh FROM awards WHERE interval_id "
                            f"IN ({day})", (end,)).fetchall()
        settled = {(i, s) for i, s in db.execute(
            "SELECT interval_id, site FROM settlements").fetchall()}
        last = db.execute(f"SELECT MAX(interval_id) FROM ({day})", (end,)).fetchone()[0]
    finally:
        db.close()
    assert vol / 1000.0 == pytest.approx(m["traded_kwh"], abs=1e-3)
    by_interval: dict[str, int] = {}
    for iv, _site, net in awards:
        by_interval[iv] = by_interval.get(iv, 0) + net
    assert all(v == 0 for v in by_interval.values())  # bought = sold in every interval
    # Every award was settled from a meter reading (bar the day's last interval, whose meter
    # report is due after the gateways stop).
    unsettled = {(iv, s) for iv, s, net in awards if net and iv != last} - settled
    assert not unsettled, unsettled

    bills = {b["site"]: b for b in r["bills"]}
    sold = sum(b["sold_kwh"] for b in bills.values())
    bought = sum(b["bought_kwh"] for b in bills.values())
    assert sold == pytest.approx(bought, abs=2e-3) and sold == pytest.approx(
        m["traded_kwh"], abs=3e-3)
    # The seller is a PV home, the buyer the home without PV.
    assert bills["home-02"]["kind"] == "none" and bills["home-02"]["bought_kwh"] > 0
    assert bills["home-02"]["sold_kwh"] == 0

    # Accounting cross-check: a home without PV or battery cannot be controlled, so its two runs
    # and the fit_only arithmetic see the same energy (minute samples: a few Wh of difference).
    none = bills["home-02"]
    assert none["no_p2p"] == pytest.approx(none["fit_only"], abs=0.01)
    assert none["community"] < none["no_p2p"]  # it bought below the retail price
    c = r["costs"]
    assert c["community"] == pytest.approx(sum(b["community"] for b in bills.values()), abs=2e-3)
    assert c["community"] < c["no_p2p"]

    # Both days ran their gateways to the end with nothing lost.
    g = r["gateways"]
    assert g["cycles"] > 0 and g["telemetry_lost"] == 0 and g["task_restarts"] == 0
    assert g["plans"] > 0 and g["awards"] > 0
    assert r["envelope"]["homes"] == 3 and r["envelope_no_p2p"]["homes"] == 3
    if r["picture"]:
        assert Path(r["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.json").exists()
