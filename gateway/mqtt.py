"""The gateway's MQTT session: availability + LWT, HA discovery, store-and-forward telemetry,
retained state, and commands.

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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiomqtt

from gateway.config import BrokerConfig, MqttConfig
from gateway.hass import discovery_messages
from gateway.messages import OFFLINE, ONLINE, Topics
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
        self._links = [link for link in (envelope, market) if link is not None]
        self.now = now  # domain time (the gateway's clock) for envelope messages
        self.stats = MqttStats()
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._drain_deadline: float = 0.0
        self._acked = outbox.published_seq()

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
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
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
            await client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
            if self.cfg.discovery:
                for topic, payload in discovery_messages(self.topics, self.cfg.discovery_prefix):
                    await client.publish(topic, payload, qos=1, retain=True)
            await client.subscribe(self.topics.cmd_filter, qos=1)
            for env in self._links:
                for t in env.subscriptions:  # retained: the DSO's current documents arrive now
                    await client.subscribe(t, qos=1)
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
                    await client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
                    raise _Done
            except* _Done:
                pass

    # ------------------------------------------------------------------ tasks

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
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
                    tg.create_task(client.publish(r.topic, r.payload, qos=r.qos))
            self._acked = rows[-1].seq
            self.stats.telemetry_sent += len(rows)
            self.outbox.acked(self._acked)

    async def _states(self, client: aiomqtt.Client) -> None:
        while True:
            await self._publish_state(client)
            await self.state_period()

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        payload = self.state_payload()
        if payload is not None:
            await client.publish(self.topics.state, payload, qos=0, retain=True)
            self.stats.state_published += 1

    async def _envelope_out(self, client: aiomqtt.Client, env: EnvelopeLink) -> None:
        """Publish the envelope's acks and status (QoS 1); re-subscribe after a flood."""
        while True:
            env.wake.clear()
            items = env.outgoing()
            for i, (topic, payload, retain) in enumerate(items):
                try:
                    await client.publish(topic, payload, qos=1, retain=retain)
                except BaseException:
                    env.requeue(items[i:])
                    raise
            if env.resubscribe_due():
                for t in env.subscriptions:  # the broker re-sends the retained documents
                    await client.subscribe(t, qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(env.wake.wait(), timeout=1.0)

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
            await client.publish(topic, result, qos=1, retain=False)


class _Done(Exception):
    """Internal: ends the TaskGroup after a clean close."""
