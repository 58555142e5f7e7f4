"""aiomqtt calls that stay cancellable on Python 3.11, and a check for a lost cancellation.

Why: a task told to stop must stop, or a gateway's shutdown hangs (and a TaskGroup waits
forever for that one child; cancelling its parent again does not cancel the child again).
Python 3.11 loses a cancellation in two places a long-lived MQTT loop meets all the time:

1. ``asyncio.wait_for`` returns the inner result when the inner future completes in the same
   loop turn as the task is cancelled (fixed in 3.12). aiomqtt 2.x awaits every operation
   that has a timeout - a QoS 0 publish still waiting for its socket write included - through
   ``wait_for``. Seen in CI: the gateway's state publisher swallowed its TaskGroup's
   cancellation at shutdown and kept publishing every cycle; the gateway never returned.
   Here every call goes to aiomqtt with ``timeout=math.inf`` (a plain await) inside
   ``asyncio.timeout``, which cannot lose a cancellation.
2. A 3.11 TaskGroup gives a child's error priority over the parent's own cancellation, so a
   reconnect loop that catches the error group goes round again although it was cancelled.

A swallowed cancellation still leaves the task "cancelling" (``Task.cancelling() > 0``):
:func:`raise_if_cancelling` turns that back into ``CancelledError`` at the top of a loop.

One more 3.11 wrinkle for the guard: to report a child's error a TaskGroup cancels its parent
task and takes that cancellation back (``uncancel``) only if it lands in the ``async with``
body. A body that has already finished (only ``create_task`` calls) leaves the parent
"cancelling" for good, and the guard would then stop a healthy reconnect loop. So where the
guard is used, the TaskGroup's body awaits the session's main work itself.
"""

from __future__ import annotations

import asyncio
import math

import aiomqtt

PayloadType = str | bytes | bytearray | int | float | None


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop (see module doc)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def publish(client: aiomqtt.Client, topic: str, payload: PayloadType, *, qos: int,
                  retain: bool = False, timeout_s: float) -> None:
    """``client.publish`` bounded by ``timeout_s`` real seconds (``TimeoutError``)."""
    async with asyncio.timeout(timeout_s):
        await client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)


async def subscribe(client: aiomqtt.Client, topic: str, *, qos: int,
                    timeout_s: float) -> object:
    """``client.subscribe`` bounded by ``timeout_s`` real seconds; returns what aiomqtt
    returns (the granted QoS or reason codes)."""
    async with asyncio.timeout(timeout_s):
        return await client.subscribe(topic, qos=qos, timeout=math.inf)


async def unsubscribe(client: aiomqtt.Client, topic: str, *, timeout_s: float) -> None:
    """``client.unsubscribe`` bounded by ``timeout_s`` real seconds."""
    async with asyncio.timeout(timeout_s):
        await client.unsubscribe(topic, timeout=math.inf)
