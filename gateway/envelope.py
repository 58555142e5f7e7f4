"""Dynamic operating envelopes: the DSO's controls, validated, scheduled and resolved to limits.

Semantics follow CSIP-AUS (the IEEE 2030.5 profile used by Australian DSOs), carried over MQTT.
Pure: no I/O, no clock. Every function that needs the time takes ``now`` (Unix seconds, from the
daemon's injected ``Clock``).

Limits (all W, ``>= 0``; ``None`` = not limited by this control):

* ``export_w``     -- site export at the connection point (CSIP-AUS ``opModExpLimW``);
* ``import_w``     -- site import at the connection point (``opModImpLimW``);
* ``generation_w`` -- gross generation of the controlled DER: PV AC output + battery discharge
  (``opModGenLimW``);
* ``load_w``       -- consumption of the controlled DER: battery charging (``opModLoadLimW``).
  The household's own loads are not controllable and are never "limited" by it.

Rules (the contract; docs/architecture.md and docs/mqtt.md quote them):

1. **Per-limit scheduling.** As in IEEE 2030.5 DER controls, each of the four limits is scheduled
   on its own: two controls overlap only if their windows ``[start, start + duration_s)``
   intersect *and* both set the same limit. A control that sets only ``import_w`` does not touch
   an export limit set by another control.
2. **Supersede.** For two overlapping controls (rule 1), the one with the newer ``created`` governs
   that limit; the older one loses that limit for its *whole* window (2030.5 "superseded", not
   trimmed) -- and keeps governing its other limits. Supersession is permanent: an older control
   never governs a limit in a window for which a newer control for that limit was ever received,
   even if that newer one was itself superseded later. Equal ``created`` with different ids: the
   more restrictive value wins; equal values, the smaller id wins (deterministic).
3. **Replay / update.** A control whose id is already held (including superseded ones, until
   their end) is: a ``"duplicate"`` (ignored, not an error) if it is identical -- retained MQTT
   messages are re-delivered on every reconnect; an ``"updated"`` version replacing the held one
   if its ``created`` is strictly newer; otherwise rejected as a replay (code ``"replay"``). A
   control that has already ended is rejected by :func:`parse_control` (code ``"expired"``), so
   replay protection survives expiry, and restarts (the schedule is persisted with ``to_json``).
   The default control follows the same rule against the held default, whatever its id.
4. **Resolution** (:meth:`Schedule.active`), per limit: the control whose window covers ``now`` and
   that governs that limit; else the DSO's default control, if it sets that limit; else the
   configured fallback (the connection agreement's safe limit; ``None`` = unlimited).
5. **Contact loss** (CSIP-AUS): losing contact changes nothing by itself: held controls run to
   their end, then the default applies, then (no default) the fallback. Optionally
   (``contact_timeout_s``, default off = pure CSIP-AUS), after that long without contact every
   limit becomes the *tighter* of rule 4's value and the fallback -- it can only tighten.
6. **Expiry.** :meth:`Schedule.expire` drops controls whose window has ended; :meth:`active`
   ignores them even before that.
7. **Ramp.** A loosening limit moves up at ``ramp_pct_per_min`` (AS/NZS 4777.2: 16 %/min) of the
   site's DER rating; tightening is immediate (:func:`ramp_limit`, :class:`LimitRamp`).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal

LIMIT_NAMES: Final = ("export_w", "import_w", "generation_w", "load_w")
LimitName = Literal["export_w", "import_w", "generation_w", "load_w"]
Source = Literal["control", "default", "fallback"]
AddResult = Literal["added", "updated", "duplicate"]

_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CONTROL_KEYS: Final = frozenset(("id", "site", "created", "start", "duration_s", *LIMIT_NAMES))
_DEFAULT_KEYS: Final = frozenset(("id", "site", "created", *LIMIT_NAMES))
_FORMAT: Final = 1  # version of the to_json layout
_DAY: Final = 86400.0


class EnvelopeRejected(ValueError):
    """An envelope message (or a restore) was refused. ``code`` is short and countable
    (``type``, ``missing``, ``unknown_field``, ``id``, ``site``, ``non_finite``, ``negative``,
    ``absurd``, ``created``, ``start``, ``duration``, ``expired``, ``no_limit``, ``replay``,
    ``capacity``, ``corrupt``); ``reason`` is the human sentence naming what was wrong."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """The four envelope limits in W; ``None`` means not limited."""

    export_w: float | None = None
    import_w: float | None = None
    generation_w: float | None = None
    load_w: float | None = None

    def get(self, name: str) -> float | None:
        """The limit called ``name`` (one of ``LIMIT_NAMES``)."""
        value: float | None = getattr(self, name)
        return value

    def tighter(self, other: Limits) -> Limits:
        """Per limit, the more restrictive of the two (``None`` = unlimited)."""
        return Limits(**{n: _min_opt(self.get(n), other.get(n)) for n in LIMIT_NAMES})

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready mapping of the four limits."""
        return {n: self.get(n) for n in LIMIT_NAMES}


@dataclass(frozen=True, slots=True)
class Control:
    """One DSO control (a 2030.5 DERControl): limits in force during ``[start, start+duration_s)``.

    ``created`` (Unix s) is the version: newer wins (module rules 2-3)."""

    id: str
    site: str
    created: float
    start: float
    duration_s: float
    export_w: float | None = None
    import_w: float | None = None
    generation_w: float | None = None
    load_w: float | None = None

    @property
    def end(self) -> float:
        """First instant after the window."""
        return self.start + self.duration_s

    @property
    def limits(self) -> Limits:
        """The limits this control sets."""
        return Limits(self.export_w, self.import_w, self.generation_w, self.load_w)

    def covers(self, t: float) -> bool:
        """True while ``t`` is inside the window (start inclusive, end exclusive)."""
        return self.start <= t < self.end

    def overlaps(self, other: Control) -> bool:
        """True if the two windows intersect (limits not considered)."""
        return self.start < other.end and other.start < self.end

    def to_dict(self) -> dict[str, Any]:
        """The wire/persisted form (``parse_control`` accepts it back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class DefaultControl:
    """The DSO's default control (2030.5 DefaultDERControl): applies when no control governs a
    limit, and survives loss of contact indefinitely (module rule 5)."""

    id: str
    site: str
    created: float
    export_w: float | None = None
    import_w: float | None = None
    generation_w: float | None = None
    load_w: float | None = None

    @property
    def limits(self) -> Limits:
        """The limits this default sets."""
        return Limits(self.export_w, self.import_w, self.generation_w, self.load_w)

    def to_dict(self) -> dict[str, Any]:
        """The wire/persisted form (``parse_default`` accepts it back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class EnvelopeConfig:
    """Validation bounds and safety settings (from the gateway's TOML config)."""

    max_limit_w: float = 1_000_000.0  # anything above is a unit error for a house (e.g. kW vs W)
    max_duration_s: float = 366 * _DAY  # "one year", leap-proof
    max_start_past_s: float = 366 * _DAY
    max_start_future_s: float = 366 * _DAY
    max_clock_skew_s: float = 300.0  # a control "created" further ahead would win every contest
    max_controls: int = 2000  # held controls (incl. superseded, until they end): flood bound
    fallback: Limits = field(default_factory=lambda: Limits(export_w=1500.0))
    contact_timeout_s: float | None = None  # None = pure CSIP-AUS (rule 5)
    ramp_pct_per_min: float = 16.0  # AS/NZS 4777.2 default

    def __post_init__(self) -> None:
        for name in ("max_limit_w", "max_duration_s", "max_start_past_s", "max_start_future_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"EnvelopeConfig.{name} must be finite and > 0, got {v!r}")
        if not (math.isfinite(self.max_clock_skew_s) and self.max_clock_skew_s >= 0):
            raise ValueError(
                f"EnvelopeConfig.max_clock_skew_s must be >= 0, got {self.max_clock_skew_s!r}"
            )
        if self.max_controls < 1:
            raise ValueError(f"EnvelopeConfig.max_controls must be >= 1, got {self.max_controls}")
        for n in LIMIT_NAMES:
            v = self.fallback.get(n)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(
                    f"EnvelopeConfig.fallback.{n} must be None or finite >= 0, got {v!r}"
                )
        t = self.contact_timeout_s
        if t is not None and not (math.isfinite(t) and t > 0):
            raise ValueError(f"EnvelopeConfig.contact_timeout_s must be None or > 0, got {t!r}")
        if not (math.isfinite(self.ramp_pct_per_min) and self.ramp_pct_per_min > 0):
            raise ValueError(
                f"EnvelopeConfig.ramp_pct_per_min must be > 0, got {self.ramp_pct_per_min!r}"
            )


DEFAULT_CONFIG: Final = EnvelopeConfig()


@dataclass(frozen=True, slots=True)
class ActiveLimits:
    """What applies now, and where each limit comes from.

    ``sources``/``origins`` are per limit in ``LIMIT_NAMES`` order (origin = the control or
    default id, ``None`` for the fallback). ``source`` summarises: ``"control"`` if any limit comes
    from a control, else ``"default"`` if any from the default, else ``"fallback"``.
    ``next_change`` is the earliest future time at which the resolution may change (a window
    starting or ending, or the contact timeout), or ``None``."""

    limits: Limits
    source: Source
    sources: tuple[Source, Source, Source, Source]
    origins: tuple[str | None, str | None, str | None, str | None]
    contact_lost: bool = False
    next_change: float | None = None
    ramping: bool = False

    @property
    def control_ids(self) -> tuple[str, ...]:
        """Ids of the controls contributing at least one limit (sorted, no repeats)."""
        ids = {o for s, o in zip(self.sources, self.origins, strict=True) if s == "control" and o}
        return tuple(sorted(ids))


# --- validation -------------------------------------------------------------------------------


def _min_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _number(obj: Mapping[str, Any], key: str, *, required: bool) -> float | None:
    if key not in obj or obj[key] is None:
        if required:
            raise EnvelopeRejected("missing", f"field '{key}' is missing")
        return None
    v = obj[key]
    # bool is an int in Python; true/false is never a power or a time.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise EnvelopeRejected("type", f"field '{key}' must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise EnvelopeRejected("absurd", f"field '{key}' is too large ({v})") from None
    if not math.isfinite(f):
        raise EnvelopeRejected("non_finite", f"field '{key}' is not finite ({f})")
    return f


def _string(obj: Mapping[str, Any], key: str) -> str:
    if key not in obj or obj[key] is None:
        raise EnvelopeRejected("missing", f"field '{key}' is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise EnvelopeRejected("type", f"field '{key}' must be a string, got {type(v).__name__}")
    return v


def _common(
    obj: object, site: str, now: float, config: EnvelopeConfig, allowed: frozenset[str], what: str
) -> tuple[str, float, dict[str, float | None]]:
    """Checks shared by controls and defaults; returns (id, created, limits)."""
    if not isinstance(obj, Mapping):
        raise EnvelopeRejected("type", f"{what} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        # A typo ("export_kw") would otherwise read as "not limited": refuse, never loosen.
        raise EnvelopeRejected("unknown_field", f"{what} has unknown field(s) {', '.join(unknown)}")
    cid = _string(obj, "id")
    if not _ID_RE.fullmatch(cid):
        raise EnvelopeRejected(
            "id", f"{what} id {cid[:80]!r} must be 1-64 chars of A-Z a-z 0-9 . _ : -"
        )
    got_site = _string(obj, "site")
    if got_site != site:
        raise EnvelopeRejected("site", f"{what} {cid} is for site {got_site[:80]!r}, not {site!r}")
    created = _number(obj, "created", required=True)
    assert created is not None
    if created <= 0:
        raise EnvelopeRejected(
            "created", f"{what} {cid} created {created} is not a positive Unix time"
        )
    if created > now + config.max_clock_skew_s:
        raise EnvelopeRejected(
            "created",
            f"{what} {cid} created {created:.0f} is {created - now:.0f} s in the future "
            f"(max clock skew {config.max_clock_skew_s:.0f} s)",
        )
    limits: dict[str, float | None] = {}
    for n in LIMIT_NAMES:
        v = _number(obj, n, required=False)
        if v is not None:
            if v < 0:
                raise EnvelopeRejected("negative", f"{what} {cid} {n} = {v} W is negative")
            if v > config.max_limit_w:
                raise EnvelopeRejected(
                    "absurd",
                    f"{what} {cid} {n} = {v:.0f} W exceeds the maximum {config.max_limit_w:.0f} W",
                )
        limits[n] = v
    if all(v is None for v in limits.values()):
        raise EnvelopeRejected("no_limit", f"{what} {cid} sets none of {', '.join(LIMIT_NAMES)}")
    return cid, created, limits


def parse_control(
    obj: object, site: str, now: float, config: EnvelopeConfig = DEFAULT_CONFIG
) -> Control:
    """Validate a control message body (the signature already checked and removed).

    Keys: ``id`` (1-64 of ``[A-Za-z0-9._:-]``), ``site``, ``created``, ``start`` (Unix s),
    ``duration_s`` and at least one of the four limits (W; absent or ``null`` = not limited).
    Raises :class:`EnvelopeRejected` naming the first problem found."""
    cid, created, limits = _common(obj, site, now, config, _CONTROL_KEYS, "control")
    assert isinstance(obj, Mapping)
    start = _number(obj, "start", required=True)
    duration = _number(obj, "duration_s", required=True)
    assert start is not None and duration is not None
    if duration <= 0:
        raise EnvelopeRejected("duration", f"control {cid} duration_s = {duration} must be > 0")
    if duration > config.max_duration_s:
        raise EnvelopeRejected(
            "duration",
            f"control {cid} duration_s = {duration:.0f} exceeds the maximum "
            f"{config.max_duration_s:.0f} s",
        )
    if start < now - config.max_start_past_s:
        raise EnvelopeRejected(
            "start",
            f"control {cid} start is {now - start:.0f} s in the past "
            f"(max {config.max_start_past_s:.0f} s)",
        )
    if start > now + config.max_start_future_s:
        raise EnvelopeRejected(
            "start",
            f"control {cid} start is {start - now:.0f} s in the future "
            f"(max {config.max_start_future_s:.0f} s)",
        )
    if start + duration <= now:
        raise EnvelopeRejected(
            "expired", f"control {cid} ended {now - (start + duration):.0f} s ago"
        )
    return Control(id=cid, site=site, created=created, start=start, duration_s=duration, **limits)


def parse_default(
    obj: object, site: str, now: float, config: EnvelopeConfig = DEFAULT_CONFIG
) -> DefaultControl:
    """Validate a default-control message body: ``id``, ``site``, ``created`` and at least one
    limit. Raises :class:`EnvelopeRejected`."""
    cid, created, limits = _common(obj, site, now, config, _DEFAULT_KEYS, "default")
    return DefaultControl(id=cid, site=site, created=created, **limits)


# --- the schedule -----------------------------------------------------------------------------


def _wins(a: Control, b: Control, name: str) -> bool:
    """True if ``a`` keeps limit ``name`` against overlapping ``b`` (module rule 2)."""
    if a.created != b.created:
        return a.created > b.created
    va, vb = getattr(a, name), getattr(b, name)
    if va != vb:
        return va < vb
    return a.id < b.id


@dataclass(frozen=True, slots=True)
class _Resolved:
    """Controls and default resolved over one segment between window bounds (before rule 5)."""

    limits: Limits
    sources: tuple[Source, Source, Source, Source]
    origins: tuple[str | None, str | None, str | None, str | None]
    next_change: float | None  # the segment's end
    in_force: tuple[Control, ...]  # covering controls that govern a limit, by start then id


class Schedule:
    """The controls and default held for one site, resolved to the limits in force.

    Mutable in memory only; persist it with :meth:`to_json` after every change."""

    def __init__(self, site: str, config: EnvelopeConfig = DEFAULT_CONFIG) -> None:
        self.site = site
        self.config = config
        self.default: DefaultControl | None = None
        self.last_contact: float | None = None
        self._controls: dict[str, Control] = {}
        self._lost: dict[str, set[str]] = {}  # control id -> limits it no longer governs
        # The resolution of controls and default between two window bounds does not change:
        # cached per segment until the next change of controls, default or config (a control
        # loop resolves every cycle; a plan asks for every step of its horizon).
        self._version = 0
        self._seg_key: tuple[int, DefaultControl | None, EnvelopeConfig] | None = None
        self._bounds: list[float] = []
        self._segs: dict[int, _Resolved] = {}
        self._first_end = math.inf  # the earliest end of a held control (expire's shortcut)

    # -- contents

    @property
    def controls(self) -> tuple[Control, ...]:
        """Held controls (including superseded ones, until they end), by start then id."""
        return tuple(sorted(self._controls.values(), key=lambda c: (c.start, c.id)))

    def superseded(self, control_id: str) -> frozenset[str]:
        """Limits the held control ``control_id`` no longer governs (rule 2)."""
        return frozenset(self._lost.get(control_id, ()))

    def governs(self, control_id: str) -> frozenset[str]:
        """Limits the held control still governs in its window."""
        c = self._controls[control_id]
        return frozenset(n for n in LIMIT_NAMES if c.limits.get(n) is not None) - self.superseded(
            control_id
        )

    def in_force(self, now: float) -> tuple[Control, ...]:
        """Held controls covering ``now`` that govern at least one limit (by start, then id)."""
        return self._segment(now).in_force

    # -- changes

    def add(self, control: Control) -> AddResult:
        """Hold a validated control, applying supersede and replay rules (module rules 2-3).

        Raises :class:`EnvelopeRejected` (``site``, ``replay``, ``capacity``); a rejected control
        changes nothing."""
        if control.site != self.site:
            raise EnvelopeRejected(
                "site", f"control {control.id} is for site {control.site!r}, not {self.site!r}"
            )
        held = self._controls.get(control.id)
        status: AddResult = "added"
        if held is not None:
            if held == control:
                return "duplicate"
            if control.created <= held.created:
                raise EnvelopeRejected(
                    "replay",
                    f"control {control.id} created {control.created} is not newer than the held "
                    f"version created {held.created}",
                )
            status = "updated"
        elif len(self._controls) >= self.config.max_controls:
            raise EnvelopeRejected(
                "capacity",
                f"already holding {len(self._controls)} controls; control {control.id} refused",
            )
        self._version += 1
        if held is not None:
            del self._controls[control.id]
            self._lost.pop(control.id, None)
        lost_new: set[str] = set()
        for other in self._controls.values():
            if not other.overlaps(control):
                continue
            for n in LIMIT_NAMES:
                if control.limits.get(n) is None or other.limits.get(n) is None:
                    continue
                if _wins(control, other, n):
                    self._lost.setdefault(other.id, set()).add(n)
                else:
                    lost_new.add(n)
        self._controls[control.id] = control
        if lost_new:
            self._lost[control.id] = lost_new
        return status

    def set_default(self, default: DefaultControl) -> AddResult:
        """Hold the DSO's default control; same replay rule as :meth:`add` against the held
        default (whatever its id). Raises :class:`EnvelopeRejected`."""
        if default.site != self.site:
            raise EnvelopeRejected(
                "site", f"default {default.id} is for site {default.site!r}, not {self.site!r}"
            )
        held = self.default
        if held is None:
            self.default = default
            return "added"
        if held == default:
            return "duplicate"
        if default.created <= held.created:
            raise EnvelopeRejected(
                "replay",
                f"default {default.id} created {default.created} is not newer than the held "
                f"default {held.id} created {held.created}",
            )
        self.default = default
        return "updated"

    def expire(self, now: float) -> list[Control]:
        """Drop controls whose window has ended by ``now``; returns them (for "completed" acks)."""
        self._keyed()
        if now < self._first_end:
            return []  # every control loop asks, every cycle
        done = [c for c in self._controls.values() if c.end <= now]
        if done:
            self._version += 1
        for c in done:
            del self._controls[c.id]
            self._lost.pop(c.id, None)
        return sorted(done, key=lambda c: (c.end, c.id))

    def mark_contact(self, now: float) -> None:
        """Record that the DSO's broker is reachable at ``now`` (drives rule 5's timeout)."""
        if self.last_contact is None or now > self.last_contact:
            self.last_contact = now

    # -- resolution

    def contact_lost(self, now: float) -> bool:
        """True when ``contact_timeout_s`` is configured and has passed since the last contact
        (or no contact was ever recorded)."""
        t = self.config.contact_timeout_s
        if t is None:
            return False
        return self.last_contact is None or now - self.last_contact > t

    def active(self, now: float) -> ActiveLimits:
        """The limits in force at ``now`` (module rules 4-5)."""
        seg = self._segment(now)
        stale = self.contact_lost(now)
        next_change = seg.next_change
        if stale:
            fallback = self.config.fallback
            lim = seg.limits
            values = [lim.get(n) for n in LIMIT_NAMES]
            sources = list(seg.sources)
            origins = list(seg.origins)
            for i, n in enumerate(LIMIT_NAMES):
                fb = fallback.get(n)
                v = values[i]
                if sources[i] != "fallback" and fb is not None and (v is None or fb <= v):
                    values[i], sources[i], origins[i] = fb, "fallback", None
            limits = Limits(*values)
            src4 = (sources[0], sources[1], sources[2], sources[3])
            org4 = (origins[0], origins[1], origins[2], origins[3])
        else:
            limits, src4, org4 = seg.limits, seg.sources, seg.origins
            if self.config.contact_timeout_s is not None and self.last_contact is not None:
                t = self.last_contact + self.config.contact_timeout_s
                if next_change is None or t < next_change:
                    next_change = t
        overall: Source = (
            "control" if "control" in src4 else "default" if "default" in src4 else "fallback"
        )
        return ActiveLimits(
            limits=limits,
            source=overall,
            sources=src4,
            origins=org4,
            contact_lost=stale,
            next_change=next_change,
        )

    def _segment(self, now: float) -> _Resolved:
        """Controls and default resolved at ``now`` before rule 5 (contact), cached for the
        segment between the window bounds around ``now``."""
        self._keyed()
        i = bisect.bisect_right(self._bounds, now)
        seg = self._segs.get(i)
        if seg is None:
            seg = self._segs[i] = self._resolve(now, self._bounds[i]
                                                if i < len(self._bounds) else None)
        return seg

    def _keyed(self) -> None:
        # The caches hold for one version of the controls, one default and one config.
        key = self._seg_key
        if (key is None or key[0] != self._version or key[1] is not self.default
                or key[2] is not self.config):
            # new objects, not cleared ones: a shallow copy (a view with another config)
            # must not empty the original's cache
            self._seg_key = (self._version, self.default, self.config)
            self._bounds = sorted({t for c in self._controls.values()
                                   for t in (c.start, c.start + c.duration_s)})
            self._segs = {}
            self._first_end = min((c.end for c in self._controls.values()), default=math.inf)

    def _resolve(self, now: float, next_change: float | None) -> _Resolved:
        fallback = self.config.fallback
        covering = [c for c in self._controls.values()
                    if c.start <= now < c.start + c.duration_s]
        values: list[float | None] = []
        sources: list[Source] = []
        origins: list[str | None] = []
        for n in LIMIT_NAMES:
            best: Control | None = None
            for c in covering:
                if getattr(c, n) is None or n in self._lost.get(c.id, ()):
                    continue
                if best is None or _wins(c, best, n):  # defensive: rule 2 leaves at most one
                    best = c
            if best is not None:
                values.append(getattr(best, n))
                sources.append("control")
                origins.append(best.id)
            elif self.default is not None and getattr(self.default, n) is not None:
                values.append(getattr(self.default, n))
                sources.append("default")
                origins.append(self.default.id)
            else:
                values.append(fallback.get(n))
                sources.append("fallback")
                origins.append(None)
        return _Resolved(
            limits=Limits(*values),
            sources=(sources[0], sources[1], sources[2], sources[3]),
            origins=(origins[0], origins[1], origins[2], origins[3]),
            next_change=next_change,
            in_force=tuple(sorted((c for c in covering if self.governs(c.id)),
                                  key=lambda c: (c.start, c.id))),
        )

    # -- persistence

    def to_json(self) -> str:
        """Everything needed to resume after a restart (controls, supersession, default, last
        contact). Not the config: that comes from the config file."""
        doc = {
            "format": _FORMAT,
            "site": self.site,
            "controls": [
                {**c.to_dict(), "superseded": sorted(self._lost.get(c.id, ()))}
                for c in self.controls
            ],
            "default": None if self.default is None else self.default.to_dict(),
            "last_contact": self.last_contact,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, config: EnvelopeConfig = DEFAULT_CONFIG) -> Schedule:
        """Restore a schedule saved by :meth:`to_json`. Every field is re-validated (not the time
        windows: ``expire`` handles what ended while the gateway was down). Raises
        :class:`EnvelopeRejected` (code ``corrupt`` or the field's code)."""
        try:
            doc = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise EnvelopeRejected("corrupt", f"schedule is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise EnvelopeRejected("corrupt", f"schedule format is not {_FORMAT}")
        site = doc.get("site")
        if not isinstance(site, str):
            raise EnvelopeRejected("corrupt", "schedule has no site")
        sched = cls(site, config)
        controls = doc.get("controls")
        if not isinstance(controls, list):
            raise EnvelopeRejected("corrupt", "schedule 'controls' is not a list")
        # Validate against a clock that accepts any stored window; expiry is the caller's job.
        loose = replace(
            config, max_start_past_s=1e12, max_start_future_s=1e12, max_clock_skew_s=1e12
        )
        for raw in controls:
            if not isinstance(raw, dict):
                raise EnvelopeRejected("corrupt", "schedule control is not an object")
            lost = raw.get("superseded", [])
            if not isinstance(lost, list) or not all(n in LIMIT_NAMES for n in lost):
                raise EnvelopeRejected(
                    "corrupt", f"schedule control {raw.get('id')!r}: bad 'superseded'"
                )
            body = {k: v for k, v in raw.items() if k != "superseded"}
            c = parse_control(body, site, _restore_now(body), loose)
            if c.id in sched._controls:
                raise EnvelopeRejected("corrupt", f"schedule holds control {c.id} twice")
            sched._controls[c.id] = c
            if lost:
                sched._lost[c.id] = set(lost)
            sched._version += 1
        d = doc.get("default")
        if d is not None:
            sched.default = parse_default(d, site, _restore_now(d), loose)
        lc = doc.get("last_contact")
        if lc is not None:
            if isinstance(lc, bool) or not isinstance(lc, int | float) or not math.isfinite(lc):
                raise EnvelopeRejected("corrupt", "schedule 'last_contact' is not a finite number")
            sched.last_contact = float(lc)
        return sched


def _restore_now(body: Mapping[str, Any]) -> float:
    """A 'now' inside a stored control's window, so that time checks pass on restore."""
    s, c = body.get("start"), body.get("created")
    t = s if isinstance(s, int | float) and not isinstance(s, bool) else c
    return (
        float(t)
        if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
        else 0.0
    )


# --- ramp -------------------------------------------------------------------------------------


def ramp_limit(
    prev_effective: float | None,
    target: float | None,
    dt_s: float,
    rating_w: float,
    pct_per_min: float = 16.0,
) -> float | None:
    """Next effective limit: tightening (``target`` below ``prev_effective``) applies at once;
    loosening rises by at most ``pct_per_min`` % of ``rating_w`` per minute of ``dt_s``.

    ``None`` means unlimited. Ramping towards unlimited ends (returns ``None``) once the effective
    limit reaches ``rating_w``: the devices cannot exceed it anyway. ``prev_effective=None``
    (nothing held before) returns ``target``. A negative or non-finite ``dt_s`` counts as 0."""
    if target is not None and (prev_effective is None or target <= prev_effective):
        return target
    if prev_effective is None:
        return target  # both unlimited
    if not math.isfinite(dt_s) or dt_s < 0:
        dt_s = 0.0
    step = max(rating_w, 0.0) * pct_per_min / 100.0 * dt_s / 60.0
    stepped = prev_effective + step
    if target is None:
        return None if stepped >= rating_w else stepped
    return min(stepped, target)


def ramp_limits(
    prev: Limits | None, target: Limits, dt_s: float, rating_w: float, pct_per_min: float = 16.0
) -> Limits:
    """:func:`ramp_limit` on each of the four limits."""
    if prev is None:
        return target
    return Limits(
        **{
            n: ramp_limit(prev.get(n), target.get(n), dt_s, rating_w, pct_per_min)
            for n in LIMIT_NAMES
        }
    )


class LimitRamp:
    """Holds the last effective limits so that the daemon can apply :func:`ramp_limits` each cycle.

    ``rating_w`` is the site's DER rating (inverter rated W + battery max discharge W): the base
    of the ramp rate for all four limits. The first call (or after :meth:`reset`, e.g. a restart)
    takes the target as is."""

    def __init__(self, rating_w: float, pct_per_min: float = 16.0) -> None:
        self.rating_w = rating_w
        self.pct_per_min = pct_per_min
        self._prev: Limits | None = None
        self._t: float | None = None

    def reset(self) -> None:
        """Forget the previous limits."""
        self._prev = None
        self._t = None

    def apply(self, target: ActiveLimits, now: float) -> ActiveLimits:
        """The effective limits at ``now`` for the resolved ``target``; ``ramping`` is set while
        any limit is below its target."""
        if self._prev is not None and self._prev == target.limits:
            # Steady (every cycle but a few): the ramp holds the target as it is.
            self._t = now
            return target if not target.ramping else replace(target, ramping=False)
        dt = 0.0 if self._t is None else now - self._t
        eff = ramp_limits(self._prev, target.limits, dt, self.rating_w, self.pct_per_min)
        self._prev, self._t = eff, now
        return replace(target, limits=eff, ramping=eff != target.limits)
