"""One injected source of domain time.

Everything that waits for, or stamps, *domain* time (control cycles, revert timers, envelope
starts, market intervals, simulated physics) takes it from a :class:`Clock`. Production uses
:class:`WallClock`; simulation runs the very same code on :class:`SimClock`, which runs
``speed`` times faster than real time. I/O timeouts (a Modbus reply, a broker connect) stay in
*real* seconds: a device on a wire does not answer faster because the simulation is accelerated.

It lives in ``drivers`` because that is the lowest layer: ``gateway``, ``firmware_sim`` and
``community`` may all import it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Domain time in Unix seconds (float)."""

    def now(self) -> float:
        """Current domain time, Unix seconds."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once :meth:`now` >= ``t`` (immediately if already past)."""
        ...

    async def sleep(self, dt: float) -> None:
        """Sleep ``dt`` domain seconds."""
        ...

    @property
    def speed(self) -> float:
        """Domain seconds per real second (1.0 for the wall clock)."""
        ...


class WallClock:
    """The real clock. ``speed`` is 1."""

    speed = 1.0

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def sleep(self, dt: float) -> None:
        await asyncio.sleep(max(0.0, dt))


class SimClock:
    """Accelerated clock: domain time = ``start + speed * (monotonic - t0)``.

    Several processes can share one simulated timeline by passing the same ``start`` and
    ``speed`` and a common real ``epoch`` (a ``time.time()`` value): domain time is then
    ``start + speed * (time.time() - epoch)``. If a loop cannot keep up, domain time still moves
    on (as it would for a slow controller in the field); nothing pretends the loop was faster.
    """

    def __init__(self, start: float, speed: float = 60.0, epoch: float | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"SimClock speed must be > 0, got {speed!r}")
        self.start = float(start)
        self._speed = float(speed)
        self.epoch = time.time() if epoch is None else float(epoch)
        # Map the shared wall epoch onto the monotonic clock once, so a wall-clock jump on the
        # host does not move simulated time.
        self._mono0 = time.monotonic() - (time.time() - self.epoch)

    @property
    def speed(self) -> float:
        return self._speed

    def now(self) -> float:
        return self.start + self._speed * (time.monotonic() - self._mono0)

    async def sleep_until(self, t: float) -> None:
        delay = (t - self.now()) / self._speed
        if delay > 0:
            await asyncio.sleep(delay)

    async def sleep(self, dt: float) -> None:
        await asyncio.sleep(max(0.0, dt) / self._speed)
