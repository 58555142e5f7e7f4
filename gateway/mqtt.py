"""The gateway's MQTT session: availability + LWT, HA discovery, store-and-forward telemetry,
retained state, commands, and the external PV forecast topic (:class:`PvForecastInbox`).

Only MQTT 3.1.1 features are used (QoS 0/1, retain, a will, clean sessions), so the same client
works against Mosquitto and against the embedded amqtt broker the demo falls back to.

Store-and-forward: telemetry never goes from the control loop to the socket. The loop hands records
to the store; after they are committed the publisher reads them back from the outbox (``seq``
order), publishes them with QoS 1 in windows of ``window`` messages and reports the highest
acknowledged ``seq`` back to the store. While the broker is away nothing is published and the
outbox grows; on reconnect it drains from the first unacknowledged ``seq``. Delivery is
at-least-once (a window cut by a disconnect is sent again); consumers de-duplicate by ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiomqtt

from gateway import messages, mqtt_calls
from gateway.config import BrokerConfig, MqttConfig
from gateway.forecast.pv import ExternalForecast, ExternalForecastError, parse_forecast_message
from gateway.hass import discovery_messages
from gateway.messages import OFFLINE, ONLINE, Topics
from gateway.mqtt_calls import raise_if_cancelling
from gateway.store import OutboxRow

log = logging.getLogger(__name__)

# (command name, payload, retained) -> (result topic, result payload)
CommandHandler = Callable[[str, bytes, bool], Awaitable[tuple[str, bytes]]]


class Outbox(Protocol):
    """What the publisher needs from the store side."""

    new_rows: asyncio.Event  # set after every commit that added outbox rows

    def published_seq(self) -> int:
        """Highest seq the broker has acknowledged (persisted by the store)."""
        ...

    async def fetch(self, after_seq: int, limit: int) -> list[OutboxRow]:
        """Committed rows with seq > after_seq, oldest first."""
        ...

    def acked(self, seq: int) -> None:
        """Every row up to ``seq`` has been acknowledged by the broker."""
        ...


class EnvelopeLink(Protocol):
    """The DSO-envelope side of the session (:class:`gateway.envelope_agent.EnvelopeAgent`)."""

    wake: asyncio.Event  # set when outgoing() has something

    @property
    def subscriptions(self) -> tuple[str, ...]: ...

    def wants(self, topic: str) -> bool: ...

    def on_message(self, topic: str, payload: bytes, now: float) -> None: ...

    def outgoing(self) -> list[tuple[str, bytes, bool]]: ...

    def requeue(self, items: list[tuple[str, bytes, bool]]) -> None: ...

    def on_connect(self) -> None: ...

    def resubscribe_due(self) -> bool: ...


@dataclass
class MqttStats:
    """Counters of the session (this process)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    telemetry_sent: int = 0  # QoS-1 acknowledged publications, duplicates included
    state_published: int = 0
    commands: int = 0
    last_error: str | None = None


@dataclass
class ForecastStats:
    """Counters of the ``forecast/pv`` topic (this process)."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # per code (see docs/mqtt.md)
    repeats: int = 0  # the same payload again (the retained copy re-sent at a reconnect)
    withdrawn: int = 0  # empty payloads: the retained forecast was deleted
    errors: int = 0  # handler bugs (logged with a traceback)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FORECAST_COMMAND = "forecast_pv"  # the result topic is <base>/cmd_result/forecast_pv
_MAX_REPLIES = 64  # replies waiting for the broker; older ones are dropped beyond this


class PvForecastInbox:
    """The retained external PV forecast ``<base>/forecast/pv`` (see docs/mqtt.md).

    Each message is checked by :func:`gateway.forecast.pv.parse_forecast_message` and must be
    issued later than the forecast held. An accepted one replaces it; a refused one is logged
    (one line naming what was wrong), counted per code and answered with a ``rejected`` result,
    and the forecast held stays. An empty payload (the retained message deleted) withdraws the
    forecast held. The byte-identical payload again (a reconnect re-sends the retained copy) is
    skipped silently. Speaks the session's link protocol (like the envelope agent).
    """

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.topic = f"{topics.base}/forecast/pv"
        self.result_topic = topics.cmd_result(FORECAST_COMMAND)
        self.current: ExternalForecast | None = None
        self.stats = ForecastStats()
        self.wake = asyncio.Event()
        self._out: list[tuple[str, bytes, bool]] = []
        self._last_digest: bytes | None = None

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return (self.topic,)

    def wants(self, topic: str) -> bool:
        return topic == self.topic

    def on_message(self, topic: str, payload: bytes, now: float) -> None:
        """Handle one message; never raises."""
        try:
            self._handle(payload, now)
        except Exception:  # a bug here must not end the session's message loop
            self.stats.errors += 1
            log.exception("mqtt: forecast/pv handler failed")

    def _handle(self, payload: bytes, now: float) -> None:
        digest = hashlib.sha256(payload).digest()
        if digest == self._last_digest:
            self.stats.repeats += 1
            return
        self._last_digest = digest
        if not payload:
            if self.current is not None:
                log.info("mqtt: external PV forecast withdrawn (empty retained message); "
                         "the planner uses its own forecast")
            self.current = None
            self.stats.withdrawn += 1
            return
        try:
            fc = parse_forecast_message(payload, site=self.topics.site, now=now)
            held = self.current
            if held is not None and fc.issued_at <= held.issued_at:
                raise ExternalForecastError(
                    f"replay: issued {fc.issued_at:.0f} is not after the forecast in use "
                    f"({held.issued_at:.0f}); a new forecast needs a later 'issued'",
                    "replay", fc.ref)
        except ExternalForecastError as e:
            c = self.stats.rejected
            c[e.code] = c.get(e.code, 0) + 1
            kept = ("the previous one stays in use" if self.current is not None
                    else "the own forecast stays in use")
            log.warning("mqtt: external PV forecast rejected: %s; %s", e, kept)
            self._reply(e.ref, "rejected", str(e), now)
            return
        self.current = fc
        self.stats.accepted += 1
        log.info("mqtt: external PV forecast accepted: %d points from %.0f to %.0f, issued %.0f",
                 fc.times.size, fc.times[0], fc.times[-1], fc.issued_at)
        self._reply(fc.ref, "applied", None, now)

    def _reply(self, ref: str | None, status: str, reason: str | None, now: float) -> None:
        body = messages.command_result(self.topics.site, FORECAST_COMMAND, ref, status, reason,
                                       now)
        self._out.append((self.result_topic, messages.dumps(body), False))
        del self._out[:-_MAX_REPLIES]
        self.wake.set()

    def outgoing(self) -> list[tuple[str, bytes, bool]]:
        out, self._out = self._out, []
        return out

    def requeue(self, items: list[tuple[str, bytes, bool]]) -> None:
        self._out[:0] = items
        del self._out[:-_MAX_REPLIES]

    def on_connect(self) -> None:
        pass

    def resubscribe_due(self) -> bool:
        return False


def _describe(e: BaseException) -> str:
    # 3.1.1 CONNACK 4/5, which paho reports as MQTT 5 reason codes 134/135.
    rc = getattr(e, "rc", None)
    if isinstance(e, aiomqtt.MqttCodeError) and getattr(rc, "value", rc) in (4, 5, 134, 135):
        return f"{e} (check broker.username / broker.password and the broker's ACL)"
    return str(e) or type(e).__name__


class MqttSession:
    """One long-lived MQTT presence: reconnects with backoff until :meth:`close`."""

    def __init__(self, broker: BrokerConfig, mqtt: MqttConfig, topics: Topics, outbox: Outbox,
                 on_command: CommandHandler, state_payload: Callable[[], bytes | None],
                 state_period: Callable[[], Awaitable[None]], *, window: int = 100,
                 client_id: str | None = None, envelope: EnvelopeLink | None = None,
                 now: Callable[[], float] = time.time, market: EnvelopeLink | None = None
                 ) -> None:
        self.broker = broker
        self.cfg = mqtt
        self.topics = topics
        self.outbox = outbox
        self.on_command = on_command
        self.state_payload = state_payload
        self.state_period = state_period  # awaits until the next state publication is due
        self.window = window
        self.client_id = client_id or broker.client_id or f"hems-gw-{topics.site}"
        self.envelope = envelope
        # The market agent (gateway.market_agent) speaks through the same link protocol.
        self.market = market
        # The external PV forecast topic (always subscribed: the planner uses it when it
        # forecasts PV; see docs/mqtt.md).
        self.pv_forecast = PvForecastInbox(topics)
        self._links: list[EnvelopeLink] = [link for link in (envelope, market, self.pv_forecast)
                                           if link is not None]
        self.now = now  # domain time (the gateway's clock) for envelope messages
        self.stats = MqttStats()
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._drain_deadline: float = 0.0
        self._acked = outbox.published_seq()
        self._refused: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; return after :meth:`close`."""
        delay = 0.5
        last_msg: str | None = None
        while not self._closing.is_set():
            try:
                await self._serve_once()
                delay = 0.5
                last_msg = None
            except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                raise_if_cancelling()  # a 3.11 TaskGroup puts a child's error first
                e = eg.exceptions[0]
                msg = _describe(e)
                was = self.connected.is_set()
                self.connected.clear()
                if was:
                    self.stats.disconnects += 1
                    log.warning("mqtt: connection to %s lost: %s; telemetry queues in the store",
                                self.broker.url, msg)
                else:
                    self.stats.connect_failures += 1
                    # One clear line per distinct problem, not one per retry.
                    (log.error if msg != last_msg else log.debug)(
                        "mqtt: cannot connect to %s: %s; retrying", self.broker.url, msg)
                last_msg = msg
                self.stats.last_error = msg
            if self._closing.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2.0, 30.0)
        self.connected.clear()
        self._closed.set()

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Drain what is stored (bounded), publish ``offline`` and disconnect cleanly."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self._closing.set()
        self.outbox.new_rows.set()

    async def wait_closed(self) -> None:
        """Return once :meth:`run` has finished after :meth:`close`."""
        await self._closed.wait()

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        tls_params = None
        if b.tls is not None:
            tls_params = aiomqtt.TLSParameters(ca_certs=b.tls.ca_file, certfile=b.tls.cert_file,
                                               keyfile=b.tls.key_file)
        return aiomqtt.Client(
            b.host, b.port, username=b.username, password=b.password,
            identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True, keepalive=b.keepalive_s, timeout=b.connect_timeout_s,
            will=aiomqtt.Will(self.topics.availability, OFFLINE, qos=1, retain=True),
            tls_params=tls_params, tls_insecure=(b.tls.insecure if b.tls else None),
            max_inflight_messages=self.window, logger=logging.getLogger("gateway.mqtt.paho"),
        )

    async def _serve_once(self) -> None:
        async with self._client() as client:
            client.pending_calls_threshold = self.window + 20
            await self._pub(client, self.topics.availability, ONLINE, qos=1, retain=True)
            if self.cfg.discovery:
                for topic, payload in discovery_messages(self.topics, self.cfg.discovery_prefix):
                    await self._pub(client, topic, payload, qos=1, retain=True)
            await self._sub(client, self.topics.cmd_filter)
            for env in self._links:
                for t in env.subscriptions:  # retained: the DSO's current documents arrive now
                    granted = await self._sub(client, t)
                    self._check_granted(t, granted)
                env.on_connect()
            self.stats.connects += 1
            self.connected.set()
            log.info("mqtt: connected to %s as %s", self.broker.url, self.client_id)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._commands(client))
                    tg.create_task(self._states(client))
                    for env in self._links:
                        tg.create_task(self._envelope_out(client, env))
                    drain = tg.create_task(self._drain(client))
                    await drain  # returns only when closing
                    await self._publish_state(client)
                    # A clean DISCONNECT suppresses the will, so say "offline" ourselves.
                    await self._pub(client, self.topics.availability, OFFLINE, qos=1,
                                    retain=True)
                    raise _Done
            except* _Done:
                pass

    def _check_granted(self, topic: str, granted: Any) -> None:
        # A refused SUBSCRIBE (3.1.1 return code 0x80, an ACL) is no error to paho: say it once.
        codes = granted if isinstance(granted, list | tuple) else [granted]
        if any(getattr(c, "is_failure", c == 0x80) for c in codes) and topic not in self._refused:
            self._refused.add(topic)
            log.warning("mqtt: the broker refused the subscription to %s (check its ACL); "
                        "nothing arrives on that topic", topic)

    # ------------------------------------------------------------------ tasks

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            raise_if_cancelling()
            self.outbox.new_rows.clear()
            closing = self._closing.is_set()
            if closing and time.monotonic() > self._drain_deadline:
                return
            rows = await self.outbox.fetch(self._acked, self.window)
            if not rows:
                if closing:
                    return
                await self.outbox.new_rows.wait()
                continue
            async with asyncio.TaskGroup() as tg:
                # Created in seq order, each task calls paho's publish() in its first step, so
                # the packets leave in seq order; the broker keeps per-topic order for QoS 1.
                for r in rows:
                    tg.create_task(self._pub(client, r.topic, r.payload, qos=r.qos))
            self._acked = rows[-1].seq
            self.stats.telemetry_sent += len(rows)
            self.outbox.acked(self._acked)

    async def _states(self, client: aiomqtt.Client) -> None:
        while True:
            raise_if_cancelling()
            await self._publish_state(client)
            await self.state_period()

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        payload = self.state_payload()
        if payload is not None:
            await self._pub(client, self.topics.state, payload, qos=0, retain=True)
            self.stats.state_published += 1

    async def _envelope_out(self, client: aiomqtt.Client, env: EnvelopeLink) -> None:
        """Publish the envelope's acks and status (QoS 1); re-subscribe after a flood."""
        while True:
            raise_if_cancelling()
            env.wake.clear()
            items = env.outgoing()
            for i, (topic, payload, retain) in enumerate(items):
                try:
                    await self._pub(client, topic, payload, qos=1, retain=retain)
                except BaseException:
                    env.requeue(items[i:])
                    raise
            if env.resubscribe_due():
                for t in env.subscriptions:  # the broker re-sends the retained documents
                    await self._sub(client, t)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await env.wake.wait()

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            env = next((link for link in self._links if link.wants(str(msg.topic))), None)
            if env is not None:
                raw = msg.payload
                env.on_message(str(msg.topic), raw if isinstance(raw, bytes) else
                               bytes(raw) if isinstance(raw, bytearray) else
                               str(raw if raw is not None else "").encode(), self.now())
                continue
            name = self.topics.command_name(str(msg.topic))
            if name is None:
                continue
            self.stats.commands += 1
            raw = msg.payload
            payload = raw if isinstance(raw, bytes) else (
                bytes(raw) if isinstance(raw, bytearray) else str(raw if raw is not None else
                                                                  "").encode())
            if not payload:
                # An empty payload is how a retained message is deleted, not a command.
                continue
            try:
                topic, result = await self.on_command(name, payload, bool(msg.retain))
            except Exception:
                # A handler bug must not kill the session: log it and answer nothing.
                log.exception("mqtt: command handler failed for %r", name)
                continue
            await self._pub(client, topic, result, qos=1, retain=False)

    async def _pub(self, client: aiomqtt.Client, topic: str, payload: str | bytes, *, qos: int,
                   retain: bool = False) -> None:
        await mqtt_calls.publish(client, topic, payload, qos=qos, retain=retain,
                                 timeout_s=self.broker.connect_timeout_s)

    async def _sub(self, client: aiomqtt.Client, topic: str) -> object:
        return await mqtt_calls.subscribe(client, topic, qos=1,
                                          timeout_s=self.broker.connect_timeout_s)


class _Done(Exception):
    """Internal: ends the TaskGroup after a clean close."""
