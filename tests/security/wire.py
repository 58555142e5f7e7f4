"""Test clients for the secured broker, and a bounded "everything up to the marker" reader.

Why a marker proves a negative: Mosquitto 2.0 drops an unauthorised PUBLISH silently (MQTT 3.1.1
gets a PUBACK anyway) and grants every SUBSCRIBE, filtering at delivery. So each negative test
(1) subscribes, (2) has the attacker publish at QoS 1 and waits for each PUBACK, (3) has a
permitted client publish a *marker* at QoS 1, and (4) reads until the marker arrives. The broker
queues a message to its subscribers before it sends the PUBACK, so anything the attacker got
through is already queued ahead of the marker: once the marker is in, nothing is still on its
way, and a missing marker fails the test (it cannot pass vacuously).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .broker import SecureBroker

WAIT_S = 10.0  # bound on every wait for a marker (real seconds; generous for a loaded CI box)


def client(broker: SecureBroker, user: str | None, *, password: str | None = None,
           v5: bool = False, tls: bool = False, ca_file: str | None = None,
           hostname: str | None = None, ident: str | None = None,
           certfile: str | None = None, keyfile: str | None = None) -> aiomqtt.Client:
    """A client logged in as ``user`` with its password (unless ``password`` overrides it).

    ``tls=True`` connects to the TLS listener and verifies the broker against ``ca_file``
    (default: the test CA; pass ``ca_file=""`` for the system's default trust store)."""
    if password is None and user is not None:
        password = broker.passwords[user]
    kw: dict[str, Any] = {}
    port = broker.plain_port
    if tls:
        port = broker.tls_port
        ctx = ssl.create_default_context(cafile=str(broker.ca_file) if ca_file is None
                                         else ca_file or None)
        if certfile is not None:
            ctx.load_cert_chain(certfile, keyfile)
        kw["tls_context"] = ctx
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        kw.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, properties=props)
    else:
        kw.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    return aiomqtt.Client(hostname or broker.host, port, username=user, password=password,
                          identifier=ident or f"test-{user or 'anon'}-{id(kw):x}",
                          timeout=WAIT_S, **kw)


async def read_until(c: aiomqtt.Client, markers: set[tuple[str, bytes]],
                     wait_s: float = WAIT_S) -> list[tuple[str, bytes]]:
    """Every ``(topic, payload)`` received until all ``markers`` have arrived (they included).

    Raises AssertionError naming the missing markers if they do not all arrive in ``wait_s``."""
    got: list[tuple[str, bytes]] = []
    pending = set(markers)

    async def reader() -> None:
        async for m in c.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            item = (str(m.topic), payload)
            got.append(item)
            pending.discard(item)
            if not pending:
                return

    try:
        await asyncio.wait_for(reader(), wait_s)
    except TimeoutError:
        raise AssertionError(f"marker(s) never arrived: {sorted(pending)}; got {got}") from None
    return got


async def publish_all(c: aiomqtt.Client, items: list[tuple[str, bytes]], *,
                      retain: bool = False) -> None:
    """Publish each at QoS 1, waiting for every PUBACK (see the module docstring)."""
    for topic, payload in items:
        await c.publish(topic, payload, qos=1, retain=retain, timeout=WAIT_S)
