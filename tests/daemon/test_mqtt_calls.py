"""Cancellation that sticks on Python 3.11 (gateway/mqtt_calls.py).

The CI run that hung for 90 minutes: at a gateway's shutdown the MQTT state publisher swallowed
its TaskGroup's cancellation inside ``asyncio.wait_for`` (aiomqtt's timeouts) and kept going, so
the TaskGroup, the supervisor and the gateway never returned. These tests pin the two 3.11
behaviours and show the loops' guard turns them back into a cancellation.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiomqtt
import pytest

from gateway import mqtt_calls
from gateway.mqtt_calls import raise_if_cancelling


async def _retry_loop(rounds: list[int], started: asyncio.Event, guard: bool,
                      closing: asyncio.Event) -> None:
    """A reconnect loop like the gateway's: a session TaskGroup whose child fails as the
    connection is torn down, caught, and the loop goes round."""

    async def session_child() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionError("connection lost while stopping") from None

    while not closing.is_set():
        rounds.append(1)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session_child())
        except* ConnectionError:
            if guard:
                raise_if_cancelling()
        await asyncio.sleep(0)


@pytest.mark.parametrize("guard", [True, False])
async def test_a_retry_loop_stops_when_cancelled_although_its_session_failed(guard: bool
                                                                            ) -> None:
    rounds: list[int] = []
    started = asyncio.Event()
    closing = asyncio.Event()  # how the unguarded loop is ended at all
    task = asyncio.create_task(_retry_loop(rounds, started, guard, closing))
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    if guard:
        assert task in done and task.cancelled() and len(rounds) == 1
    else:
        # Python 3.11: the child's error wins over the parent's cancellation; the loop goes on
        # (3.12+ may differ: then there is nothing to guard against)
        if sys.version_info < (3, 12):
            assert not done and len(rounds) > 1
        closing.set()
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)
        assert task.done()


async def test_a_cancellation_swallowed_by_wait_for_is_caught_at_the_next_round() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    passes: list[str] = []

    async def loop() -> None:
        while True:
            raise_if_cancelling()
            passes.append("round")
            if len(passes) == 1:
                await asyncio.wait_for(fut, 10)  # completes in the turn it is cancelled
            else:
                await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    fut.set_result(1)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    assert task in done and task.cancelled()
    assert len(passes) <= 2  # 3.11 swallows in wait_for: one more round, then the guard


async def test_calls_reach_a_real_broker_and_time_out_in_real_seconds(mosquitto: Any) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="calls-a") as sub, \
            aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="calls-b") as pub:
        assert await mqtt_calls.subscribe(sub, "t/calls", qos=1, timeout_s=5.0) is not None
        await mqtt_calls.publish(pub, "t/calls", b"hello", qos=1, timeout_s=5.0)
        async with asyncio.timeout(5.0):
            msg = await anext(aiter(sub.messages))
        assert msg.payload == b"hello"
        await mqtt_calls.unsubscribe(sub, "t/calls", timeout_s=5.0)
        mosquitto.kill()  # no PUBACK will ever come
        with pytest.raises((TimeoutError, aiomqtt.MqttError)):
            await mqtt_calls.publish(pub, "t/calls", b"lost", qos=1, timeout_s=0.5)


async def test_the_guard_lets_a_reconnect_loop_retry_after_its_session_failed() -> None:
    """A session whose child fails on its own (the broker went away) is retried: the guard
    fires only for a cancellation of the loop itself (the TaskGroup's body awaits its work,
    as the module doc asks)."""
    rounds: list[int] = []

    async def loop() -> None:
        while len(rounds) < 3:
            rounds.append(1)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_fail_soon())
                    await asyncio.sleep(30)  # the session's main work
            except* ConnectionError:
                raise_if_cancelling()

    async def _fail_soon() -> None:
        await asyncio.sleep(0.01)
        raise ConnectionError("broker gone")

    await asyncio.wait_for(loop(), 5.0)
    assert len(rounds) == 3
