"""The gateway's side of the DSO envelope: receive, verify, hold, enforce, acknowledge, record.

One :class:`EnvelopeAgent` per gateway (``[envelope]`` in the config). The daemon calls it from
two places, both on the event loop (no locks):

* the MQTT session hands it every message on ``<root>/<site>/dso/controls`` and ``.../default``
  (and ``.../heartbeat`` when ``dso_heartbeat_timeout_s`` > 0)
  (:meth:`EnvelopeAgent.on_message`) and publishes what it queues (acks, the retained status)
  (:meth:`EnvelopeAgent.outgoing`);
* the fast loop calls :meth:`EnvelopeAgent.step` once per cycle with the readings and the
  policy's setpoints (the plan's or the rule's battery power = the *desired* battery power):
  it resolves the limits in force (:class:`gateway.envelope.Schedule`), ramps loosening limits
  (:class:`gateway.envelope.LimitRamp`, AS/NZS 4777.2 16 %/min), runs
  :func:`gateway.enforce.enforce` and returns the setpoints to write; it also records compliance.

Receiving (``docs/mqtt.md``, "DSO envelopes"), in this order, each failure a ``rejected`` ack
with a reason, a counter per code and one log line; nothing rejected changes the limits held:

1. flood bound: a token bucket (real time: flooding is a CPU attack) of ``flood_burst`` messages
   refilled at ``flood_per_min``; a message over it is dropped (counted, not acked: an ack per
   message would amplify the flood) and the agent asks the session to re-subscribe once the
   bucket has refilled, which makes the broker re-send the retained (latest) documents;
2. size (``max_bytes``), UTF-8 JSON object;
3. Ed25519 signature with the DSO's public key from the config (:mod:`gateway.signing`);
4. document shape: ``v`` = 1, ``site`` = this gateway's site, ``issued`` (finite, > 0), the
   ``controls`` array (at most ``max_controls_per_doc``) or the ``default`` object, no other key;
5. document replay: ``issued`` older than the last accepted document of that topic is rejected;
   equal is the retained copy re-delivered at every (re)subscribe and is skipped silently;
6. each control / the default: :func:`gateway.envelope.parse_control` / ``parse_default`` (units,
   ranges, NaN, absurd values, start/duration, site) then :meth:`Schedule.add` /
   ``set_default`` (supersede, per-control replay). Controls are judged one by one: a bad
   control in a validly signed document is rejected alone, the others are held.

Heartbeats (``dso/heartbeat``, only with ``dso_heartbeat_timeout_s`` > 0): steps 1-3 as above
(size bound ``_HEARTBEAT_MAX_BYTES``), then the shape ``{v: 1, site, issued}`` and no other key,
``issued`` at most ``max_clock_skew_s`` (300 s) ahead of the gateway's clock (``issued``), not
older than the last accepted heartbeat (``replay``; equal is a silent duplicate) and not older
than the timeout itself (``stale``: it could not prove contact anyway). Accepted heartbeats are
counted, not acked. Not persisted: a replayed heartbeat proves at most that the DSO was alive at
its ``issued`` (see Contact), which is true.

Persistence: the schedule and the replay state (:meth:`snapshot`) are handed to the daemon's
store (key ``envelope`` of the ``kv`` table) on every change and restored by :meth:`restore`
before the fast loop's first cycle, so a restart resumes the same limits before any write.

Contact: "contact" is the MQTT session being connected (:meth:`step`'s ``connected``) and, with
``dso_heartbeat_timeout_s`` > 0, also a *valid signed DSO message* issued within that timeout:
a heartbeat, or a controls/default document that is new (``issued`` above the last accepted
one; a retained copy re-delivered proves nothing). Such a message proves the DSO alive at
``min(issued, now)``; an invalid one never counts. So a dead DSO publisher behind a live broker
is lost contact too, ``dso_heartbeat_timeout_s`` after its last valid message. Losing contact
changes nothing by itself (CSIP-AUS): held controls run to their end, then the default, then the
configured fallback; after ``contact_timeout_s`` without contact every limit becomes the tighter
of that and the fallback (``gateway.envelope`` rule 5). When contact returns, limits loosen at
the ramp rate only.

Compliance (per cycle): the measured site power against the limits the DSO asked for (before
the ramp, which only ever tightens). An *exceedance* is a measured export above the export limit
(or import above the import limit) by more than the tolerance: ``min(tolerance_w,
tolerance_pct % of the inverter rating)``. Per telemetry window the agent gives the tightest
limits, the largest measured exceedance (W) and the seconds above tolerance
(:meth:`window_record`); each exceedance episode is an event when it ends; the retained status
(:meth:`status_payload`) says what is in force and whether the site complies.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway import messages
from gateway.commands import Setpoints as Commanded
from gateway.commands import SiteState
from gateway.config import EnvelopeSection
from gateway.enforce import EnforceConfig, EnforceInputError, Setpoints, enforce
from gateway.envelope import (
    LIMIT_NAMES,
    ActiveLimits,
    EnvelopeConfig,
    EnvelopeRejected,
    LimitRamp,
    Limits,
    Schedule,
    parse_control,
    parse_default,
)
from gateway.signing import SignatureInvalid, public_key_from_b64, verify

log = logging.getLogger(__name__)

_SNAPSHOT_FORMAT: Final = 1
_MAX_REASON: Final = 500
_MAX_ACKS: Final = 1000  # queued while the broker is away; the oldest go first
_HEARTBEAT_MAX_BYTES: Final = 1024  # a valid heartbeat is ~170 bytes
EventSink = Callable[[str, str, str, "dict[str, Any] | None"], None]


@dataclass(frozen=True)
class AgentSettings:
    """What the agent needs from the ``[envelope]`` config table (see ``gateway.config``)."""

    public_key: Ed25519PublicKey
    fallback: Limits = field(default_factory=lambda: Limits(export_w=1500.0))
    contact_timeout_s: float | None = 1800.0
    ramp_pct_per_min: float = 16.0
    min_limit_pct: float = 2.0
    tolerance_w: float = 100.0
    tolerance_pct: float = 4.0
    flood_burst: int = 30
    flood_per_min: float = 60.0
    max_bytes: int = 262_144
    max_controls_per_doc: int = 500
    status_interval_s: float = 60.0  # domain s between status publications (and on change)
    # A limit that tightens within this many domain seconds applies now: a cycle and the
    # inverter's response later the site is compliant *at* the control's start, not after it.
    # Loosening is never anticipated.
    lead_s: float = 10.0
    # ...and at least this many times the longest gap between two of this gateway's cycles
    # over the last ``lead_window`` cycles, at most ``lead_max_s``: a loop that has been seen
    # to stall for 30 s (an SD card, a swap storm, an accelerated simulation) must apply a
    # tightening 30 s and a cycle early, or the stall lands on the step and the site is over.
    lead_gap_factor: float = 2.0
    lead_window: int = 600
    lead_max_s: float = 300.0
    # > 0: contact also needs a valid signed DSO message issued within this many domain s
    # (module docstring, "Contact"); 0 = the MQTT session alone (CSIP-AUS over MQTT as before).
    dso_heartbeat_timeout_s: float = 0.0


@dataclass
class AgentStats:
    """Counters of this process (also in the status payload and the daemon's stats)."""

    messages: int = 0
    accepted: int = 0  # controls/defaults added or updated
    duplicates: int = 0  # identical re-deliveries (documents or controls)
    rejected: dict[str, int] = field(default_factory=dict)  # code -> count
    rate_limited: int = 0
    resubscribes: int = 0
    acks_queued: int = 0
    max_lead_s: float = 0.0  # the longest anticipation of a tightening used (see lead_s)
    acks_dropped: int = 0
    enforce_errors: int = 0
    noncompliant_cycles: int = 0  # cycles where enforce() said the devices cannot comply
    repeated_meter_holds: int = 0  # cycles a repeated meter reading kept the PV limit down
    exceedance_events: int = 0
    exceedance_s: float = 0.0
    max_export_exceedance_w: float = 0.0
    max_import_exceedance_w: float = 0.0
    max_episode_s: float = 0.0
    max_episode_cycles: int = 0
    heartbeats: int = 0  # valid DSO heartbeats accepted
    dso_silences: int = 0  # times no valid DSO message arrived within dso_heartbeat_timeout_s

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        d["exceedance_s"] = round(self.exceedance_s, 1)
        d["max_episode_s"] = round(self.max_episode_s, 1)
        d["max_export_exceedance_w"] = round(self.max_export_exceedance_w, 1)
        d["max_import_exceedance_w"] = round(self.max_import_exceedance_w, 1)
        return d


class _Bucket:
    """Token bucket over real monotonic time."""

    def __init__(self, burst: int, per_min: float, now: Callable[[], float]) -> None:
        self.burst = float(burst)
        self.rate = per_min / 60.0
        self.now = now
        self.tokens = float(burst)
        self.t = now()

    def _refill(self) -> None:
        t = self.now()
        self.tokens = min(self.burst, self.tokens + max(0.0, t - self.t) * self.rate)
        self.t = t

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def level(self) -> float:
        self._refill()
        return self.tokens


@dataclass
class _Window:
    """Compliance of one telemetry window."""

    start: float
    limit_export_w: float | None = None
    limit_import_w: float | None = None
    exceed_w_max: float = 0.0
    exceed_s: float = 0.0
    samples: int = 0

    def record(self) -> dict[str, Any]:
        return {"limit_export_w": messages.rounded(self.limit_export_w),
                "limit_import_w": messages.rounded(self.limit_import_w),
                "exceed_w_max": round(self.exceed_w_max, 1),
                "exceed_s": round(self.exceed_s, 1)}


@dataclass
class _Episode:
    kind: str  # export | import
    start: float
    limit_w: float
    max_w: float = 0.0
    cycles: int = 0
    end: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": round(self.start, 3),
                "end": None if self.end is None else round(self.end, 3),
                "max_w": round(self.max_w, 1), "limit_w": round(self.limit_w, 1),
                "duration_s": None if self.end is None else round(self.end - self.start, 1)}


def _min_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class EnvelopeAgent:
    """Holds the DSO's schedule for one site and turns it into the setpoints of every cycle."""

    def __init__(self, site: str, settings: AgentSettings, *, root: str = "hems/v1",
                 cycle_s: float = 1.0, telemetry_interval_s: float = 60.0,
                 on_event: EventSink | None = None, on_persist: Callable[[str], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.site = site
        self.settings = settings
        self.cycle_s = cycle_s
        self.interval_s = telemetry_interval_s
        self.topic_controls = f"{root}/{site}/dso/controls"
        self.topic_default = f"{root}/{site}/dso/default"
        self.topic_heartbeat = f"{root}/{site}/dso/heartbeat"
        self.topic_ack = f"{root}/{site}/dso/ack"
        self.topic_status = f"{root}/{site}/envelope/status"
        self.env_config = EnvelopeConfig(fallback=settings.fallback,
                                         contact_timeout_s=settings.contact_timeout_s,
                                         ramp_pct_per_min=settings.ramp_pct_per_min)
        self.enforce_config = EnforceConfig(min_limit_pct=settings.min_limit_pct)
        self.schedule = Schedule(site, self.env_config)
        self.stats = AgentStats()
        self._on_event = on_event
        self._on_persist = on_persist
        self._bucket = _Bucket(settings.flood_burst, settings.flood_per_min, monotonic)
        self._resync = False
        self._issued: dict[str, float] = {}  # topic kind -> last accepted `issued`
        self._started: set[str] = set()
        self._ramp: LimitRamp | None = None
        self._prev: Setpoints | None = None
        self._out: Commanded | None = None
        self._meter_key: tuple[Any, ...] | None = None
        self.target: ActiveLimits | None = None  # what the DSO asks now (before the ramp)
        self.active: ActiveLimits | None = None  # effective (ramped) limits of the last cycle
        self.active_at: float | None = None  # domain time at which `active` was resolved
        self.last: Setpoints | None = None
        self.last_site_w: float | None = None
        self.last_exceedance_w: float = 0.0
        self._last_t: float | None = None
        self._step_ts: float | None = None
        self._gaps: deque[float] = deque(maxlen=max(1, settings.lead_window))
        self._worst_gap = 0.0  # max(self._gaps)
        self._window: _Window | None = None
        self._closed: dict[float, _Window] = {}
        self._episode: _Episode | None = None
        self.last_episode: _Episode | None = None
        self._acks: deque[bytes] = deque()
        self._status_due = True
        self._status_key: Any = None
        self._status_t: float = -math.inf
        self.wake = asyncio.Event()  # set when something is queued for publication
        self._summary: tuple[Any, ...] | None = None
        self._hb_issued: float | None = None  # `issued` of the last accepted heartbeat
        self.dso_seen: float | None = None  # latest time a valid DSO message proves it alive
        self._hb_t0: float | None = None  # first cycle: silence is judged from here until then
        self._dso_silent = False

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> str:
        """JSON of everything a restart needs: the schedule, the replay and started state."""
        return json.dumps({"format": _SNAPSHOT_FORMAT, "schedule": self.schedule.to_json(),
                           "issued": self._issued, "started": sorted(self._started)},
                          sort_keys=True, separators=(",", ":"), allow_nan=False)

    def restore(self, text: str | None, now: float) -> bool:
        """Resume from a :meth:`snapshot`. A corrupt snapshot is logged and ignored (the
        fallback applies until the DSO's retained documents arrive: never looser)."""
        if not text:
            return False
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != _SNAPSHOT_FORMAT:
                raise EnvelopeRejected("corrupt", "snapshot format unknown")
            sched = Schedule.from_json(str(doc["schedule"]), self.env_config)
            if sched.site != self.site:
                raise EnvelopeRejected("corrupt", f"snapshot is for site {sched.site!r}")
            issued = {str(k): float(v) for k, v in dict(doc.get("issued", {})).items()
                      if k in ("controls", "default") and math.isfinite(float(v))}
            started = {str(s) for s in doc.get("started", [])}
        except (EnvelopeRejected, KeyError, TypeError, ValueError) as e:
            log.error("envelope: stored schedule unusable (%s); starting from the fallback", e)
            self._event("error", "envelope", f"stored schedule unusable: {e}", None)
            return False
        self.schedule = sched
        self._issued = issued
        self._started = started
        done = self.schedule.expire(now)
        for c in done:
            self._ack(c.id, "completed", now, "ended while the gateway was down")
            self._started.discard(c.id)
        log.info("envelope: restored %d control(s), default %s", len(self.schedule.controls),
                 self.schedule.default.id if self.schedule.default else "none")
        return True

    def _persist(self) -> None:
        if self._on_persist is not None:
            self._on_persist(self.snapshot())

    def _event(self, level: str, kind: str, msg: str, data: dict[str, Any] | None) -> None:
        if self._on_event is not None:
            self._on_event(level, kind, msg, data)

    # ------------------------------------------------------------------ receiving

    @property
    def heartbeat_on(self) -> bool:
        """Contact needs the DSO's signed messages, not only the broker session."""
        return self.settings.dso_heartbeat_timeout_s > 0

    @property
    def subscriptions(self) -> tuple[str, ...]:
        topics = (self.topic_controls, self.topic_default)
        return (*topics, self.topic_heartbeat) if self.heartbeat_on else topics

    def wants(self, topic: str) -> bool:
        return topic in self.subscriptions

    def on_message(self, topic: str, payload: bytes, now: float) -> None:
        """Handle one received message. Never raises on bad input."""
        kind = "controls" if topic == self.topic_controls else \
            "default" if topic == self.topic_default else \
            "heartbeat" if topic == self.topic_heartbeat and self.heartbeat_on else None
        if kind is None:
            return
        self.stats.messages += 1
        if not payload and kind != "heartbeat":
            return  # a retained message being deleted: nothing to add (held controls stay)
        if not self._bucket.take():
            self.stats.rate_limited += 1
            if not self._resync:
                log.warning("envelope: message flood on %s; dropping until the rate falls "
                            "under %g/min, then re-reading the retained documents", topic,
                            self.settings.flood_per_min)
                self._event("warning", "envelope", f"flood on {topic}: messages dropped", None)
            self._resync = True
            return
        if not self.heartbeat_on:
            self.schedule.mark_contact(now)  # any message: the broker is there
        try:
            if kind == "heartbeat":
                self._handle_heartbeat(payload, now)
            else:
                self._handle(kind, payload, now)
        except Exception as e:  # a bug must not kill the session; nothing was loosened
            log.exception("envelope: handler failed")
            self._reject("internal", f"internal error: {type(e).__name__}", None, now)

    def _reject(self, code: str, reason: str, cid: object, now: float) -> None:
        self.stats.reject(code)
        cid_s = cid if isinstance(cid, str) and len(cid) <= 64 else None
        log.warning("envelope: rejected %s: %s", cid_s or "message", reason)
        self._ack(cid_s, "rejected", now, f"{code}: {reason}")

    def _verified(self, kind: str, payload: bytes, max_bytes: int,
                  now: float) -> dict[str, Any] | None:
        """The signed, well-shaped body of a DSO message, or None (rejected with its reason)."""
        if len(payload) > max_bytes:
            self._reject("oversize", f"{kind} of {len(payload)} bytes > {max_bytes}", None, now)
            return None
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self._reject("json", f"not UTF-8 JSON: {str(e)[:120]}", None, now)
            return None
        try:
            body = verify(doc, self.settings.public_key)
        except SignatureInvalid as e:
            self._reject("signature", e.reason, None, now)
            return None
        problem = self._shape(kind, body)
        if problem is not None:
            self._reject(problem[0], problem[1], None, now)
            return None
        return body

    def _handle(self, kind: str, payload: bytes, now: float) -> None:
        body = self._verified(kind, payload, self.settings.max_bytes, now)
        if body is None:
            return
        issued = float(body["issued"])
        last = self._issued.get(kind)
        if last is not None and issued < last:
            self._reject("replay", f"{kind} document issued {issued:.3f} is older than the "
                         f"last accepted one ({last:.3f})", None, now)
            return
        if last is not None and issued == last:
            self.stats.duplicates += 1
            return
        self._heard(issued, now)  # a new document signed by the DSO: it was alive at `issued`
        changed = False
        if kind == "controls":
            for item in body["controls"]:
                changed |= self._take_control(item, now)
        else:
            changed = self._take_default(body["default"], now)
        self._issued[kind] = issued
        self._persist()  # also for an unchanged schedule: the replay mark moved
        if changed:
            self._status_due = True
            self.wake.set()

    def _handle_heartbeat(self, payload: bytes, now: float) -> None:
        body = self._verified("heartbeat", payload, _HEARTBEAT_MAX_BYTES, now)
        if body is None:
            return
        issued = float(body["issued"])
        skew = self.env_config.max_clock_skew_s
        if issued > now + skew:
            # Accepted, it would also make every real heartbeat a "replay" until then.
            self._reject("issued", f"heartbeat issued {issued - now:.0f} s in the future (max "
                         f"clock skew {skew:.0f} s)", None, now)
            return
        last = self._hb_issued
        if last is not None and issued < last:
            self._reject("replay", f"heartbeat issued {issued:.3f} is older than the last "
                         f"accepted one ({last:.3f})", None, now)
            return
        if last is not None and issued == last:
            self.stats.duplicates += 1  # a QoS re-delivery: proves nothing new
            return
        timeout = self.settings.dso_heartbeat_timeout_s
        if issued < now - timeout:
            self._reject("stale", f"heartbeat issued {now - issued:.0f} s ago, longer than "
                         f"dso_heartbeat_timeout_s ({timeout:.0f} s)", None, now)
            return
        self._hb_issued = issued
        self.stats.heartbeats += 1
        self._heard(issued, now)

    def _heard(self, issued: float, now: float) -> None:
        """A valid, new message signed by the DSO: it was alive at ``issued`` (or now, for a
        clock ahead of ours). The proof is dated by ``issued``, so a delayed or replayed message
        only ever covers what remains of its own window."""
        if not self.heartbeat_on:
            return
        seen = min(issued, now)
        if self.dso_seen is None or seen > self.dso_seen:
            self.dso_seen = seen
        if self._dso_alive(now):
            self.schedule.mark_contact(now)  # it arrived: the broker is there too

    def _dso_alive(self, now: float) -> bool:
        """A valid DSO message was issued within ``dso_heartbeat_timeout_s`` (always true when
        the heartbeat is off). A clock that went back more than ``_CLOCK_BACK_S`` before that
        message counts as silence (until the next one): the safe side. A message that arrived
        during this cycle is a little "after" the cycle's own time stamp: that is not a clock
        going back (CI saw it call a live DSO silent for "-0 s")."""
        timeout = self.settings.dso_heartbeat_timeout_s
        if timeout <= 0:
            return True
        return (self.dso_seen is not None
                and -_CLOCK_BACK_S <= now - self.dso_seen <= timeout)

    def _watch_silence(self, now: float, connected: bool) -> None:
        """One event when the DSO falls silent, one when it is heard again."""
        timeout = self.settings.dso_heartbeat_timeout_s
        if self._hb_t0 is None:
            self._hb_t0 = now
        alive = self._dso_alive(now)
        # Before any DSO message: silent only once the timeout has passed since the start.
        silent = not alive and (self.dso_seen is not None or now - self._hb_t0 > timeout)
        if silent and not self._dso_silent:
            self.stats.dso_silences += 1
            since = "since the start" if self.dso_seen is None else \
                f"for {now - self.dso_seen:.0f} s"
            msg = (f"no valid signed DSO message {since} (dso_heartbeat_timeout_s "
                   f"{timeout:.0f} s): contact lost"
                   + ("" if connected else " (the broker is down too)")
                   + "; the fallback applies after contact_timeout_s")
            log.warning("envelope: %s", msg)
            self._event("warning", "envelope", msg, {"dso_seen": self.dso_seen})
        elif not silent and self._dso_silent:
            msg = "the DSO is heard again (a valid signed message): contact back"
            log.info("envelope: %s", msg)
            self._event("info", "envelope", msg, {"dso_seen": self.dso_seen})
        self._dso_silent = silent

    def _shape(self, kind: str, body: dict[str, Any]) -> tuple[str, str] | None:
        allowed = {"v", "site", "issued"} | ({kind} if kind != "heartbeat" else set())
        extra = sorted(str(k) for k in body if k not in allowed)
        if extra:
            return "unknown_field", f"{kind} document has unknown field(s) {', '.join(extra)}"
        if body.get("v") != 1:
            return "version", f"{kind} document v must be 1, got {str(body.get('v'))[:20]}"
        site = body.get("site")
        if site != self.site:
            return "site", f"{kind} document is for site {str(site)[:60]!r}, not {self.site!r}"
        issued = body.get("issued")
        if (isinstance(issued, bool) or not isinstance(issued, int | float)
                or not math.isfinite(issued) or issued <= 0):
            return "issued", f"{kind} document 'issued' must be a positive finite number"
        if kind == "heartbeat":
            return None
        content = body.get(kind)
        if kind == "controls":
            if not isinstance(content, list):
                return "type", "'controls' must be an array"
            if len(content) > self.settings.max_controls_per_doc:
                return "capacity", (f"{len(content)} controls in one document > "
                                    f"{self.settings.max_controls_per_doc}")
        elif not isinstance(content, dict):
            return "type", "'default' must be an object"
        return None

    def _take_control(self, item: object, now: float) -> bool:
        cid = item.get("id") if isinstance(item, dict) else None
        try:
            c = parse_control(item, self.site, now, self.env_config)
            res = self.schedule.add(c)
        except EnvelopeRejected as e:
            if e.code == "expired" and isinstance(cid, str) and cid in self._started:
                return False  # a retained list naming a control that just ended: not hostile
            self._reject(e.code, e.reason, cid, now)
            return False
        if res == "duplicate":
            self.stats.duplicates += 1
            return False
        self.stats.accepted += 1
        self._ack(c.id, "received", now, "updated" if res == "updated" else None)
        self._event("info", "envelope", f"control {c.id} {res}: " + ", ".join(
            f"{n} {c.limits.get(n):.0f} W" for n in LIMIT_NAMES if c.limits.get(n) is not None)
            + f" from {c.start:.0f} for {c.duration_s:.0f} s", c.to_dict())
        return True

    def _take_default(self, item: object, now: float) -> bool:
        cid = item.get("id") if isinstance(item, dict) else None
        try:
            d = parse_default(item, self.site, now, self.env_config)
            res = self.schedule.set_default(d)
        except EnvelopeRejected as e:
            self._reject(e.code, e.reason, cid, now)
            return False
        if res == "duplicate":
            self.stats.duplicates += 1
            return False
        self.stats.accepted += 1
        self._ack(d.id, "received", now, "default")
        self._event("info", "envelope", f"default {d.id} {res}", d.to_dict())
        return True

    # ------------------------------------------------------------------ outgoing

    def _ack(self, cid: str | None, status: str, now: float, reason: str | None) -> None:
        ack: dict[str, Any] = {"v": 1, "site": self.site, "control_id": cid, "status": status,
                               "t": round(now, 3)}
        if reason is not None:
            ack["reason"] = reason[:_MAX_REASON]
        if len(self._acks) >= _MAX_ACKS:
            self._acks.popleft()
            self.stats.acks_dropped += 1
        self._acks.append(messages.dumps(ack))
        self.stats.acks_queued += 1
        self.wake.set()

    def outgoing(self) -> list[tuple[str, bytes, bool]]:
        """Messages to publish now, as ``(topic, payload, retain)``, all QoS 1; taken off the
        queue (call :meth:`requeue` with what could not be sent)."""
        out = [(self.topic_ack, a, False) for a in self._acks]
        self._acks.clear()
        if self._status_due:
            p = self.status_payload()
            if p is not None:
                out.append((self.topic_status, p, True))
                self._status_due = False
        return out

    def requeue(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Put back what the session could not publish (broker lost mid-way)."""
        for topic, payload, _ in reversed(items):
            if topic == self.topic_ack:
                self._acks.appendleft(payload)
            else:
                self._status_due = True

    def on_connect(self) -> None:
        """The session (re)connected: publish the status again."""
        self._status_due = True
        self.wake.set()

    def resubscribe_due(self) -> bool:
        """True once after a flood, when the bucket has refilled: re-read retained documents."""
        if self._resync and self._bucket.level() >= min(self.settings.flood_burst, 4):
            self._resync = False
            self.stats.resubscribes += 1
            return True
        return False

    # ------------------------------------------------------------------ the fast loop

    def tolerance_w(self, state: SiteState) -> float:
        """Measurement tolerance: ``tolerance_pct`` % of the inverter rating or ``tolerance_w``,
        whichever is lower (``tolerance_w`` alone without an inverter reading)."""
        s = self.settings
        inv = state.inverter
        if inv is None or not math.isfinite(inv.rated_w) or inv.rated_w <= 0:
            return s.tolerance_w
        return min(s.tolerance_w, s.tolerance_pct / 100.0 * inv.rated_w)

    def limits_at(self, now: float, connected: bool) -> ActiveLimits:
        """Resolve (and ramp) the limits at ``now``; acks started/completed controls.

        ``connected``: the MQTT session is up. Contact is marked when it is and, with the
        heartbeat on, a valid DSO message was issued within ``dso_heartbeat_timeout_s``."""
        if connected and self._dso_alive(now):
            self.schedule.mark_contact(now)
        if self.heartbeat_on:
            self._watch_silence(now, connected)
        done = self.schedule.expire(now)
        for c in done:
            self._ack(c.id, "completed", now, None if c.id in self._started else
                      "ended without governing a limit (superseded)")
            self._started.discard(c.id)
        started = [c for c in self.schedule.in_force(now) if c.id not in self._started]
        for c in started:
            self._started.add(c.id)
            self._ack(c.id, "started", now, None)
        if done or started:
            self._persist()
        target = self._anticipated(self.schedule.active(now), now)
        self.target = target
        eff = target if self._ramp is None else self._ramp.apply(target, now)
        self.active = eff
        self.active_at = now
        # (sources and origins, not control_ids: the same information without a sort per cycle)
        summary = (target.source, target.sources, target.origins, target.limits,
                   target.contact_lost)
        if summary != self._summary:
            if self._summary is not None:
                lim = ", ".join(f"{n} {v:.0f}" for n in LIMIT_NAMES
                                if (v := target.limits.get(n)) is not None) or "none"
                msg = (f"limits from {target.source}"
                       + (f" {', '.join(target.control_ids)}" if target.control_ids else "")
                       + f": {lim}" + (" (contact lost)" if target.contact_lost else ""))
                log.info("envelope: %s", msg)
                self._event("info", "envelope_limits", msg,
                            {"source": target.source, "controls": list(target.control_ids),
                             "limits": target.limits.to_dict(),
                             "contact_lost": target.contact_lost})
            self._summary = summary
            self._status_due = True
            self.wake.set()
        return eff

    def _anticipated(self, target: ActiveLimits, now: float) -> ActiveLimits:
        """``target`` tightened by the limits of the next change if it is within ``lead_s``."""
        nc = target.next_change
        lead = self.lead_s()
        if lead <= 0 or nc is None or nc - now > lead:
            return target
        ahead = self.schedule.active(nc).limits
        tighter = Limits(**{n: _min_limit(target.limits.get(n), ahead.get(n))
                            for n in LIMIT_NAMES})
        return target if tighter == target.limits else replace(target, limits=tighter)

    def lead_s(self) -> float:
        """How early a tightening applies now: ``lead_s``, or ``lead_gap_factor`` times the
        longest recent gap between cycles if that is more (at most ``lead_max_s``)."""
        st = self.settings
        if st.lead_s <= 0:
            return 0.0
        return max(st.lead_s, min(st.lead_max_s, st.lead_gap_factor * self._worst_gap))

    def step(self, state: SiteState, desired: Commanded | None, connected: bool) -> Commanded:
        """This cycle's setpoints: the envelope (and device limits) applied to ``desired``.

        Without a meter reading the loop cannot close: the last setpoints are held (the daemon
        re-sends them within the revert time; a dead meter therefore keeps the last limit)."""
        now = state.ts
        if self._step_ts is not None and now > self._step_ts:
            gap = now - self._step_ts
            dropped = self._gaps[0] if len(self._gaps) == self._gaps.maxlen else 0.0
            self._gaps.append(gap)
            # The window's max once per cycle, and only rescanned when the max left it.
            if gap >= self._worst_gap:
                self._worst_gap = gap
            elif dropped >= self._worst_gap:
                self._worst_gap = max(self._gaps)
        self._step_ts = now
        lead = self.lead_s()
        if lead > self.stats.max_lead_s:
            self.stats.max_lead_s = round(lead, 1)
        inv, bat = state.inverter, state.battery
        if inv is not None or bat is not None:
            rating = (inv.rated_w if inv else 0.0) + (bat.max_discharge_w if bat else 0.0)
            if rating > 0 and math.isfinite(rating):
                if self._ramp is None:
                    self._ramp = LimitRamp(rating, self.settings.ramp_pct_per_min)
                else:
                    # A new rating changes the ramp's rate, not where it stands: a fresh
                    # LimitRamp would jump straight to the (looser) target.
                    self._ramp.rating_w = rating
        eff = self.limits_at(now, connected)
        assert self.target is not None
        if state.meter is None:
            return self._out or Commanded(None)
        want = desired.battery_w if desired is not None and bat is not None else None
        try:
            sp = enforce(state.meter.site_w, inv, bat, eff.limits, want, self._prev,
                         self.enforce_config)
        except EnforceInputError as e:
            self.stats.enforce_errors += 1
            log.warning("envelope: cannot enforce this cycle: %s; holding the last setpoints", e)
            return self._out or Commanded(None)
        m = state.meter
        key = (m.site_w, m.phases_w, m.import_wh, m.export_wh, m.voltage_v, m.freq_hz)
        repeated, self._meter_key = key == self._meter_key, key
        held = self._out
        if (repeated and held is not None and held.inverter_limit_pct is not None
                and sp.inverter_limit_pct is not None
                and sp.inverter_limit_pct > held.inverter_limit_pct):
            # A reading bit-identical to the last one says nothing about what our last change
            # did (a frozen or slow meter): never raise PV on it; tightening still goes through.
            # Without this a frozen reading just inside the limit winds the PV limit up cycle
            # after cycle until the frozen-meter check trips.
            self.stats.repeated_meter_holds += 1
            sp = replace(sp, inverter_limit_pct=held.inverter_limit_pct)
        self._prev = sp
        self.last = sp
        if not sp.compliant:
            self.stats.noncompliant_cycles += 1
        self._record(state, now)
        pct = sp.inverter_limit_pct
        out = Commanded(battery_w=None if sp.battery_w is None else round(sp.battery_w, 1),
                        inverter_limit_pct=None if pct is None else round(pct, 2))
        self._out = out
        return out

    def horizon_limits(self, start: float, n: int, step_s: float
                       ) -> tuple[list[float], list[float], list[float], list[float]]:
        """For the planner: per step ``[start + k*step_s, +step_s)`` the tightest of each limit
        (export, import, generation, load; ``inf`` = none) the schedule will impose, assuming
        contact holds (if it is lost now, the fallback tightens every step, as it will)."""
        lost = self.schedule.contact_lost(start)
        view = copy.copy(self.schedule)
        view.config = replace(self.env_config, contact_timeout_s=None)
        bounds = sorted({t for c in view.controls for t in (c.start, c.end)})
        cols: tuple[list[float], ...] = ([], [], [], [])
        fb = self.env_config.fallback
        for k in range(n):
            a, b = start + k * step_s, start + (k + 1) * step_s
            pts = [a] + [t for t in bounds if a < t < b]
            lim = Limits()
            for i, t in enumerate(pts):
                got = view.active(t).limits
                lim = got if i == 0 else lim.tighter(got)
            if lost:
                lim = lim.tighter(fb)
            for j, name in enumerate(LIMIT_NAMES):
                v = lim.get(name)
                cols[j].append(math.inf if v is None else v)
        return cols[0], cols[1], cols[2], cols[3]

    # ------------------------------------------------------------------ compliance

    def _record(self, state: SiteState, now: float) -> None:
        assert state.meter is not None and self.target is not None
        s = state.meter.site_w
        lim = self.target.limits
        exp = max(0.0, -s - lim.export_w) if lim.export_w is not None else 0.0
        imp = max(0.0, s - lim.import_w) if lim.import_w is not None else 0.0
        tol = self.tolerance_w(state)
        dt = self.cycle_s if self._last_t is None else min(max(0.0, now - self._last_t),
                                                           5 * self.cycle_s)
        self._last_t = now
        self.last_site_w = s
        self.last_exceedance_w = max(exp, imp)
        st = self.stats
        st.max_export_exceedance_w = max(st.max_export_exceedance_w, exp)
        st.max_import_exceedance_w = max(st.max_import_exceedance_w, imp)
        over = max(exp, imp) > tol
        if over:
            st.exceedance_s += dt
        # telemetry window (aligned like gateway.store.Aggregator)
        w = self._window
        if w is None or now >= w.start + self.interval_s:
            if w is not None:
                self._closed[w.start] = w
                if len(self._closed) > 10:
                    self._closed.pop(min(self._closed))
            w = self._window = _Window(now - now % self.interval_s)
        w.samples += 1
        w.limit_export_w = _min_opt(w.limit_export_w, lim.export_w)
        w.limit_import_w = _min_opt(w.limit_import_w, lim.import_w)
        w.exceed_w_max = max(w.exceed_w_max, exp, imp)
        if over:
            w.exceed_s += dt
        # episodes
        ep = self._episode
        if over:
            kind = "export" if exp >= imp else "import"
            if ep is None:
                lw = lim.export_w if kind == "export" else lim.import_w
                ep = self._episode = _Episode(kind, now, float(lw or 0.0))
            ep.max_w = max(ep.max_w, exp, imp)
            ep.cycles += 1
        elif ep is not None:
            ep.end = now
            self._episode = None
            self.last_episode = ep
            st.exceedance_events += 1
            dur = now - ep.start
            st.max_episode_s = max(st.max_episode_s, dur)
            st.max_episode_cycles = max(st.max_episode_cycles, ep.cycles)
            msg = (f"{ep.kind} exceedance up to {ep.max_w:.0f} W over the {ep.limit_w:.0f} W "
                   f"limit for {dur:.1f} s ({ep.cycles} cycle(s))")
            (log.warning if dur > 15.0 else log.info)("envelope: %s", msg)
            self._event("warning" if dur > 15.0 else "info", "exceedance", msg, ep.as_dict())
            self._status_due = True
            self.wake.set()
        if self._status_t + self.settings.status_interval_s <= now:
            self._status_due = True
            self.wake.set()

    def window_record(self, start: float) -> dict[str, Any]:
        """The compliance fields of the telemetry window starting at ``start`` (closed, or the
        one in progress at shutdown); all ``None`` if the agent saw no sample in it."""
        w = self._closed.pop(start, None)
        if w is None and self._window is not None and self._window.start == start:
            w, self._window = self._window, None
        if w is None:
            return {"limit_export_w": None, "limit_import_w": None, "exceed_w_max": None,
                    "exceed_s": None}
        return w.record()

    # ------------------------------------------------------------------ status

    def status_payload(self, now: float | None = None) -> bytes | None:
        """The retained ``envelope/status`` payload (schema ``envelope_status``)."""
        t, a = self.target, self.active
        if t is None or a is None:
            return None
        ts = now if now is not None else (self._last_t or 0.0)
        self._status_t = ts
        ep = self._episode or self.last_episode
        payload = {
            "v": 1, "site": self.site, "ts": round(ts, 3),
            "source": t.source,
            "control_ids": list(t.control_ids),
            "default_id": self.schedule.default.id if self.schedule.default else None,
            "limits": {k: messages.rounded(v) for k, v in t.limits.to_dict().items()},
            "effective": {k: messages.rounded(v) for k, v in a.limits.to_dict().items()},
            "ramping": a.ramping,
            "contact_lost": t.contact_lost,
            "next_change": t.next_change,
            "site_w": messages.rounded(self.last_site_w),
            "compliant": self._episode is None and (self.last is None or self.last.compliant),
            "reason": None if self.last is None else self.last.reason[:_MAX_REASON],
            "last_exceedance": None if ep is None else ep.as_dict(),
            "counters": {"accepted": self.stats.accepted,
                         "rejected": sum(self.stats.rejected.values()),
                         "rate_limited": self.stats.rate_limited,
                         "exceedance_events": self.stats.exceedance_events,
                         "exceedance_s": round(self.stats.exceedance_s, 1)},
        }
        return messages.dumps(payload)


# How far "now" may lie before the last DSO message's time before the clock counts as gone back
# (a cycle's time stamp is taken before the messages that arrive during the cycle).
_CLOCK_BACK_S = 60.0


def agent_settings(env: EnvelopeSection, cycle_s: float = 5.0) -> AgentSettings:
    """:class:`AgentSettings` from the validated ``[envelope]`` config table; tightenings are
    anticipated by two control cycles (at least 10 s), so one cycle always falls in between."""
    return AgentSettings(
        lead_s=max(10.0, 2.0 * cycle_s),
        public_key=public_key_from_b64(env.dso_public_key),
        fallback=Limits(export_w=env.fallback_export_w, import_w=env.fallback_import_w),
        contact_timeout_s=env.contact_timeout_s,
        ramp_pct_per_min=env.ramp_pct_per_min,
        min_limit_pct=env.min_limit_pct,
        tolerance_w=env.tolerance_w,
        tolerance_pct=env.tolerance_pct,
        flood_burst=env.flood_burst,
        flood_per_min=env.flood_per_min,
        status_interval_s=env.status_interval_s,
        dso_heartbeat_timeout_s=env.dso_heartbeat_timeout_s,
    )


def _min_limit(a: float | None, b: float | None) -> float | None:
    """The tighter of two limits (``None`` = not limited)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
