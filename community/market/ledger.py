"""The market's ledger: one SQLite file (WAL) that every operator instance of a community shares.

What it holds: auctions as announced, every input as received (``inputs``: bids and meter
readings, accepted or not, raw bytes and the answer given), each site's current bid per auction
(``bids``), results, awards, meter readings, settlements, and an ``outbox`` of the retained
messages still to publish.

Why it is restart- and multi-instance-safe: every write that decides something runs in one
``BEGIN IMMEDIATE`` transaction (SQLite serialises writers across processes) and is keyed by
``(community, interval_id, ...)``:

* a bid is stored only if its auction has no result yet, inside the same transaction, so a bid is
  either in the clearing or refused with ``gate_closed``, never silently left out;
* clearing inserts the result row under its primary key ``(community, interval_id)``: the first
  transaction wins, any later one (another instance, a restarted one) finds the row and does
  nothing, so an interval is cleared exactly once;
* result, awards and settlements enter the ``outbox`` in the transaction that creates them and are
  marked published only after the broker acknowledged them; whoever restarts publishes what is
  left. Republishing is harmless (retained topics, identical bytes).

Timestamps are domain time (the operator's clock). Beyond one machine the same tables live in a
networked database (see docs/mqtt-market.md); the transactions need only row-level uniqueness.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from community.market.auction import Outcome, SiteAward, StoredBid
from community.market.messages import (
    Bid,
    MarketTopics,
    Rejection,
    encode,
    energy,
    money,
)
from community.market.schedule import Auction
from community.market.settlement import Award, Statement, Tariff, settle_site


@dataclass(frozen=True)
class OutboxRow:
    """A retained message to publish (QoS 1)."""

    id: int
    topic: str
    payload: bytes
    retain: bool


def _create(db: sqlite_utils.Database) -> None:
    db.table("auctions").create({
        "community": str, "interval_id": str, "delivery_start": float, "delivery_end": float,
        "gate_closure": float, "price_floor": float, "price_cap": float, "mechanism": str,
        "members": str, "announced_at": float, "announced_by": str,
    }, pk=("community", "interval_id"), if_not_exists=True)
    db.table("inputs").create({
        "id": int, "community": str, "kind": str, "site": str, "interval_id": str,
        "bid_id": str, "received_at": float, "instance": str, "status": str, "code": str,
        "reason": str, "payload": bytes,
    }, pk="id", if_not_exists=True)
    db.table("bids").create({
        "community": str, "interval_id": str, "site": str, "bid_id": str, "seq": int,
        "buy": str, "sell": str, "ord": int, "received_at": float, "instance": str,
    }, pk=("community", "interval_id", "site"), if_not_exists=True)
    db.table("results").create({
        "community": str, "interval_id": str, "mechanism": str, "clearing_price": float,
        "volume_wh": int, "bids": int, "trades": int, "buyers_pay": float,
        "sellers_receive": float, "cleared_at": float, "cleared_by": str, "payload": str,
    }, pk=("community", "interval_id"), if_not_exists=True)
    db.table("awards").create({
        "community": str, "interval_id": str, "site": str, "net_wh": int,
        "net_amount": float, "payload": str,
    }, pk=("community", "interval_id", "site"), if_not_exists=True)
    db.table("settlements").create({
        "community": str, "interval_id": str, "site": str, "metered_export_kwh": float,
        "awarded_export_kwh": float, "award_amount": float, "deviation_kwh": float,
        "deviation_amount": float, "total": float, "retailer_only": float,
        "settled_at": float, "settled_by": str, "payload": str,
    }, pk=("community", "interval_id", "site"), if_not_exists=True)
    db.table("outbox").create({
        "id": int, "community": str, "topic": str, "interval_id": str, "payload": bytes,
        "retain": int, "owner": str, "created_at": float, "published_at": float,
    }, pk="id", if_not_exists=True)
    db.table("outbox").create_index(["community", "topic", "interval_id"], unique=True,
                              if_not_exists=True)
    db.table("outbox").create_index(["published_at"], if_not_exists=True)
    db.table("inputs").create_index(["community", "code"], if_not_exists=True)


class Ledger:
    """The ledger file, opened by one operator instance (several may open the same file)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), never implicit.
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout_s)
        self.db = sqlite_utils.Database(self.conn)
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self.db.enable_wal()
        self.conn.execute("PRAGMA synchronous = FULL")  # it is money: no lost commits
        with self._tx():
            _create(self.db)

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.conn.execute(sql, args).fetchone()
        return row

    # ------------------------------------------------------------------ auctions

    def ensure_auction(self, a: Auction, now: float, instance: str) -> Auction:
        """Record ``a`` as announced unless it already is; return the stored auction (a
        restarted or second instance keeps the parameters first announced)."""
        with self._tx() as c:
            c.execute(
                f"INSERT OR IGNORE INTO auctions ({self._AUCTION_COLS}, announced_at, "
                "announced_by) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (a.community, a.interval_id, a.delivery_start, a.delivery_end, a.gate_closure,
                 a.price_floor, a.price_cap, a.mechanism,
                 None if a.members is None else json.dumps(list(a.members)), now, instance))
        stored = self.auction(a.community, a.interval_id)
        assert stored is not None
        return stored

    _AUCTION_COLS = ("community, interval_id, delivery_start, delivery_end, gate_closure, "
                     "price_floor, price_cap, mechanism, members")

    @staticmethod
    def _auction(row: tuple[Any, ...]) -> Auction:
        members = None if row[8] is None else tuple(json.loads(row[8]))
        return Auction(community=row[0], interval_id=row[1], delivery_start=row[2],
                       delivery_end=row[3], gate_closure=row[4], price_floor=row[5],
                       price_cap=row[6], mechanism=row[7], members=members)

    def auction(self, community: str, interval_id: str) -> Auction | None:
        row = self._one(f"SELECT {self._AUCTION_COLS} FROM auctions "
                        "WHERE community = ? AND interval_id = ?", community, interval_id)
        return None if row is None else self._auction(row)

    def due_auctions(self, community: str, now: float) -> list[Auction]:
        """Announced auctions whose gate has closed and that nobody has cleared yet."""
        rows = self.conn.execute(
            f"SELECT {self._AUCTION_COLS} FROM auctions a WHERE community = ? "
            "AND gate_closure <= ? AND NOT EXISTS (SELECT 1 FROM results r WHERE "
            "r.community = a.community AND r.interval_id = a.interval_id) "
            "ORDER BY delivery_start", (community, now)).fetchall()
        return [self._auction(r) for r in rows]

    def is_cleared(self, community: str, interval_id: str) -> bool:
        return self._one("SELECT 1 FROM results WHERE community = ? AND interval_id = ?",
                         community, interval_id) is not None

    # ------------------------------------------------------------------ inputs and bids

    def log_input(self, *, community: str, kind: str, site: str, interval_id: str | None,
                  bid_id: str | None, received_at: float, instance: str, code: str,
                  reason: str | None, payload: bytes) -> None:
        """Append one received message (as received) and the answer it got."""
        status = "accepted" if code in ("ok", "replaced") else "rejected"
        with self._tx() as c:
            c.execute("INSERT INTO inputs (community, kind, site, interval_id, bid_id, "
                      "received_at, instance, status, code, reason, payload) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (community, kind, site, interval_id, bid_id, received_at, instance,
                       status, code, reason, payload))

    def store_bid(self, bid: Bid, received_at: float, instance: str) -> str | Rejection:
        """Store ``bid`` as its site's current bid: ``"ok"``, ``"replaced"``, or a Rejection
        (``gate_closed`` if the auction was cleared meanwhile, ``stale_seq``)."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM results WHERE community = ? AND interval_id = ?",
                         (bid.community, bid.interval_id)).fetchone():
                return Rejection("gate_closed", f"interval {bid.interval_id} is already cleared")
            old = c.execute("SELECT seq FROM bids WHERE community = ? AND interval_id = ? "
                            "AND site = ?", (bid.community, bid.interval_id, bid.site)).fetchone()
            if old is not None and old[0] is not None and bid.seq is not None \
                    and bid.seq < old[0]:
                return Rejection("stale_seq", f"field 'seq': {bid.seq} is below the stored "
                                              f"bid's seq {old[0]}")
            ord_ = c.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM bids WHERE community = ? "
                             "AND interval_id = ?", (bid.community, bid.interval_id)).fetchone()[0]
            c.execute("INSERT OR REPLACE INTO bids (community, interval_id, site, bid_id, seq, "
                      "buy, sell, ord, received_at, instance) VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (bid.community, bid.interval_id, bid.site, bid.bid_id, bid.seq,
                       json.dumps(bid.buy), json.dumps(bid.sell), ord_, received_at, instance))
        return "ok" if old is None else "replaced"

    def bids(self, community: str, interval_id: str) -> list[StoredBid]:
        """The current bid of every site for the auction, in acceptance order."""
        rows = self.conn.execute(
            "SELECT site, bid_id, ord, buy, sell FROM bids WHERE community = ? AND "
            "interval_id = ? ORDER BY ord", (community, interval_id)).fetchall()
        return [StoredBid(site=r[0], bid_id=r[1], order=r[2],
                          buy=tuple((float(p), float(q)) for p, q in json.loads(r[3])),
                          sell=tuple((float(p), float(q)) for p, q in json.loads(r[4])))
                for r in rows]

    def bid_row(self, community: str, interval_id: str, site: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM bids WHERE community = ? AND interval_id = ? "
                                  "AND site = ?", [community, interval_id, site]))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ clearing

    def clear_once(self, auction: Auction, compute: Callable[[list[StoredBid]], Outcome],
                   now: float, instance: str) -> Outcome | None:
        """Clear ``auction`` unless someone already did: returns the outcome if this call
        cleared it, None otherwise. Result, awards and their outbox rows commit together."""
        t = MarketTopics(auction.community)
        key = (auction.community, auction.interval_id)
        with self._tx() as c:
            if c.execute("SELECT 1 FROM results WHERE community = ? AND interval_id = ?",
                         key).fetchone():
                return None
            out = compute(self.bids(*key))
            r = out.result
            # The primary key is the arbiter: a concurrent clearer that got past the check
            # above (it cannot, under BEGIN IMMEDIATE, but a networked DB might) fails here.
            c.execute("INSERT INTO results (community, interval_id, mechanism, clearing_price, "
                      "volume_wh, bids, trades, buyers_pay, sellers_receive, cleared_at, "
                      "cleared_by, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (*key, auction.mechanism, r["clearing_price"],
                       out.clearing.volume_wh if out.clearing else 0, r["bids"], r["trades"],
                       out.clearing.buyers_pay if out.clearing else 0.0,
                       out.clearing.sellers_receive if out.clearing else 0.0,
                       now, instance, json.dumps(r)))
            self._outbox(c, auction.community, t.result, auction.interval_id, encode(r),
                         instance, now)
            for site, a in sorted(out.awards.items()):
                payload = out.award_payload(auction, site)
                c.execute("INSERT INTO awards (community, interval_id, site, net_wh, "
                          "net_amount, payload) VALUES (?,?,?,?,?,?)",
                          (*key, site, a.net_wh, a.net_amount, json.dumps(payload)))
                self._outbox(c, auction.community, t.award(site), auction.interval_id,
                             encode(payload), instance, now)
        return out

    def result(self, community: str, interval_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT payload FROM results WHERE community = ? AND interval_id = ?",
                        community, interval_id)
        return None if row is None else dict(json.loads(row[0]))

    def results(self, community: str) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM results WHERE community = ? "
                                  "ORDER BY interval_id", [community]))

    def awards(self, community: str, interval_id: str) -> dict[str, SiteAward]:
        rows = self.conn.execute("SELECT site, net_wh, net_amount FROM awards WHERE "
                                 "community = ? AND interval_id = ?",
                                 (community, interval_id)).fetchall()
        return {r[0]: SiteAward(site=r[0], net_wh=r[1], net_amount=r[2]) for r in rows}

    # ------------------------------------------------------------------ settlement

    def settle(self, auction: Auction, site: str, metered_export_kwh: float, now: float,
               instance: str) -> tuple[str, dict[str, Any]] | Rejection:
        """Settle ``site`` for ``auction`` (cleared) from its meter reading, once.

        Returns ``("ok", payload)`` for a new statement (also queued in the outbox); the same
        reading again gives ``("ok", stored payload)`` (idempotent, not queued again); a
        different reading after settlement gives the ``already_settled`` Rejection.
        """
        key = (auction.community, auction.interval_id, site)
        with self._tx() as c:
            old = c.execute("SELECT metered_export_kwh, payload FROM settlements WHERE "
                            "community = ? AND interval_id = ? AND site = ?", key).fetchone()
            if old is not None:
                if abs(old[0] - metered_export_kwh) <= 1e-9:
                    return "ok", dict(json.loads(old[1]))
                return Rejection("already_settled", f"interval {auction.interval_id} is "
                                 f"settled with {old[0]} kWh; {metered_export_kwh} kWh refused")
            row = c.execute("SELECT net_wh, net_amount FROM awards WHERE community = ? AND "
                            "interval_id = ? AND site = ?", key).fetchone()
            award = None if row is None else SiteAward(site, row[0], row[1])
            st = settle_site(site, None if award is None else
                             Award(export_kwh=award.export_kwh, amount=award.credit),
                             metered_export_kwh, Tariff(auction.price_floor, auction.price_cap))
            payload = statement_payload(auction, st, now)
            c.execute("INSERT INTO settlements (community, interval_id, site, "
                      "metered_export_kwh, awarded_export_kwh, award_amount, deviation_kwh, "
                      "deviation_amount, total, retailer_only, settled_at, settled_by, payload) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (*key, st.metered_export_kwh, st.awarded_export_kwh, st.award_amount,
                       st.deviation_kwh, st.deviation_amount, st.total, st.retailer_only,
                       now, instance, json.dumps(payload)))
            self._outbox(c, auction.community, MarketTopics(auction.community).settlement(site),
                         auction.interval_id, encode(payload), instance, now)
        return "ok", payload

    def settlements(self, community: str) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM settlements WHERE community = ? "
                                  "ORDER BY interval_id, site", [community]))

    # ------------------------------------------------------------------ outbox

    @staticmethod
    def _outbox(c: sqlite3.Connection, community: str, topic: str, interval_id: str,
                payload: bytes, owner: str, now: float) -> None:
        c.execute("INSERT OR IGNORE INTO outbox (community, topic, interval_id, payload, "
                  "retain, owner, created_at) VALUES (?,?,?,?,1,?,?)",
                  (community, topic, interval_id, payload, owner, now))

    def pending(self, community: str, owner: str, orphaned_before: float) -> list[OutboxRow]:
        """Unpublished rows of ``owner``, and anybody's that are older than
        ``orphaned_before`` (an instance died between commit and publish)."""
        rows = self.conn.execute(
            "SELECT id, topic, payload, retain FROM outbox WHERE community = ? AND "
            "published_at IS NULL AND (owner = ? OR created_at <= ?) ORDER BY id",
            (community, owner, orphaned_before)).fetchall()
        return [OutboxRow(id=r[0], topic=r[1], payload=bytes(r[2]), retain=bool(r[3]))
                for r in rows]

    def mark_published(self, row_id: int, now: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE outbox SET published_at = ? WHERE id = ? AND published_at IS NULL",
                      (now, row_id))

    # ------------------------------------------------------------------ reports

    def input_counts(self, community: str) -> dict[str, int]:
        """Received inputs by answer code (``ok``, ``replaced``, rejection codes)."""
        rows = self.conn.execute("SELECT code, COUNT(*) FROM inputs WHERE community = ? "
                                 "GROUP BY code", (community,)).fetchall()
        return {r[0]: r[1] for r in rows}


def statement_payload(auction: Auction, st: Statement, now: float) -> dict[str, Any]:
    """Payload of ``settlement/<site>``."""
    return {
        "v": 1, "community": auction.community, "interval_id": auction.interval_id,
        "site": st.site, "feed_in": auction.price_floor, "retail": auction.price_cap,
        "awarded_export_kwh": energy(st.awarded_export_kwh),
        "award_price": None if st.award_price is None else money(st.award_price),
        "award_amount": money(st.award_amount),
        "metered_export_kwh": st.metered_export_kwh, "deviation_kwh": st.deviation_kwh,
        "deviation_amount": money(st.deviation_amount), "total": money(st.total),
        "retailer_only": money(st.retailer_only), "settled_at": round(now, 3),
    }
