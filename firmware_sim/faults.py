"""Fault injection for one simulated device.

Kinds (each with an optional duration in *domain* seconds; without one it lasts until
:meth:`DeviceFaults.clear`):

* ``timeout``        the device stops answering (requests are swallowed, no reply is sent);
* ``exception``      every request gets a Modbus exception response with the given code;
* ``drop``           the client connection(s) are closed now; with a duration, every request
                     arriving during the window also gets its connection closed, unanswered;
* ``frozen``         registers stop updating (reads return the last values while the physics
                     moves on); writes are still accepted and act on the physics;
* ``out_of_range``   absurd values are served (e.g. inverter ``W`` = 32767, SoC 250 %);
* ``ratings_change`` the device reboots (connections dropped) and comes back with different
                     ratings (inverter ``WRtg``/``WMax``, battery ``WChaMax``); the physics
                     follows them; the originals come back when the fault ends.

Faults expire lazily: each request asks :meth:`DeviceFaults.current`, which drops what has
expired. Several kinds may be active at once (e.g. ``frozen`` and ``out_of_range``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from pymodbus.constants import ExcCodes

from drivers.clock import Clock


class FaultKind(StrEnum):
    TIMEOUT = "timeout"
    EXCEPTION = "exception"
    DROP = "drop"
    FROZEN = "frozen"
    OUT_OF_RANGE = "out_of_range"
    RATINGS_CHANGE = "ratings_change"


@dataclass(frozen=True, slots=True)
class Fault:
    """One active fault. ``until`` is a domain time, ``None`` = until cleared."""

    kind: FaultKind
    until: float | None = None
    code: ExcCodes | None = None  # exception
    values: Mapping[tuple[int, str], float] = field(default_factory=dict)  # out_of_range
    ratings: Mapping[str, float] = field(default_factory=dict)  # ratings_change


class FaultTarget(Protocol):
    """What a fault acts on (a simulated device)."""

    kind: str

    def drop_connections(self) -> int: ...

    def default_out_of_range(self) -> dict[tuple[int, str], float]: ...

    def apply_ratings(self, ratings: Mapping[str, float] | None) -> None:
        """Apply changed ratings, or restore the originals with ``None``."""
        ...

    def default_ratings_change(self) -> dict[str, float]: ...


class DeviceFaults:
    """The faults of one device, in domain time from ``clock``."""

    def __init__(self, target: FaultTarget, clock: Clock) -> None:
        self.target = target
        self.clock = clock
        self._active: dict[FaultKind, Fault] = {}
        self.injected = 0  # how many faults were injected (for reports)

    # ---- injection --------------------------------------------------------------------------
    def _until(self, duration_s: float | None) -> float | None:
        if duration_s is None:
            return None
        if not duration_s > 0:
            raise ValueError(f"fault duration must be > 0 domain seconds, got {duration_s!r}")
        return self.clock.now() + duration_s

    def _add(self, fault: Fault) -> Fault:
        self._active[fault.kind] = fault
        self.injected += 1
        return fault

    def timeout(self, duration_s: float | None = None) -> Fault:
        """Stop answering."""
        return self._add(Fault(FaultKind.TIMEOUT, self._until(duration_s)))

    def exception(
        self, code: int | ExcCodes = ExcCodes.DEVICE_FAILURE, duration_s: float | None = None
    ) -> Fault:
        """Answer every request with Modbus exception ``code``."""
        return self._add(Fault(FaultKind.EXCEPTION, self._until(duration_s), code=ExcCodes(code)))

    def drop(self, duration_s: float | None = None) -> Fault:
        """Close the client connection(s) now (and, for ``duration_s``, on every request)."""
        until = self._until(duration_s)
        fault = Fault(FaultKind.DROP, until)
        self.injected += 1
        if until is not None:
            self._active[FaultKind.DROP] = fault
        self.target.drop_connections()
        return fault

    def frozen(self, duration_s: float | None = None) -> Fault:
        """Registers stop updating."""
        return self._add(Fault(FaultKind.FROZEN, self._until(duration_s)))

    def out_of_range(
        self,
        values: Mapping[tuple[int, str], float] | None = None,
        duration_s: float | None = None,
    ) -> Fault:
        """Serve absurd values: ``{(model id, point): scaled value}``, or the device's default
        (clamped to what the register type can hold, as firmware would saturate)."""
        vals = dict(values) if values is not None else self.target.default_out_of_range()
        return self._add(Fault(FaultKind.OUT_OF_RANGE, self._until(duration_s), values=vals))

    def ratings_change(
        self,
        w_rtg: float | None = None,
        w_cha_max: float | None = None,
        duration_s: float | None = None,
    ) -> Fault:
        """Reboot with different ratings (inverter ``w_rtg``, battery ``w_cha_max``)."""
        ratings = self.target.default_ratings_change()
        if w_rtg is not None:
            ratings["w_rtg"] = float(w_rtg)
        if w_cha_max is not None:
            ratings["w_cha_max"] = float(w_cha_max)
        if not ratings:
            raise ValueError(f"{self.target.kind}: no rating to change on this device")
        fault = self._add(Fault(FaultKind.RATINGS_CHANGE, self._until(duration_s), ratings=ratings))
        self.target.apply_ratings(ratings)
        self.target.drop_connections()
        return fault

    def inject(self, kind: str, duration_s: float | None = None, **kw: object) -> Fault:
        """Inject by name (e.g. from a CLI or a test parameter)."""
        k = FaultKind(kind)
        method = getattr(self, k.value)
        return method(duration_s=duration_s, **kw)

    def clear(self, kind: str | None = None) -> None:
        """End one fault kind, or all of them."""
        kinds = list(self._active) if kind is None else [FaultKind(kind)]
        for k in kinds:
            if self._active.pop(k, None) is not None and k is FaultKind.RATINGS_CHANGE:
                self.target.apply_ratings(None)

    # ---- state ------------------------------------------------------------------------------
    def current(self) -> dict[FaultKind, Fault]:
        """The active faults (expired ones are removed first). Do not mutate."""
        if self._active:
            now = self.clock.now()
            for k in [k for k, f in self._active.items() if f.until is not None and now >= f.until]:
                self.clear(k)
        return self._active

    def has(self, kind: FaultKind) -> bool:
        return kind in self.current()
