"""The SQLite store: migrations, batches, sequence numbers, retention, and bad databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.store import (
    SCHEMA_VERSION,
    Aggregator,
    Batch,
    Counters,
    Event,
    OutboxRow,
    Store,
    StoreError,
    counter_deltas,
    integrity_check,
)


def rows(first: int, n: int, ts0: float = 1000.0) -> Batch:
    b = Batch()
    for s in range(first, first + n):
        b.telemetry.append({"seq": s, "ts": ts0 + s, "mode": "auto", "site_w": float(s)})
        b.outbox.append(OutboxRow(s, "hems/v1/x/telemetry", b'{"seq":%d}' % s, 1, ts0 + s))
    return b


def test_migrates_to_current_version_and_uses_wal(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "g.db")
    assert s.schema_version == SCHEMA_VERSION
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(s.db.table_names()) >= {"telemetry", "outbox", "events", "kv"}
    s.close()
    s = Store.open(tmp_path / "g.db")  # re-open: no migration runs twice
    assert s.schema_version == SCHEMA_VERSION
    s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    Store.open(p).close()
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(StoreError, match="newer than this hems supports"):
        Store.open(p)


def test_batch_is_one_transaction_and_sequence_survives_reopen(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    s = Store.open(p)
    b = rows(1, 5)
    b.events.append(Event(1.0, "info", "start", "hello", {"a": 1}))
    s.write(b)
    assert s.commits == 1
    assert s.last_seq() == 5 and s.backlog() == 5
    assert [r.seq for r in s.unpublished(2, 2)] == [3, 4]
    s.write(Batch(published_seq=3))
    assert s.backlog() == 2 and s.published_seq() == 3
    # Retention deletes published outbox rows; the sequence high-water mark stays.
    s.write(Batch(published_seq=5))
    out = s.retention(now=1e9, telemetry_days=1e6, event_days=1e6, outbox_days=0.0001,
                      outbox_max_rows=100)
    assert out["outbox"] == 5 and s.counts()["outbox"] == 0
    s.close()
    s = Store.open(p)
    assert s.last_seq() == 5 and s.published_seq() == 5
    assert [r["seq"] for r in s.telemetry()] == [1, 2, 3, 4, 5]
    s.close()


def test_outbox_cap_drops_oldest_unpublished_and_counts_them(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "g.db")
    s.write(rows(1, 150))
    out = s.retention(now=2000.0, telemetry_days=1, event_days=1, outbox_days=1,
                      outbox_max_rows=100)
    assert out["lost"] == 50
    assert [r.seq for r in s.unpublished(0, 1)] == [51]
    assert s.kv_get("lost_total") == "50"
    assert len(s.telemetry()) == 150  # the history itself is kept
    s.close()


def test_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    p.write_bytes(b"this is not a database" * 300)
    with pytest.raises(StoreError, match="corrupt or not an SQLite file"):
        Store.open(p)


def test_damaged_pages_are_detected(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    s = Store.open(p)
    s.write(rows(1, 2000))
    s.close()
    data = bytearray(p.read_bytes())
    for i in range(8192, min(len(data), 8192 + 4096 * 3)):  # scribble over pages 3-5
        data[i] = 0xA5
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"corrupt|malformed"):
        Store.open(p)


def test_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    Store.open(p).close()
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            Store.open(p, busy_timeout_s=0.2)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_missing_directory_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "nope" / "g.db")


def test_full_disk_error_keeps_what_was_stored(tmp_path: Path) -> None:
    p = tmp_path / "g.db"
    s = Store.open(p)
    s.write(rows(1, 10))
    pages = s.db.execute("PRAGMA page_count").fetchone()[0]
    s.db.execute(f"PRAGMA max_page_count={pages + 2}")  # the disk is (nearly) full
    with pytest.raises(StoreError, match="disk full"):
        big = rows(11, 3000)
        s.write(big)
    assert s.last_seq() == 10 and len(s.telemetry()) == 10  # the failed batch left no trace
    s.close()
    assert integrity_check(p) == "ok"
    s = Store.open(p)
    assert [r["seq"] for r in s.telemetry()] == list(range(1, 11))
    s.write(rows(11, 3000))  # space again: the same batch goes in
    assert s.last_seq() == 3010
    s.close()


def test_aggregator_means_extremes_and_energy() -> None:
    agg = Aggregator(60.0)
    recs = []
    for i in range(121):  # two full minutes at 1 s, +1000 W import then -500 W export
        site = 1000.0 if i < 60 else -500.0
        r = agg.add(60.0 * 16667 + i, site, 200.0, -100.0, 50.0, 0, "auto")
        if r:
            recs.append(r)
    assert len(recs) == 2
    a, b = recs
    assert (a["start"], a["ts"], b["start"]) == (60.0 * 16667, 60.0 * 16668, 60.0 * 16668)
    assert a["samples"] == 60 and a["site_w"] == 1000.0 and a["site_w_max"] == 1000.0
    assert a["load_w"] == pytest.approx(1000 + 200 + 100)
    # 59 steps of 1 s at 1000 W inside the first window (the first sample has no predecessor)
    assert a["import_wh"] == pytest.approx(59 * 1000 / 3600, abs=1e-3)
    assert b["export_wh"] == pytest.approx(59 * 500 / 3600, abs=1e-3)
    assert b["import_wh"] == pytest.approx((1000 - 500) / 2 / 3600, abs=1e-3)  # crossing step
    assert agg.totals_wh["pv"] == pytest.approx(120 * 200 / 3600)


def test_aggregator_does_not_invent_energy_over_gaps() -> None:
    agg = Aggregator(60.0, max_gap_s=300.0)
    agg.add(0.0, 1000.0, None, None, None, 0, "auto")
    agg.add(3600.0, 1000.0, None, None, None, 0, "auto")  # an hour's gap: no energy
    assert agg.totals_wh["import"] == 0.0


def test_a_stalled_loop_is_bridged_by_the_devices_energy_counters() -> None:
    agg = Aggregator(60.0, max_gap_s=300.0)
    c0 = Counters(import_wh=1000.0, export_wh=50.0, pv_wh=20_000.0, stored_wh=5000.0)
    agg.add(0.0, 1000.0, 2000.0, 500.0, 50.0, 0, "auto", c0)
    # 20 minutes unobserved: the meter counted 300 Wh in and 10 out, the inverter 700 Wh,
    # the battery stored 100 Wh more; the powers at both ends say nothing about the gap
    c1 = Counters(import_wh=1300.0, export_wh=60.0, pv_wh=20_700.0, stored_wh=5100.0)
    agg.add(1200.0, 1000.0, 2000.0, 500.0, 50.0, 0, "auto", c1)
    t = agg.totals_wh
    assert (t["import"], t["export"], t["pv"]) == (300.0, 10.0, 700.0)
    assert (t["charge"], t["discharge"]) == (100.0, 0.0)
    assert t["load"] == pytest.approx(300 - 10 + 700 - 100)  # the energy balance
    assert agg.open_wh == {"import": 300.0, "export": 10.0, "pv": 700.0}


def test_counter_resets_garbage_and_unread_devices_bridge_nothing_for_their_key() -> None:
    a = Counters(import_wh=1000.0, export_wh=50.0, pv_wh=20_000.0, stored_wh=5000.0)
    # the meter was replaced (import went back), the inverter's counter jumped 1 GWh
    b = Counters(import_wh=10.0, export_wh=60.0, pv_wh=1e9, stored_wh=4000.0)
    d = counter_deltas(a, b, 600.0)
    assert d == {"export": 10.0, "charge": 0.0, "discharge": 1000.0}  # no load without import
    # an unread battery (None) is unknown, an absent one (0.0 both ends) stands still
    d = counter_deltas(Counters(0.0, 0.0, 0.0, None), Counters(5.0, 1.0, 0.0, 0.0), 600.0)
    assert "load" not in d and "charge" not in d
    d = counter_deltas(Counters(0.0, 0.0, 0.0, 0.0), Counters(5.0, 1.0, 0.0, 0.0), 600.0)
    assert d["load"] == 4.0 and d["charge"] == d["discharge"] == 0.0
    # non-finite registers are garbage too
    assert counter_deltas(Counters(0.0, 0.0), Counters(float("nan"), float("inf")), 60.0) == {}


def test_without_counters_a_gap_still_invents_nothing() -> None:
    agg = Aggregator(60.0, max_gap_s=300.0)
    agg.add(0.0, 1000.0, 500.0, None, None, 0, "auto", Counters(import_wh=0.0))
    agg.add(3600.0, 1000.0, 500.0, None, None, 0, "auto", None)
    assert all(v == 0.0 for v in agg.totals_wh.values())



def test_market_upsert_inserts_then_updates_only_the_given_columns(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "g.db")
    key = {"community": "c1", "interval_id": "i1"}
    s.market_upsert({**key, "delivery_start": 0.0, "delivery_end": 900.0, "bid_id": "b1",
                     "bid_seq": 1})
    s.market_upsert({**key, "award_export_kwh": 0.25, "bid_seq": 2})
    s.market_upsert({**key})  # nothing to update: the row stays as it is
    s.market_upsert({"community": "c1", "interval_id": "i2", "delivery_start": 900.0,
                     "delivery_end": 1800.0})
    got = s.market_rows()
    assert [r["interval_id"] for r in got] == ["i1", "i2"]
    assert (got[0]["bid_id"], got[0]["bid_seq"], got[0]["award_export_kwh"]) == ("b1", 2, 0.25)
    with pytest.raises(ValueError, match="unknown column"):
        s.market_upsert({**key, "price; DROP TABLE market": 1})
    with pytest.raises(ValueError, match="needs community and interval_id"):
        s.market_upsert({"community": "c1", "bid_seq": 3})
    assert len(s.market_rows()) == 2
    s.close()


def test_write_groups_rows_by_columns_and_refuses_unknown_ones_atomically(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "g.db")
    b = rows(1, 2)
    b.telemetry[1]["exceed_s"] = 3.5  # another column set in the same batch
    b.events.append(Event(1.0, "info", "start", "hello", {"a": 1}))
    b.kv["k"] = "v1"
    s.write(b)
    got = list(s.db.query("SELECT seq, site_w, exceed_s FROM telemetry ORDER BY seq"))
    assert got == [{"seq": 1, "site_w": 1.0, "exceed_s": None},
                   {"seq": 2, "site_w": 2.0, "exceed_s": 3.5}]
    assert s.kv_get("k") == "v1"
    assert s.events()[0]["data"] == '{"a": 1}'
    bad = rows(3, 1)
    bad.telemetry[0]["site_w; DROP TABLE telemetry"] = 1.0
    bad.kv["k"] = "v2"
    with pytest.raises(StoreError, match="unknown column"):
        s.write(bad)
    assert s.kv_get("k") == "v1"  # nothing of the refused batch was written
    assert s.counts()["outbox"] == 2
    s.close()
