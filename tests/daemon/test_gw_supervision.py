"""sd_notify over a real AF_UNIX datagram socket, and the supervisor's restart policy."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from gateway.sdnotify import Notifier
from gateway.supervisor import Supervisor, TaskSpec, Unrecoverable


def test_sd_notify_sends_datagrams_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000"})
        assert n.enabled and n.watchdog_s == 20.0
        assert n.ready("running")
        assert srv.recv(4096) == b"READY=1\nSTATUS=running"
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"
        n.close()
    finally:
        srv.close()


def test_sd_notify_abstract_namespace() -> None:
    name = f"hems-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.stopping()
        assert srv.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    finally:
        srv.close()


def test_sd_notify_is_a_noop_outside_systemd_and_ignores_foreign_watchdog() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and n.watchdog_s is None
    n = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})  # not our pid
    assert n.watchdog_s is None


def test_sd_notify_survives_a_vanished_socket(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready("x") and n.failed == 1  # logged, not raised


async def test_supervisor_restarts_a_failing_task_with_backoff() -> None:
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        done.set()

    seen: list[str] = []
    sup = Supervisor([TaskSpec("flaky", flaky, backoff_s=0.01)], asyncio.Event(),
                     on_restart=lambda name, e: seen.append(f"{name}: {e}"))
    await asyncio.wait_for(sup.run(), 5)
    assert runs == 3 and done.is_set()
    assert seen == ["flaky: boom 1", "flaky: boom 2"]
    assert sup.restarts == {"flaky": 2}


async def test_supervisor_gives_up_and_cancels_the_others() -> None:
    cancelled = asyncio.Event()

    async def broken() -> None:
        raise OSError("device tree gone")

    async def healthy() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sup = Supervisor([TaskSpec("broken", broken, max_restarts=2, backoff_s=0.01),
                      TaskSpec("healthy", healthy)], asyncio.Event())
    with pytest.raises(Unrecoverable, match="broken failed 3 times"):
        await asyncio.wait_for(sup.run(), 5)
    assert cancelled.is_set()


async def test_supervisor_unrecoverable_is_not_restarted() -> None:
    runs = 0

    async def fatal() -> None:
        nonlocal runs
        runs += 1
        raise Unrecoverable("disk gone")

    with pytest.raises(Unrecoverable, match="disk gone"):
        await asyncio.wait_for(Supervisor([TaskSpec("fatal", fatal)], asyncio.Event()).run(), 5)
    assert runs == 1


async def test_supervisor_hard_stop_cancels_everything() -> None:
    stop = asyncio.Event()

    async def forever() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(Supervisor([TaskSpec("a", forever), TaskSpec("b", forever)],
                                          stop).run())
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)  # returns normally
