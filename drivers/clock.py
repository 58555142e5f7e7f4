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
import multiprocessing as mp
import time
from typing import Any, Protocol, runtime_checkable


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


def grid_slot(t: float, period_s: float, phase_s: float | None) -> float:
    """The latest time at or before ``t`` on the grid ``phase_s + k * period_s`` (``t`` itself
    without a phase): where periodic work anchors so that many loops started together do not
    all run at the same instant."""
    return t if phase_s is None else t - (t - phase_s) % period_s


class TimeHold:
    """Real seconds during which a shared simulated timeline stood still, shared by processes.

    Create it in the parent and hand it to child processes when they start (``multiprocessing``
    arguments; it cannot travel through a pipe later). Any process may :meth:`add` to it; every
    :class:`SimClock` built with it subtracts :attr:`seconds` from the real time it scales.
    """

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._value: Any = ctx.RawValue("d", 0.0)  # read without the lock: one aligned double
        self._lock: Any = ctx.Lock()

    @property
    def seconds(self) -> float:
        return float(self._value.value)

    def add(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._value.value += seconds


class SimClock:
    """Accelerated clock: domain time = ``start + speed * (monotonic - t0)``.

    Several processes can share one simulated timeline by passing the same ``start`` and
    ``speed`` and a common real ``epoch`` (a ``time.time()`` value): domain time is then
    ``start + speed * (time.time() - epoch)``. If a loop cannot keep up, domain time still moves
    on (as it would for a slow controller in the field); nothing pretends the loop was faster.

    With a :class:`TimeHold` (``hold``), domain time is ``start + speed * (real - hold)``: a
    :func:`govern` task that sees its event loop fall behind holds the timeline for everyone
    sharing it, so a simulation slows down when the CPU is short instead of letting domain time
    run on without its controllers. ``speed`` is then the most it runs at. Domain time never goes
    back in a process (a hold added after this process read a later time freezes it until the
    timeline catches up).
    """

    def __init__(self, start: float, speed: float = 60.0, epoch: float | None = None,
                 hold: TimeHold | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"SimClock speed must be > 0, got {speed!r}")
        self.start = float(start)
        self._speed = float(speed)
        self.epoch = time.time() if epoch is None else float(epoch)
        # Map the shared wall epoch onto the monotonic clock once, so a wall-clock jump on the
        # host does not move simulated time.
        self._mono0 = time.monotonic() - (time.time() - self.epoch)
        self.hold = hold
        self._last = -float("inf")

    @property
    def speed(self) -> float:
        return self._speed

    def now(self) -> float:
        return self.start + self._speed * (self.monotonic() - self._mono0)

    def monotonic(self) -> float:
        """Real seconds as this timeline counts them: ``time.monotonic()`` less the time held
        (never going back in this process). Domain time advances ``speed`` times this."""
        if self.hold is None:
            return time.monotonic()
        r = time.monotonic() - self.hold.seconds
        if r < self._last:
            return self._last
        self._last = r
        return r

    async def sleep_until(self, t: float) -> None:
        while True:  # a hold added while asleep means waking early: sleep again
            delay = (t - self.now()) / self._speed
            if delay <= 0:
                return
            await asyncio.sleep(delay)
            if self.hold is None:
                return

    async def sleep(self, dt: float) -> None:
        if self.hold is None:
            await asyncio.sleep(max(0.0, dt) / self._speed)
        else:
            await self.sleep_until(self.now() + max(0.0, dt))


async def govern(hold: TimeHold, period_s: float = 0.01, slack_s: float = 0.002) -> None:
    """Hold the shared timeline while this process' event loop is behind (runs until cancelled).

    Every ``period_s`` real seconds it measures how late its own wake-up was; a lateness beyond
    ``slack_s`` means the loop (or the CPU) was busy with other work, and every task of this
    process was delayed as much: the timeline is held for the excess, so the delay is not domain
    time lost by the controllers. What other processes held meanwhile counts as held for this
    one too (two processes behind at once hold the timeline once, not twice). ``slack_s`` is the
    delay a simulation accepts without holding (about one domain second: a slow reply)."""
    while True:
        t0, h0 = time.monotonic(), hold.seconds
        await asyncio.sleep(period_s)
        lag = time.monotonic() - t0 - period_s
        extra = lag - (hold.seconds - h0) - slack_s
        if extra > 0:
            hold.add(extra)
