"""Owns the daemon's long-running tasks: restart with backoff, give up loudly.

Each task runs inside one :class:`asyncio.TaskGroup`. A task that raises is logged and restarted
after an exponential backoff (real seconds: it is about I/O recovering, not domain time). A task
that fails more than ``max_restarts`` times within ``window_s``, or raises :class:`Unrecoverable`,
takes the whole group down: :meth:`Supervisor.run` raises :class:`Unrecoverable` and the daemon
exits non-zero so systemd restarts the service (``Restart=on-failure``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Unrecoverable(Exception):
    """A failure that restarting the task will not fix; the process must exit non-zero."""


class _Stopped(Exception):
    """Internal: raised inside the group to cancel every task on a requested stop."""


@dataclass(frozen=True)
class TaskSpec:
    """One supervised task. ``run`` is called again on every restart."""

    name: str
    run: Callable[[], Awaitable[None]]
    max_restarts: int = 10
    window_s: float = 300.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0


class Supervisor:
    """Runs :class:`TaskSpec` s until they all return, ``stop`` is set, or one fails for good.

    A task that returns normally is finished (not restarted): that is how the daemon's tasks
    end after their orderly shutdown. ``stop`` is the hard stop that cancels whatever is left.
    """

    def __init__(self, specs: list[TaskSpec], stop: asyncio.Event,
                 on_restart: Callable[[str, BaseException], None] | None = None) -> None:
        self.specs = specs
        self.stop = stop
        self.on_restart = on_restart
        self.restarts: dict[str, int] = {s.name: 0 for s in specs}

    async def run(self) -> None:
        """Return when every task has returned, or at once when ``stop`` is set (remaining
        tasks cancelled); raise :class:`Unrecoverable` on a failure restarts cannot fix."""
        remaining = len(self.specs)
        stopper: asyncio.Task[None] | None = None

        async def keep(spec: TaskSpec) -> None:
            nonlocal remaining
            try:
                await self._keep(spec)
            finally:
                remaining -= 1
                if remaining == 0 and stopper is not None:
                    stopper.cancel()

        try:
            async with asyncio.TaskGroup() as tg:
                for spec in self.specs:
                    tg.create_task(keep(spec), name=spec.name)
                stopper = tg.create_task(self._wait_stop(), name="stop")
        except BaseExceptionGroup as eg:
            _, rest = eg.split(_Stopped)
            if rest is None:
                return
            first = _first_leaf(rest)
            if isinstance(first, Unrecoverable):
                raise first from None
            if isinstance(first, Exception):
                raise Unrecoverable(f"supervisor: {first!r}") from first
            raise first from None

    async def _wait_stop(self) -> None:
        await self.stop.wait()
        raise _Stopped

    async def _keep(self, spec: TaskSpec) -> None:
        failures: deque[float] = deque()
        delay = spec.backoff_s
        while True:
            started = time.monotonic()
            try:
                await spec.run()
                return
            except (Unrecoverable, asyncio.CancelledError):
                raise
            except Exception as e:
                now = time.monotonic()
                failures.append(now)
                while failures and failures[0] < now - spec.window_s:
                    failures.popleft()
                if len(failures) > spec.max_restarts:
                    log.error("task %s failed %d times within %.0f s; giving up: %r",
                              spec.name, len(failures), spec.window_s, e)
                    raise Unrecoverable(f"task {spec.name} failed {len(failures)} times within "
                                        f"{spec.window_s:.0f} s; last error: {e!r}") from e
                if now - started > 60.0:
                    delay = spec.backoff_s  # it ran fine for a while: start the backoff over
                self.restarts[spec.name] += 1
                log.error("task %s failed (%r); restart %d in %.1f s", spec.name, e,
                          self.restarts[spec.name], delay, exc_info=e)
                if self.on_restart is not None:
                    self.on_restart(spec.name, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2.0, spec.backoff_max_s)


def _first_leaf(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e
