"""The gateway's one SQLite file (WAL): telemetry, the MQTT outbox, events, key/values.

Why aggregated telemetry: the fast loop reads every second, but one row per second is ~31 M rows
and several GB a year of random page writes on an SD card. The gateway keeps one row per
``telemetry_interval_s`` (default 60 s) with mean/min/max power, the last SoC and the energy of
the interval (Wh, integrated from the per-cycle readings), which is what the forecaster and the
dashboards use. A 60x reduction in rows, with the peaks still visible in min/max.

Why batched commits: every commit appends pages to the WAL; with ``synchronous=NORMAL`` in WAL
mode a commit does not fsync (only checkpoints do), survives a process crash (SIGKILL), and can
lose at most the last commits on a power cut. The daemon commits once per ``commit_interval_s``
(default 60 s) — so ~60 small transactions an hour. See ``bench/daemon.py`` for measured writes.

Store-and-forward: each telemetry record is written, in the same transaction, to ``telemetry``
and to ``outbox`` with the same sequence number. The publisher sends outbox rows with
``seq > published_seq`` in order and advances ``published_seq`` (a key/value, written with the next
batch: at-least-once delivery; consumers de-duplicate by ``seq``). Sequence numbers never go
back: the high-water mark is persisted with every batch.

Schema migrations are versioned with ``PRAGMA user_version``; each runs in its own transaction.

All methods are synchronous and must be called from one thread (the daemon runs them on a
single-worker executor so a slow SD card never stalls the control loop).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _import_sqlite_utils() -> Any:
    """Import sqlite-utils without letting it pull in pandas.

    sqlite-utils imports pandas (and with it pyarrow) at import time, if installed, only to
    recognise pandas value types; the gateway never stores pandas objects. Where pandas happens
    to be installed that costs ~100 MB of RSS on a Pi, so hide it for the duration of the import
    (unless something already imported it). Nothing else is affected: pandas imports normally
    afterwards.
    """
    import sys

    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils as su

        return su
    sys.modules["pandas"] = None  # type: ignore[assignment]  # makes `import pandas` fail
    try:
        import sqlite_utils as su
    finally:
        del sys.modules["pandas"]
    return su


if TYPE_CHECKING:
    import sqlite_utils
else:
    sqlite_utils = _import_sqlite_utils()

log = logging.getLogger(__name__)

TELEMETRY_COLUMNS: dict[str, type] = {
    "seq": int, "ts": float, "start": float, "interval_s": float, "samples": int,
    "errors": int, "mode": str, "site_w": float, "site_w_min": float, "site_w_max": float,
    "pv_w": float, "pv_w_max": float, "battery_w": float, "load_w": float, "soc_pct": float,
    "import_wh": float, "export_wh": float, "pv_wh": float,
}


class StoreError(Exception):
    """The database cannot be used. The message names the file and the problem."""


@dataclass(frozen=True)
class OutboxRow:
    """One stored message waiting for (or past) publication."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    created_ts: float


@dataclass(frozen=True)
class Event:
    """Something worth keeping: start/stop, commands, broker and device state changes."""

    ts: float
    level: str
    kind: str
    message: str
    data: dict[str, Any] | None = None


@dataclass
class Batch:
    """Everything one commit writes."""

    telemetry: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    kv: dict[str, str] = field(default_factory=dict)
    published_seq: int | None = None

    def __bool__(self) -> bool:
        return bool(self.telemetry or self.outbox or self.events or self.kv
                    or self.published_seq is not None)


def _m1_initial(db: sqlite_utils.Database) -> None:
    db["telemetry"].create(TELEMETRY_COLUMNS, pk="seq", not_null={"ts"})  # type: ignore[union-attr]
    db["telemetry"].create_index(["ts"])  # type: ignore[union-attr]
    db["outbox"].create({"seq": int, "topic": str, "payload": bytes, "qos": int,  # type: ignore[union-attr]
                         "created_ts": float}, pk="seq", not_null={"topic", "payload"})
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
               "level TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT)")
    db["events"].create_index(["ts"])  # type: ignore[union-attr]
    db["kv"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]


#: Compliance with the DSO envelope per telemetry window (gateway.envelope_agent): the tightest
#: export/import limits asked for, the largest measured exceedance (W), seconds above tolerance.
ENVELOPE_COLUMNS: dict[str, type] = {"limit_export_w": float, "limit_import_w": float,
                                     "exceed_w_max": float, "exceed_s": float}


_TELEMETRY_NAMES = frozenset(TELEMETRY_COLUMNS) | frozenset(ENVELOPE_COLUMNS)


def _m2_envelope(db: sqlite_utils.Database) -> None:
    for name in ENVELOPE_COLUMNS:
        db.execute(f"ALTER TABLE telemetry ADD COLUMN {name} REAL")


#: The market agent's ledger (gateway.market_agent): one row per community and delivery
#: interval: the bid sent and the operator's answer, the award (site's side: + sold), the metered
#: net export reported, and the operator's statement (or a provisional total computed locally).
MARKET_COLUMNS: dict[str, type] = {
    "community": str, "interval_id": str, "site": str, "delivery_start": float,
    "delivery_end": float, "gate_closure": float, "price_floor": float, "price_cap": float,
    "bid_id": str, "bid_seq": int, "bid": str, "bid_code": str, "award_export_kwh": float,
    "award_price": float, "award_amount": float, "metered_export_kwh": float,
    "meter_code": str, "settlement": str, "total": float, "deviation_kwh": float,
    "deviation_amount": float, "provisional": int, "updated_ts": float,
}


def _m3_market(db: sqlite_utils.Database) -> None:
    db["market"].create(MARKET_COLUMNS, pk=("community", "interval_id"),  # type: ignore[union-attr]
                        not_null={"delivery_start", "delivery_end"})
    db["market"].create_index(["delivery_start"])  # type: ignore[union-attr]


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (_m1_initial, _m2_envelope,
                                                                  _m3_market)
SCHEMA_VERSION = len(MIGRATIONS)


def _friendly(path: str, e: sqlite3.Error) -> str:
    msg = str(e)
    if "locked" in msg or "busy" in msg:
        return f"database {path!r} is locked by another process (is a second gateway running?)"
    if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
        return (f"database {path!r} is corrupt or not an SQLite file ({msg}); move it aside "
                f"to start a new one, or repair it with sqlite3 '.recover'")
    if "full" in msg:
        return f"disk full: cannot write database {path!r} ({msg})"
    if "readonly" in msg or "unable to open" in msg:
        return f"cannot open database {path!r} for writing ({msg}); check the directory exists " \
               f"and is writable"
    return f"database {path!r}: {msg}"


class Store:
    """One SQLite file. Open with :meth:`open`; use from a single thread."""

    def __init__(self, db: sqlite_utils.Database, path: str) -> None:
        self.db = db
        self.path = path
        self.commits = 0
        self.rows_written = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str], busy_timeout_s: float = 5.0,
             check: bool = True) -> Store:
        """Open (creating if needed), migrate and check. Raises :class:`StoreError`."""
        p = str(path)
        if p != ":memory:":
            parent = Path(p).parent
            if not parent.is_dir():
                raise StoreError(f"cannot open database {p!r}: directory {str(parent)!r} "
                                 f"does not exist")
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(p, timeout=busy_timeout_s, check_same_thread=False)
            db = sqlite_utils.Database(conn)
            # Reading the header (journal_mode) is where a non-database file is detected.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if p != ":memory:" and str(mode).lower() != "wal":
                raise StoreError(f"database {p!r}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            if check:
                res = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if res != "ok":
                    raise StoreError(f"database {p!r} is corrupt (quick_check: {res}); move it "
                                     f"aside to start a new one")
            store = cls(db, p)
            store._migrate()
            return store
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise StoreError(_friendly(p, e)) from e
        except StoreError:
            if conn is not None:
                conn.close()
            raise

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"database {self.path!r} has schema version {version}, newer than "
                             f"this hems supports ({SCHEMA_VERSION}); upgrade hems")
        for v in range(version, SCHEMA_VERSION):
            with self.db.atomic():
                MIGRATIONS[v](self.db)
                # user_version is transactional: the migration and its number commit together.
                self.db.execute(f"PRAGMA user_version={v + 1}")
            log.info("store %s: migrated schema to version %d", self.path, v + 1)

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        try:
            # A clean close checkpoints the WAL into the main file (one fsync).
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("store %s: checkpoint at close failed: %s", self.path, e)
        self.db.close()

    # ---------------------------------------------------------------- key/values and sequence

    def kv_get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        return None if row is None else str(row[0])

    def kv_json(self, key: str) -> Any:
        v = self.kv_get(key)
        if v is None:
            return None
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            log.warning("store %s: kv %r is not JSON; ignored", self.path, key)
            return None

    def last_seq(self) -> int:
        """Highest sequence number ever committed (0 if none)."""
        hwm = int(self.kv_get("seq_hwm") or 0)
        row = self.db.execute("SELECT max(seq) FROM outbox").fetchone()
        return max(hwm, int(row[0] or 0))

    def published_seq(self) -> int:
        return int(self.kv_get("published_seq") or 0)

    def backlog(self) -> int:
        row = self.db.execute("SELECT count(*) FROM outbox WHERE seq > ?",
                              [self.published_seq()]).fetchone()
        return int(row[0])

    # ---------------------------------------------------------------- writes

    def write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction. Raises :class:`StoreError` (nothing written)."""
        if not batch:
            return
        try:
            with self.db.atomic():
                n = 0
                if batch.telemetry:
                    n += self._insert("telemetry", batch.telemetry, _TELEMETRY_NAMES)
                if batch.outbox:
                    self.db.conn.executemany(
                        "INSERT INTO outbox (seq, topic, payload, qos, created_ts) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [(r.seq, r.topic, r.payload, r.qos, r.created_ts) for r in batch.outbox])
                    n += len(batch.outbox)
                    batch.kv["seq_hwm"] = str(max(max(r.seq for r in batch.outbox),
                                                  int(self.kv_get("seq_hwm") or 0)))
                if batch.events:
                    self.db.conn.executemany(
                        "INSERT INTO events (ts, level, kind, message, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [(e.ts, e.level, e.kind, e.message,
                          None if e.data is None else json.dumps(e.data)) for e in batch.events])
                    n += len(batch.events)
                if batch.published_seq is not None:
                    batch.kv["published_seq"] = str(max(batch.published_seq,
                                                        self.published_seq()))
                if batch.kv:
                    self.db.conn.executemany(
                        "INSERT INTO kv (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        list(batch.kv.items()))
                    n += len(batch.kv)
        except sqlite3.Error as e:
            raise StoreError(_friendly(self.path, e)) from e
        self.commits += 1
        self.rows_written += n

    def _insert(self, table: str, rows: list[dict[str, Any]], allowed: frozenset[str]) -> int:
        """Insert dict rows with plain SQL, grouped by their columns (sqlite-utils' insert_all
        re-reads the table's schema on every call: most of a small commit's CPU). Column names
        are checked against ``allowed`` (they become SQL identifiers)."""
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for r in rows:
            cols = tuple(r)
            groups.setdefault(cols, []).append(tuple(r[c] for c in cols))
        for cols, values in groups.items():
            bad = set(cols) - allowed
            if bad:  # a programming error; nothing of the batch is written (rolled back)
                raise StoreError(f"{self.path}: {table} row with unknown column(s) {sorted(bad)}")
            self.db.conn.executemany(f"INSERT INTO {table} ({', '.join(cols)}) "
                                f"VALUES ({', '.join('?' * len(cols))})", values)
        return len(rows)

    def retention(self, now: float, telemetry_days: float, event_days: float,
                  outbox_days: float, outbox_max_rows: int) -> dict[str, int]:
        """Delete what is past retention; drop the oldest unpublished rows beyond the cap.

        Returns the number of rows deleted per table, and ``lost``: unpublished outbox rows
        dropped because the backlog exceeded ``outbox_max_rows`` (they stay in ``telemetry``).
        """
        out: dict[str, int] = {}
        try:
            with self.db.atomic():
                c = self.db.execute("DELETE FROM telemetry WHERE ts < ?",
                                    [now - telemetry_days * 86400])
                out["telemetry"] = c.rowcount
                c = self.db.execute("DELETE FROM events WHERE ts < ?", [now - event_days * 86400])
                out["events"] = c.rowcount
                pub = self.published_seq()
                c = self.db.execute("DELETE FROM outbox WHERE seq <= ? AND created_ts < ?",
                                    [pub, now - outbox_days * 86400])
                out["outbox"] = c.rowcount
                backlog = self.backlog()
                lost = 0
                if backlog > outbox_max_rows:
                    lost = backlog - outbox_max_rows
                    c = self.db.execute(
                        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq > ? "
                        "ORDER BY seq LIMIT ?)", [pub, lost])
                    total = int(self.kv_get("lost_total") or 0) + lost
                    self.db["kv"].upsert({"key": "lost_total", "value": str(total)},  # type: ignore[union-attr]
                                         pk="key")
                out["lost"] = lost
        except sqlite3.Error as e:
            raise StoreError(_friendly(self.path, e)) from e
        self.commits += 1
        return out

    # ---------------------------------------------------------------- reads

    def unpublished(self, after_seq: int, limit: int = 100) -> list[OutboxRow]:
        """Outbox rows with ``seq > after_seq``, oldest first."""
        rows = self.db.execute(
            "SELECT seq, topic, payload, qos, created_ts FROM outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?", [after_seq, limit]).fetchall()
        return [OutboxRow(int(s), str(t), bytes(p), int(q), float(c)) for s, t, p, q, c in rows]

    def telemetry(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Telemetry rows with ``ts >= since``, oldest first (for the forecaster and tests)."""
        return list(self.db.query("SELECT * FROM telemetry WHERE ts >= ? ORDER BY seq",
                                  [since]))

    def power_history(self, since: float, after_seq: int = 0
                      ) -> tuple[int, list[tuple[float, float | None, float | None]]]:
        """Mean load and PV power per telemetry window, for the forecasters.

        Returns ``(max_seq, rows)`` with rows ``(mid_time, load_w, pv_w)`` (``None`` where a
        device was not read) of windows ending at or after ``since`` with ``seq > after_seq``,
        oldest first; ``max_seq`` is ``after_seq`` when there is nothing new, so a caller can
        read only what was added since its last call.
        """
        rows = self.db.execute(
            "SELECT seq, start + interval_s / 2, load_w, pv_w FROM telemetry "
            "WHERE seq > ? AND ts >= ? ORDER BY seq", [after_seq, since]).fetchall()
        top = int(rows[-1][0]) if rows else after_seq
        return top, [(float(t), ld, pv) for _, t, ld, pv in rows]

    def market_upsert(self, row: dict[str, Any]) -> None:
        """Write one ``market`` row (keyed by community and interval), in its own transaction.
        Raises :class:`StoreError`."""
        unknown = set(row) - set(MARKET_COLUMNS)
        if unknown:
            raise ValueError(f"market row: unknown column(s) {sorted(unknown)}")
        if "community" not in row or "interval_id" not in row:
            raise ValueError("market row: needs community and interval_id")
        # Plain SQL: sqlite-utils' upsert reads the table's schema on every call (a third of
        # this write's CPU), and the columns are known (MARKET_COLUMNS, checked above). Update
        # first, insert if there was no row (an INSERT .. ON CONFLICT would check NOT NULL
        # columns that a partial update of an existing row does not carry).
        cols = list(row)
        update = [c for c in cols if c not in ("community", "interval_id")]
        key = [row["community"], row["interval_id"]]
        try:
            with self.db.atomic():
                found = self.db.execute(
                    "SELECT 1 FROM market WHERE community = ? AND interval_id = ?", key
                ).fetchone()
                if found is None:
                    self._insert("market", [row], frozenset(MARKET_COLUMNS))
                elif update:
                    self.db.execute(f"UPDATE market SET {', '.join(f'{c} = ?' for c in update)} "
                                    "WHERE community = ? AND interval_id = ?",
                                    [row[c] for c in update] + key)
        except sqlite3.Error as e:
            raise StoreError(_friendly(self.path, e)) from e
        self.commits += 1

    def market_rows(self, since: float = 0.0) -> list[dict[str, Any]]:
        """``market`` rows whose delivery ends at or after ``since``, by delivery start."""
        return list(self.db.query("SELECT * FROM market WHERE delivery_end >= ? "
                                  "ORDER BY delivery_start", [since]))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return list(self.db.query("SELECT * FROM events ORDER BY id"))
        return list(self.db.query("SELECT * FROM events WHERE kind = ? ORDER BY id", [kind]))

    def counts(self) -> dict[str, int]:
        return {t: int(self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("telemetry", "outbox", "events", "kv")}


def integrity_check(path: str | os.PathLike[str]) -> str:
    """``PRAGMA integrity_check`` of the file at ``path`` ('ok' when healthy)."""
    conn = sqlite3.connect(str(path))
    try:
        rows: Iterable[tuple[Any, ...]] = conn.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Aggregation of per-cycle readings into telemetry records


@dataclass
class _Acc:
    n: int = 0
    total: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    last: float | None = None

    def add(self, v: float | None) -> None:
        if v is None:
            return
        self.n += 1
        self.total += v
        self.lo = min(self.lo, v)
        self.hi = max(self.hi, v)
        self.last = v

    def mean(self) -> float | None:
        return None if self.n == 0 else self.total / self.n


@dataclass(frozen=True, slots=True)
class Counters:
    """Energy registers of the site's devices at one reading (Wh; None = not available)."""

    import_wh: float | None = None  # meter, lifetime import
    export_wh: float | None = None  # meter, lifetime export
    pv_wh: float | None = None  # inverter, lifetime AC energy
    stored_wh: float | None = None  # battery, SoC x usable capacity


# No household connection moves more than this; a larger counter step is a reset or garbage.
_MAX_SITE_W = 200_000.0


def counter_deltas(a: Counters, b: Counters, dt_s: float) -> dict[str, float]:
    """Energies (Wh) between two counter readings ``dt_s`` apart, keyed like ``totals_wh``.

    Only plausible steps count: a counter that went back (reset, replaced meter) or jumped
    more than any household connection can move in ``dt_s`` gives nothing for its key. The
    load is the energy balance (import - export + pv - net charge), and only when every
    counter it needs is there (a site without PV or a battery passes 0.0 for it: an absent
    device's counter stands still; None means unread or not provided).
    """
    cap = _MAX_SITE_W * max(dt_s, 0.0) / 3600.0

    def step(x: float | None, y: float | None, signed: bool = False) -> float | None:
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            return None
        d = y - x
        if (d < 0 and not signed) or abs(d) > cap:
            return None
        return d

    out: dict[str, float] = {}
    imp, exp = step(a.import_wh, b.import_wh), step(a.export_wh, b.export_wh)
    pv, net = step(a.pv_wh, b.pv_wh), step(a.stored_wh, b.stored_wh, signed=True)
    for k, v in (("import", imp), ("export", exp), ("pv", pv)):
        if v is not None:
            out[k] = v
    if net is not None:
        out["charge"], out["discharge"] = max(net, 0.0), max(-net, 0.0)
    if imp is not None and exp is not None and pv is not None and net is not None:
        out["load"] = max(imp - exp + pv - net, 0.0)
    return out


class Aggregator:
    """Folds per-cycle powers into one record per aligned ``interval_s`` window.

    Means are sample means (cycles are regular); energies are integrated per step with the
    trapezoid rule over the domain time between two readings. A step longer than ``max_gap_s``
    (a stalled loop, a dead device, a restart) is bridged by the devices' own energy counters
    when both ends have them (the meter's import/export registers, the inverter's lifetime WH,
    the battery's stored energy from SoC x capacity): the meter knows what flowed while the
    gateway was not looking. Without counters such a step integrates nothing rather than
    inventing energy.
    """

    def __init__(self, interval_s: float, max_gap_s: float = 300.0) -> None:
        self.interval_s = interval_s
        self.max_gap_s = max_gap_s
        self._start: float | None = None
        self._reset()
        self._prev: tuple[float, float | None, float | None, float | None] | None = None
        self._prev_counters: Counters | None = None
        self.totals_wh: dict[str, float] = {"import": 0.0, "export": 0.0, "pv": 0.0,
                                            "load": 0.0, "charge": 0.0, "discharge": 0.0}

    def _reset(self) -> None:
        self._site, self._pv, self._bat, self._load, self._soc = (_Acc(), _Acc(), _Acc(),
                                                                  _Acc(), _Acc())
        self._samples = 0
        self._errors = 0
        self._wh = {"import": 0.0, "export": 0.0, "pv": 0.0}
        self._mode = "auto"

    def add(self, ts: float, site_w: float | None, pv_w: float | None, battery_w: float | None,
            soc_pct: float | None, errors: int, mode: str,
            counters: Counters | None = None) -> dict[str, Any] | None:
        """Add one cycle; return the record of the window this sample closed, if any.

        ``counters`` are the devices' energy registers read this cycle (any may be None);
        they are only used to bridge steps longer than ``max_gap_s``.
        """
        out = None
        if self._start is None:
            self._start = ts - ts % self.interval_s
        elif ts >= self._start + self.interval_s:
            out = self.close()
            self._start = ts - ts % self.interval_s
        self._integrate(ts, site_w, pv_w, battery_w, counters)
        load = None
        if site_w is not None:
            load = site_w + (pv_w or 0.0) - (battery_w or 0.0)
        self._site.add(site_w)
        self._pv.add(pv_w)
        self._bat.add(battery_w)
        self._load.add(load)
        self._soc.add(soc_pct)
        self._samples += 1
        self._errors += errors
        self._mode = mode
        return out

    def _integrate(self, ts: float, site: float | None, pv: float | None,
                   bat: float | None, counters: Counters | None) -> None:
        prev, prev_c = self._prev, self._prev_counters
        self._prev = (ts, site, pv, bat)
        self._prev_counters = counters
        if prev is None:
            return
        dt = ts - prev[0]
        if dt > self.max_gap_s and prev_c is not None and counters is not None:
            self._bridge(counter_deltas(prev_c, counters, dt))
            return
        if not 0 < dt <= self.max_gap_s:
            return
        h = dt / 3600.0

        def avg(a: float | None, b: float | None) -> float | None:
            if a is None or b is None:
                return a if b is None else b
            return (a + b) / 2

        s, p, b = avg(prev[1], site), avg(prev[2], pv), avg(prev[3], bat)
        if s is not None:
            imp, exp = max(s, 0.0) * h, max(-s, 0.0) * h
            self._wh["import"] += imp
            self._wh["export"] += exp
            self.totals_wh["import"] += imp
            self.totals_wh["export"] += exp
            self.totals_wh["load"] += max(s + (p or 0.0) - (b or 0.0), 0.0) * h
        if p is not None:
            self._wh["pv"] += max(p, 0.0) * h
            self.totals_wh["pv"] += max(p, 0.0) * h
        if b is not None:
            self.totals_wh["charge"] += max(b, 0.0) * h
            self.totals_wh["discharge"] += max(-b, 0.0) * h

    def _bridge(self, d: dict[str, float]) -> None:
        for k in ("import", "export", "pv"):
            if k in d:
                self._wh[k] += d[k]
        for k, v in d.items():
            self.totals_wh[k] += v

    @property
    def open_wh(self) -> dict[str, float]:
        """Energies (Wh) of the window in progress: import, export, pv."""
        return dict(self._wh)

    def close(self) -> dict[str, Any] | None:
        """The record of the current window (None if it is empty); starts a new window."""
        if self._start is None or self._samples == 0:
            return None

        def r(x: float | None) -> float | None:
            return None if x is None or x in (float("inf"), float("-inf")) else round(x, 1)

        has_site = self._site.n > 0
        has_pv = self._pv.n > 0
        rec: dict[str, Any] = {
            "ts": round(self._start + self.interval_s, 3), "start": round(self._start, 3),
            "interval_s": self.interval_s, "samples": self._samples, "errors": self._errors,
            "mode": self._mode,
            "site_w": r(self._site.mean()),
            "site_w_min": r(self._site.lo) if has_site else None,
            "site_w_max": r(self._site.hi) if has_site else None,
            "pv_w": r(self._pv.mean()), "pv_w_max": r(self._pv.hi) if has_pv else None,
            "battery_w": r(self._bat.mean()), "load_w": r(self._load.mean()),
            "soc_pct": r(self._soc.last),
            "import_wh": round(self._wh["import"], 3) if has_site else None,
            "export_wh": round(self._wh["export"], 3) if has_site else None,
            "pv_wh": round(self._wh["pv"], 3) if has_pv else None,
        }
        self._reset()
        return rec
