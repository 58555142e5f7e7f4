"""The community market operator: announces auctions, takes bids, clears, publishes, settles.

One :class:`MarketOperator` per community (several instances may share the work, see below). It
runs two loops on one asyncio event loop:

* the **scheduler** (domain time from the injected clock): at each gate closure it clears every
  due auction through the ledger (exactly once across instances and restarts), then records and
  announces the next auction. An auction it could not clear until well into its delivery (it was
  down at the gate) is cleared *void*: no trade, every bidder a ``none`` award, so nobody is
  held to a commitment it learnt of too late (:data:`VOID_AFTER`);
* the **connection**: one MQTT session (reconnects with backoff) that consumes ``bids/+`` and
  ``meter/+``, answers each on ``bid_result/<site>``, publishes the retained ``announce``, and
  drains the ledger's outbox (result, awards, settlements) with QoS 1.

Bad input is answered with a rejection code and reason, counted (in :class:`OperatorStats` and in
the ledger's ``inputs`` table) and never stops the loops. A bid is judged at receipt against the
operator's clock: anything received at or after gate closure is refused.

Several instances: give them the same ``share_group`` and ledger file; bids reach one of them
(``$share/<group>/...``, MQTT 5 shared subscription), each stores what it receives, the ledger's
unique result row decides which one clears an interval, and that one publishes the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from community.clearing import MECHANISMS, Mechanism
from community.market.auction import clear_auction, void_auction
from community.market.ledger import Ledger
from community.market.messages import (
    MAX_PAYLOAD_BYTES,
    MarketTopics,
    Rejection,
    announce_payload,
    bid_result_payload,
    check_curves,
    encode,
    parse_bid,
    parse_meter,
)
from community.market.schedule import Auction, Calendar
from drivers.clock import Clock, SimClock, WallClock
from gateway import mqtt_calls
from gateway.mqtt_calls import raise_if_cancelling

log = logging.getLogger(__name__)

# An auction first cleared later than this share of its delivery interval after delivery began
# (the operator was down at its gate) is void: its awards could no longer be planned. The slack
# keeps an operator that wakes a little late (a busy host, gate_lead_s = 0) clearing as usual.
VOID_AFTER = 0.1


@dataclass
class OperatorStats:
    """Counters of this instance (the ledger keeps the durable ones)."""

    received: int = 0
    accepted: int = 0
    replaced: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    meters: int = 0
    cleared: int = 0  # intervals this instance cleared (void ones included)
    voided: int = 0  # of those, cleared void: too late for their delivery (see VOID_AFTER)
    published: int = 0  # outbox messages acknowledged by the broker
    announced: int = 0
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]`` parsed."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        u = urlsplit(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "tcp"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// (TLS is not "
                             f"supported by the operator yet)")
        if not u.hostname:
            raise ValueError(f"broker URL {url!r}: no host")
        return cls(host=u.hostname, port=u.port or 1883,
                   username=None if u.username is None else unquote(u.username),
                   password=None if u.password is None else unquote(u.password))


class MarketOperator:
    """The operator of one community's market (see the module docstring).

    ``members``: site ids allowed to bid (None = open community). ``interval_s``: delivery
    interval; ``gate_lead_s``: gate closure this long before delivery starts; ``floor``/``cap``:
    feed-in tariff and retail import price; ``mechanism``: "uniform" or "pay_as_bid"; ``k``: the
    uniform price's position in the clearing interval. ``share_group``: MQTT 5 shared
    subscription group for running several instances. ``instance``: this instance's stable name
    (its MQTT client id and ledger owner; keep it across restarts so the broker session resumes).
    ``session_expiry_s``: broker session lifetime (None: one hour for a single instance, so bids
    sent while it restarts wait at the broker; 0 with a share group, so a dead instance's share
    of the bids goes to the living ones).
    """

    def __init__(self, broker_url: str, community: str, members: Collection[str] | None,
                 clock: Clock, ledger_path: str | Path, interval_s: int = 300,
                 gate_lead_s: float = 60.0, floor: float = 0.08, cap: float = 0.30,
                 mechanism: Mechanism = "uniform", *, k: float = 0.5,
                 share_group: str | None = None, instance: str = "op0",
                 mqtt_version: int = 5, session_expiry_s: int | None = None,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, keepalive_s: int = 30,
                 connect_timeout_s: float = 10.0, publish_timeout_s: float = 10.0) -> None:
        self.broker = BrokerUrl.parse(broker_url)
        self.calendar = Calendar(community=community, interval_s=interval_s,
                                 gate_lead_s=gate_lead_s, price_floor=floor, price_cap=cap,
                                 mechanism=mechanism, members=members)
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"k must be in [0, 1], got {k}")
        if mqtt_version not in (3, 5):
            raise ValueError(f"mqtt_version must be 3 (3.1.1) or 5, got {mqtt_version}")
        if share_group is not None and (not share_group or any(c in share_group
                                                                 for c in "/+#")):
            raise ValueError(f"share_group must be one topic level, got {share_group!r}")
        self.community = community
        self.members = None if members is None else frozenset(members)
        self.clock = clock
        self.ledger_path = str(ledger_path)
        self.k = k
        self.share_group = share_group
        self.instance = instance
        self.mqtt_version = mqtt_version
        self.session_expiry_s = (session_expiry_s if session_expiry_s is not None
                                 else (0 if share_group else 3600))
        self.max_payload_bytes = max_payload_bytes
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.topics = MarketTopics(community)
        self.stats = OperatorStats()
        self.connected = asyncio.Event()
        self.open_auction: Auction | None = None
        self._ledger: Ledger | None = None
        self._wake = asyncio.Event()

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("the operator is not running")
        return self._ledger

    def _filter(self, kind: str) -> str:
        f = f"{self.topics.base}/{kind}/+"
        return f"$share/{self.share_group}/{f}" if self.share_group else f

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or the task is cancelled); the ledger is closed after."""
        self._ledger = Ledger(self.ledger_path)
        tasks = [asyncio.create_task(self._scheduler(), name=f"market-{self.instance}-sched"),
                 asyncio.create_task(self._connection(), name=f"market-{self.instance}-mqtt")]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper:
                    t.result()  # a loop ended: that is a bug, raise it
        finally:
            await _cancel_all([*tasks, stopper])
            self._ledger.close()
            self._ledger = None

    # ------------------------------------------------------------------ scheduler

    async def _scheduler(self) -> None:
        while True:
            now = self.clock.now()
            self._clear_due(now)
            stored = self.ledger.ensure_auction(self.calendar.open_auction(now), now,
                                                self.instance)
            if self.open_auction != stored:
                log.info("market %s: auction %s open until %.0f", self.community,
                         stored.interval_id, stored.gate_closure)
            self.open_auction = stored
            self._wake.set()
            await self.clock.sleep_until(stored.gate_closure)

    def _clear_due(self, now: float) -> None:
        for a in self.ledger.due_auctions(self.community, now):
            void = now > a.delivery_start + VOID_AFTER * (a.delivery_end - a.delivery_start)
            compute = (functools.partial(void_auction, a, cleared_at=now) if void else
                       functools.partial(clear_auction, a, cleared_at=now, k=self.k))
            try:
                out = self.ledger.clear_once(a, compute, now, self.instance)
            except Exception:  # a bug, not bad input (bids were checked): retried next gate
                log.exception("market %s: clearing %s failed", self.community, a.interval_id)
                self.stats.rejected["internal"] += 1
                continue
            if out is None:
                continue
            self.stats.cleared += 1
            if void:
                self.stats.voided += 1
                log.warning("market %s: %s void: cleared %.0f s into its delivery (the operator "
                            "was down at its gate); %s bids, no trade, all settle with the "
                            "retailer", self.community, a.interval_id, now - a.delivery_start,
                            out.result["bids"])
            else:
                log.info("market %s: cleared %s: %s bids, %s kWh at %s", self.community,
                         a.interval_id, out.result["bids"], out.result["volume_kwh"],
                         out.result["clearing_price"])

    # ------------------------------------------------------------------ MQTT

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        common = dict(username=b.username, password=b.password,
                      identifier=f"hems-market-{self.community}-{self.instance}",
                      keepalive=self.keepalive_s, timeout=self.connect_timeout_s,
                      logger=logging.getLogger("community.market.paho"))
        if self.mqtt_version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            return aiomqtt.Client(b.host, b.port, protocol=aiomqtt.ProtocolVersion.V5,
                                  clean_start=self.session_expiry_s == 0, properties=props,
                                  **common)  # type: ignore[arg-type]
        return aiomqtt.Client(b.host, b.port, protocol=aiomqtt.ProtocolVersion.V311,
                              clean_session=self.session_expiry_s == 0,
                              **common)  # type: ignore[arg-type]

    async def _connection(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self._client() as client:
                    for kind in ("bids", "meter"):
                        await mqtt_calls.subscribe(client, self._filter(kind), qos=1,
                                                   timeout_s=self.publish_timeout_s)
                    self.stats.connects += 1
                    self.connected.set()
                    delay = 0.5
                    log.info("market %s: %s connected to %s:%s", self.community, self.instance,
                             self.broker.host, self.broker.port)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._consume(client))
                        # In the body, not a task: see gateway.mqtt_calls (3.11 TaskGroups)
                        await self._publisher(client)
            except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                raise_if_cancelling()  # a 3.11 TaskGroup puts a child's error first
                msg = str(eg.exceptions[0]) or type(eg.exceptions[0]).__name__
                if self.connected.is_set():
                    self.stats.disconnects += 1
                    log.warning("market %s: broker connection lost: %s", self.community, msg)
                elif msg != self.stats.last_error:
                    log.error("market %s: cannot connect to %s:%s: %s; retrying",
                              self.community, self.broker.host, self.broker.port, msg)
                self.stats.last_error = msg
            self.connected.clear()
            await asyncio.sleep(delay)  # reconnect backoff: real seconds, not domain time
            delay = min(delay * 2.0, 30.0)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes,
                       retain: bool = False) -> None:
        """QoS-1 publish, bounded by ``publish_timeout_s`` real seconds (TimeoutError: the
        connection loop reconnects). aiomqtt's own timeout goes through Python 3.11's
        ``asyncio.wait_for``, which can swallow a cancellation arriving as the PUBACK does and
        leave a task that never stops; ``asyncio.timeout`` does not."""
        await mqtt_calls.publish(client, topic, payload, qos=1, retain=retain,
                                 timeout_s=self.publish_timeout_s)

    async def _publisher(self, client: aiomqtt.Client) -> None:
        announced: str | None = None  # per connection: a new session announces again
        while True:
            self._wake.clear()
            now = self.clock.now()
            # Rows of a dead instance are taken over after one interval.
            for row in self.ledger.pending(self.community, self.instance,
                                           now - self.calendar.interval_s):
                await self._publish(client, row.topic, row.payload, retain=row.retain)
                self.ledger.mark_published(row.id, self.clock.now())
                self.stats.published += 1
            a = self.open_auction
            if a is not None and a.interval_id != announced:
                await self._publish(client, self.topics.announce, encode(announce_payload(a)),
                                    retain=True)
                announced = a.interval_id
                self.stats.announced += 1
            await self._wake.wait()

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            topic = msg.topic.value
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            kind = "bid" if self.topics.site_of(topic, "bids") else "meter"
            site = self.topics.site_of(topic, "bids") or self.topics.site_of(topic, "meter")
            if site is None:
                continue
            try:
                if kind == "bid":
                    await self._on_bid(client, site, payload)
                else:
                    await self._on_meter(client, site, payload)
            except aiomqtt.MqttError:
                raise
            except Exception as e:  # one bad message must never stop the market
                log.exception("market %s: failed to process %s", self.community, topic)
                self.stats.rejected["internal"] += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                body = bid_result_payload(self.community, site, kind, None, None, "internal",
                                          "the operator could not process this message; "
                                          "it is logged", self.clock.now())
                await self._publish(client, self.topics.bid_result(site), encode(body))

    # ------------------------------------------------------------------ inputs

    def _check_site(self, community: str, site: str) -> Rejection | None:
        if community != self.community:
            return Rejection("wrong_community", f"field 'community': {community!r} is not "
                                                f"{self.community!r}")
        if self.members is not None and site not in self.members:
            return Rejection("not_member", f"site {site!r} is not a member of "
                                           f"{self.community!r}")
        return None

    def _judge_bid(self, site: str, payload: bytes, now: float
                   ) -> tuple[str, Rejection | str, str | None, str | None]:
        """(kind, answer, interval_id, bid_id) for one bid payload."""
        bid = parse_bid(payload, site, self.max_payload_bytes)
        if isinstance(bid, Rejection):
            return "bid", bid, None, None
        iv, bid_id = bid.interval_id, bid.bid_id
        bad = self._check_site(bid.community, site)
        if bad:
            return "bid", bad, iv, bid_id
        a = self.ledger.auction(self.community, iv)
        if a is None:
            open_id = self.open_auction.interval_id if self.open_auction else None
            return "bid", Rejection("unknown_interval", f"field 'interval_id': {iv} is not an "
                                    f"announced auction (open: {open_id})"), iv, bid_id
        if now >= a.gate_closure:
            return "bid", Rejection("gate_closed", f"gate of {iv} closed at "
                                    f"{a.gate_closure:.0f}, received at {now:.0f}"), iv, bid_id
        bad = check_curves(bid, a.price_floor, a.price_cap)
        if bad:
            return "bid", bad, iv, bid_id
        return "bid", self.ledger.store_bid(bid, now, self.instance), iv, bid_id

    async def _on_bid(self, client: aiomqtt.Client, site: str, payload: bytes) -> None:
        now = self.clock.now()
        kind, answer, iv, bid_id = self._judge_bid(site, payload, now)
        await self._answer(client, site, kind, answer, iv, bid_id, payload, now)

    async def _on_meter(self, client: aiomqtt.Client, site: str, payload: bytes) -> None:
        now = self.clock.now()
        self.stats.meters += 1
        answer: Rejection | str
        iv: str | None = None
        m = parse_meter(payload, site, self.max_payload_bytes)
        if isinstance(m, Rejection):
            answer = m
        else:
            iv = m.interval_id
            a = self.ledger.auction(self.community, iv)
            bad = self._check_site(m.community, site)
            if bad is not None:
                answer = bad
            elif a is None:
                answer = Rejection("unknown_interval", f"field 'interval_id': {iv} is not an "
                                                       "announced auction")
            elif now < a.delivery_end:
                answer = Rejection("too_early", f"interval {iv} ends at {a.delivery_end:.0f}, "
                                                f"now is {now:.0f}")
            elif not self.ledger.is_cleared(self.community, iv):
                answer = Rejection("not_cleared", f"interval {iv} is not cleared yet")
            else:
                settled = self.ledger.settle(a, site, m.net_export_kwh, now, self.instance)
                answer = settled if isinstance(settled, Rejection) else settled[0]
                self._wake.set()
        await self._answer(client, site, "meter", answer, iv, None, payload, now)

    async def _answer(self, client: aiomqtt.Client, site: str, kind: str,
                      answer: Rejection | str, interval_id: str | None, bid_id: str | None,
                      payload: bytes, now: float) -> None:
        if kind == "bid":
            self.stats.received += 1
        if isinstance(answer, Rejection):
            code, reason = answer.code, answer.reason
            self.stats.rejected[code] += 1
            log.info("market %s: %s from %r rejected: %s: %s", self.community, kind, site,
                     code, reason)
        else:
            code, reason = answer, None
            if kind == "bid":
                if code == "replaced":
                    self.stats.replaced += 1
                self.stats.accepted += 1
        self.ledger.log_input(community=self.community, kind=kind, site=site,
                              interval_id=interval_id, bid_id=bid_id, received_at=now,
                              instance=self.instance, code=code, reason=reason,
                              payload=payload[:self.max_payload_bytes])
        body = bid_result_payload(self.community, site, kind, interval_id, bid_id, code, reason,
                                  now)
        await self._publish(client, self.topics.bid_result(site), encode(body))


async def _cancel_all(tasks: Sequence[asyncio.Task[object]], rounds: int = 40,
                      wait_s: float = 0.25) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again while they are not
    (belt and braces against a swallowed cancellation, see :meth:`MarketOperator._publish`).
    Bounded: gives up (logged) after ``rounds * wait_s`` real seconds."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=wait_s)
    if pending:
        log.error("market: %d task(s) did not stop: %s", len(pending),
                  [t.get_name() for t in pending])
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.debug("market: task %s ended with %r", t.get_name(), t.exception())


# ---------------------------------------------------------------------------------------------
# Command line (``hems market``; wired by gateway/cli.py)


async def run_market(*, broker_url: str, community: str, db: str | Path,
                     members: Sequence[str] | None = None, interval_s: int = 300,
                     gate_lead_s: float = 60.0, floor: float = 0.08, cap: float = 0.30,
                     mechanism: Mechanism = "uniform", k: float = 0.5,
                     share_group: str | None = None, instance: str = "op0",
                     mqtt_version: int = 5, speed: float | None = None,
                     sim_start: float | None = None, stop: asyncio.Event | None = None) -> None:
    """Run one operator until SIGINT/SIGTERM (or ``stop``). ``speed`` runs it on a SimClock
    (domain time starting at ``sim_start``, default now) instead of the wall clock."""
    import time

    clock: Clock = (WallClock() if speed is None else
                    SimClock(start=time.time() if sim_start is None else sim_start, speed=speed))
    stop = stop or asyncio.Event()
    op = MarketOperator(broker_url, community, members, clock, db, interval_s, gate_lead_s,
                        floor, cap, mechanism, k=k, share_group=share_group, instance=instance,
                        mqtt_version=mqtt_version)
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        await op.run(stop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``hems market``."""
    p.add_argument("--community", required=True, help="community id (one MQTT topic level)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://[user:pw@]host:port")
    p.add_argument("--db", required=True, help="ledger SQLite file (shared by all instances)")
    p.add_argument("--members", default=None,
                   help="comma-separated site ids allowed to bid (default: open community)")
    p.add_argument("--interval", type=int, default=300, help="delivery interval, s")
    p.add_argument("--gate-lead", type=float, default=60.0,
                   help="gate closure this long before delivery starts, s")
    p.add_argument("--floor", type=float, default=0.08, help="feed-in tariff, currency/kWh")
    p.add_argument("--cap", type=float, default=0.30, help="retail import price, currency/kWh")
    p.add_argument("--mechanism", choices=MECHANISMS, default="uniform")
    p.add_argument("--k", type=float, default=0.5, help="uniform price position in [lo, hi]")
    p.add_argument("--share-group", default=None,
                   help="MQTT 5 shared-subscription group (run several instances)")
    p.add_argument("--instance", default="op0", help="stable instance name (client id)")
    p.add_argument("--mqtt-version", type=int, choices=(3, 5), default=5)
    p.add_argument("--speed", type=float, default=None,
                   help="run on a simulated clock this many times faster than real time")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``hems market`` with parsed ``args``; returns the exit status."""
    members = None if args.members is None else [m for m in args.members.split(",") if m]
    try:
        asyncio.run(run_market(
            broker_url=args.broker, community=args.community, db=args.db, members=members,
            interval_s=args.interval, gate_lead_s=args.gate_lead, floor=args.floor,
            cap=args.cap, mechanism=args.mechanism, k=args.k, share_group=args.share_group,
            instance=args.instance, mqtt_version=args.mqtt_version, speed=args.speed))
    except ValueError as e:
        log.error("hems market: %s", e)
        return 2
    return 0
