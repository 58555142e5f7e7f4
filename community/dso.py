"""The DSO's envelope publisher: per-site controls and defaults, signed, retained, over MQTT.

The other end of ``gateway.envelope``: a distribution network operator (or the demo) keeps a
schedule of CSIP-AUS controls per site and publishes it on the contract of ``docs/mqtt-dso.md``:

* ``<root>/<site>/dso/controls`` -- retained, QoS 1: the site's current schedule (every control
  that has not ended), ``{"v": 1, "site", "issued", "controls": [...], "sig"}``;
* ``<root>/<site>/dso/default``  -- retained, QoS 1: the site's default control,
  ``{"v": 1, "site", "issued", "default": {...}, "sig"}``;
* ``<root>/<site>/dso/heartbeat`` -- QoS 0, *not* retained, every ``heartbeat_s`` domain
  seconds: ``{"v": 1, "site", "issued", "sig"}``, the DSO's signed sign of life (a gateway with
  ``dso_heartbeat_timeout_s`` counts a silent DSO behind a live broker as lost contact);
* ``<root>/<site>/dso/ack``      -- the gateway's acknowledgements, recorded here.

Each message is signed as a whole with the DSO's Ed25519 key (``gateway.signing``); each control
and default is exactly what ``gateway.envelope.parse_control`` / ``parse_default`` accept, and
nothing is published that they would refuse at the publication time. ``issued`` increases with
every new document the publisher signs (a re-send of an unchanged document after a reconnect
keeps its ``issued``: it is the same document).

CSIP-AUS semantics: gateways *add* listed controls to what they hold; a control that disappears
from a list is not cancelled. To cancel or change one, publish a newer (larger ``created``)
overlapping control; the publisher warns when a schedule reload drops a control still running.

Three entry points: :class:`DsoPublisher` (a long-running service, used by the demo), the
``hems dso`` service over a TOML schedule file (:func:`run_dso`), and a one-off publication
(:func:`publish_once`, ``hems dso publish``). :func:`dso_main` is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import ssl
import sys
import tomllib
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import aiomqtt
import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.clock import Clock, WallClock
from gateway import messages as _gm
from gateway import mqtt_calls
from gateway.envelope import (
    DEFAULT_CONFIG,
    LIMIT_NAMES,
    Control,
    DefaultControl,
    EnvelopeConfig,
    EnvelopeRejected,
    parse_control,
    parse_default,
)
from gateway.mqtt_calls import raise_if_cancelling
from gateway.signing import generate_keypair, load_private_key, sign, verify

log = logging.getLogger(__name__)

ROOT: Final = "hems/v1"
ACK_STATUSES: Final = ("received", "started", "completed", "rejected")
SITE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")  # = the gateway config's site_id rule
ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # = gateway.envelope's id rule
SCHEMA_DIR: Final = Path(__file__).parent / "schemas"
_STEP: Final = 0.001  # s between the `created` of controls loaded together (file order wins)


# --- topics and schemas ------------------------------------------------------------------------


@dataclass(frozen=True)
class DsoTopics:
    """The DSO topics of one site: ``<root>/<site>/dso/{controls,default,ack}``."""

    site: str
    root: str = ROOT

    @property
    def controls(self) -> str:
        return f"{self.root}/{self.site}/dso/controls"

    @property
    def default(self) -> str:
        return f"{self.root}/{self.site}/dso/default"

    @property
    def ack(self) -> str:
        return f"{self.root}/{self.site}/dso/ack"

    @property
    def heartbeat(self) -> str:
        return f"{self.root}/{self.site}/dso/heartbeat"


@functools.cache
def load_schema(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON schema file, refused (``gateway.messages.SchemaError``) if it uses a keyword that
    the gateway's small validator does not check."""
    p = Path(path)
    s: dict[str, Any] = json.loads(p.read_text("utf-8"))
    _gm._check_keywords(s, p.name)
    return s


def validate_payload(name: str, value: Any) -> list[str]:
    """Problems of ``value`` against ``community/schemas/<name>.json`` (``dso_controls``,
    ``dso_default``, ``dso_heartbeat``, ``dso_ack``); empty when valid. Messages name the
    field."""
    errors: list[str] = []
    _gm._validate(load_schema(SCHEMA_DIR / f"{name}.json"), value, "", errors)
    return errors


# --- small parsers (shared by the schedule file and the command line) -------------------------

_DUR_RE: Final = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?:in)?)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?"
)
_HMS_RE: Final = re.compile(r"(\d+):([0-5]\d)(?::([0-5]\d(?:\.\d+)?))?")


_UNITS: Final = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))
_DUR_HELP: Final = "must be seconds or a duration like '1h30m' or '01:30'"


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds), ``"HH:MM[:SS]"`` or ``"1h30m"``/``"90s"``/``"2d"``.
    ValueError with the reason otherwise (never negative, never non-finite)."""
    if isinstance(value, bool):
        raise ValueError(f"{_DUR_HELP}, got {value!r}")
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        text = value.strip()
        m = _HMS_RE.fullmatch(text)
        d = _DUR_RE.fullmatch(text)
        if m:
            f = int(m[1]) * 3600.0 + int(m[2]) * 60.0 + (float(m[3]) if m[3] else 0.0)
        elif text and d:
            f = sum(float(d[k] or 0) * u for k, u in _UNITS)
        else:
            raise ValueError(f"{_DUR_HELP}, got {value!r}")
    else:
        raise ValueError(f"must be seconds or a duration string, got {type(value).__name__}")
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"must be a finite duration >= 0, got {value!r}")
    return f


def parse_time(value: object) -> float:
    """Unix seconds from a number, an aware ``datetime`` (TOML offset date-time) or an ISO 8601
    string with a time zone (``Z`` or ``+hh:mm``). A time without a zone is refused: it would
    mean different instants on the DSO host and on the gateways."""
    if isinstance(value, bool):
        raise ValueError(f"must be a time, got {value!r}")
    if isinstance(value, int | float):
        f = float(value)
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"must be a positive Unix time, got {value!r}")
        return f
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"is not an ISO 8601 time: {value!r}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"needs a time zone (e.g. 'Z' or '+02:00'): {value.isoformat()}")
        return value.timestamp()
    if isinstance(value, date):
        raise ValueError(f"needs a time of day and a zone, got the date {value.isoformat()}")
    raise ValueError(f"must be a time, got {type(value).__name__}")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


# --- schedules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSchedule:
    """What the DSO wants one site to hold: its default (or none) and its controls."""

    site: str
    default: DefaultControl | None = None
    controls: tuple[Control, ...] = ()

    def __post_init__(self) -> None:
        if not SITE_RE.fullmatch(self.site):
            raise ValueError(f"site {self.site!r} must be 1-48 of a-z 0-9 _ - (an MQTT level)")
        ids = [c.id for c in self.controls]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"site {self.site}: control id(s) {', '.join(dup)} given twice")
        for c in self.controls:
            if c.site != self.site:
                raise ValueError(f"control {c.id} is for site {c.site!r}, not {self.site!r}")
        if self.default is not None and self.default.site != self.site:
            raise ValueError(f"default {self.default.id} is for site {self.default.site!r}")


class ScheduleError(ValueError):
    """A schedule file is wrong. ``errors`` holds ``(where, message)`` pairs, ``where`` being
    the TOML key path (``sites.home-1.controls[2].export_w``); ``str()`` lists them all, each
    prefixed with the file name."""

    def __init__(self, path: str, errors: Sequence[tuple[str, str]]) -> None:
        self.path = path
        self.errors = list(errors)
        super().__init__("\n".join(f"{path}: {w}: {m}" if w else f"{path}: {m}" for w, m in errors))


def _wire(d: dict[str, Any]) -> dict[str, Any]:
    # Numbers always as floats: the signature covers the JSON text, where 1500 != 1500.0.
    return {k: v if isinstance(v, str) else float(v) for k, v in d.items() if v is not None}


def control_wire(c: Control) -> dict[str, Any]:
    """The control as published: ``to_dict()`` without unset (``None``) limits, numbers as
    floats."""
    return _wire(c.to_dict())


def default_wire(d: DefaultControl) -> dict[str, Any]:
    """The default as published: ``to_dict()`` without unset limits, numbers as floats."""
    return _wire(d.to_dict())


def _content(obj: Control | DefaultControl) -> str:
    """Identity of a control's content, ``created`` excluded (did the DSO change it?)."""
    d = {k: v for k, v in obj.to_dict().items() if k != "created"}
    return json.dumps(d, sort_keys=True)


_CONTROL_KEYS: Final = frozenset(
    {"id", "created", "start", "offset", "duration", "duration_s", *LIMIT_NAMES}
)
_DEFAULT_KEYS: Final = frozenset({"id", "created", *LIMIT_NAMES})


class _Reader:
    """Collects errors with their key path instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def fail(self, where: str, msg: str) -> None:
        self.errors.append((where, msg))

    def unknown(self, table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
        extra = sorted(set(table) - set(allowed))
        for k in extra:
            # A typo ("export_kw") would otherwise read as "not limited": refuse it.
            self.fail(_key(where, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def limits(self, t: Mapping[str, Any], where: str, config: EnvelopeConfig) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in LIMIT_NAMES:
            if n not in t:
                continue
            v = t[n]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                self.fail(_key(where, n), f"must be a finite number of W, got {v!r}")
            elif v < 0:
                self.fail(_key(where, n), f"must be >= 0 W, got {v}")
            elif v > config.max_limit_w:
                self.fail(_key(where, n), f"{v} W exceeds the maximum {config.max_limit_w:.0f} W "
                          "(a unit error? limits are in W)")
            else:
                out[n] = float(v)
        if not any(n in t for n in LIMIT_NAMES):
            self.fail(where, f"sets none of {', '.join(LIMIT_NAMES)}")
        return out

    def ident(self, t: Mapping[str, Any], where: str) -> str | None:
        if "id" not in t:
            return None
        v = t["id"]
        if not isinstance(v, str) or not ID_RE.fullmatch(v):
            self.fail(_key(where, "id"), f"must be 1-64 of A-Z a-z 0-9 . _ : -, got {v!r}")
            return None
        return v

    def time(self, t: Mapping[str, Any], key: str, where: str) -> float | None:
        if key not in t:
            return None
        try:
            return parse_time(t[key])
        except ValueError as e:
            self.fail(_key(where, key), str(e))
            return None


def _key(where: str, k: str) -> str:
    return f"{where}.{k}" if where else k


def _auto_id(site: str, start: float, duration: float, limits: Mapping[str, float]) -> str:
    h = hashlib.sha1(json.dumps([site, start, duration, sorted(limits.items())]).encode())
    return f"{site[:40]}-{h.hexdigest()[:12]}"


def parse_schedule(
    data: Mapping[str, Any],
    source: str,
    *,
    now: float,
    scenario_start: float | None = None,
    previous: Mapping[str, SiteSchedule] | None = None,
    config: EnvelopeConfig = DEFAULT_CONFIG,
) -> dict[str, SiteSchedule]:
    """Validate a parsed schedule document (see :func:`load_schedule` for the format).

    ``created`` not given in the file: a control or default unchanged since ``previous`` keeps
    its ``created``; a new or changed one gets ``now`` plus 1 ms per position in the file (so
    within one load, later in the file wins an overlap; across loads, the newer edit wins).
    Raises :class:`ScheduleError` listing every problem with its key path."""
    r = _Reader()
    previous = previous or {}
    r.unknown(data, {"start", "sites"}, "")
    base = r.time(data, "start", "")
    if base is None:
        base = scenario_start
    sites = data.get("sites", {})
    if not isinstance(sites, Mapping) or not sites:
        r.fail("sites", "needs at least one [sites.<site_id>] table")
        raise ScheduleError(source, r.errors)
    out: dict[str, SiteSchedule] = {}
    seq = 0
    for site, st in sites.items():
        where = f"sites.{site}"
        if not SITE_RE.fullmatch(site):
            r.fail(where, "site id must be 1-48 of a-z 0-9 _ - starting with a letter or digit")
            continue
        if not isinstance(st, Mapping):
            r.fail(where, "must be a table")
            continue
        r.unknown(st, {"default", "controls"}, where)
        prev = previous.get(site)
        prev_controls = {c.id: c for c in prev.controls} if prev else {}
        default: DefaultControl | None = None
        if "default" in st:
            dw = f"{where}.default"
            dt = st["default"]
            if not isinstance(dt, Mapping):
                r.fail(dw, "must be a table")
            else:
                n_err = len(r.errors)
                r.unknown(dt, _DEFAULT_KEYS, dw)
                did = r.ident(dt, dw) or f"{site[:40]}-default"
                limits = r.limits(dt, dw, config)
                created = r.time(dt, "created", dw)
                if len(r.errors) == n_err:
                    seq += 1
                    draft = DefaultControl(did, site, created or now, **limits)
                    held = prev.default if prev else None
                    default = _version(r, dw, draft, held, created, now, seq)
        controls: list[Control] = []
        raw_controls = st.get("controls", [])
        if not isinstance(raw_controls, list):
            r.fail(f"{where}.controls", "must be an array of tables ([[sites.<id>.controls]])")
            raw_controls = []
        seen: dict[str, str] = {}
        for i, ct in enumerate(raw_controls):
            cw = f"{where}.controls[{i}]"
            if not isinstance(ct, Mapping):
                r.fail(cw, "must be a table")
                continue
            n_err = len(r.errors)
            r.unknown(ct, _CONTROL_KEYS, cw)
            cid = r.ident(ct, cw)
            limits = r.limits(ct, cw, config)
            created = r.time(ct, "created", cw)
            start: float | None = None
            if ("start" in ct) == ("offset" in ct):
                r.fail(cw, "give exactly one of 'start' (a time) or 'offset' (from the start)")
            elif "start" in ct:
                start = r.time(ct, "start", cw)
            else:
                try:
                    off = parse_duration(ct["offset"])
                except ValueError as e:
                    r.fail(f"{cw}.offset", str(e))
                else:
                    if base is None:
                        r.fail(f"{cw}.offset", "needs a top-level 'start' time in the file "
                               "(or a scenario start from the caller)")
                    else:
                        start = base + off
            duration: float | None = None
            if ("duration" in ct) == ("duration_s" in ct):
                r.fail(cw, "give exactly one of 'duration' (e.g. '2h') or 'duration_s'")
            else:
                dk = "duration" if "duration" in ct else "duration_s"
                try:
                    duration = parse_duration(ct[dk])
                except ValueError as e:
                    r.fail(f"{cw}.{dk}", str(e))
                else:
                    if duration <= 0:
                        r.fail(f"{cw}.{dk}", "must be > 0")
                    elif duration > config.max_duration_s:
                        r.fail(f"{cw}.{dk}", f"{duration:.0f} s exceeds the maximum "
                               f"{config.max_duration_s:.0f} s")
            if len(r.errors) != n_err or start is None or duration is None:
                continue
            cid = cid or _auto_id(site, start, duration, limits)
            if cid in seen:
                r.fail(f"{cw}.id", f"control id {cid!r} already used at {seen[cid]}")
                continue
            seen[cid] = cw
            seq += 1
            draft_c = Control(cid, site, created or now, start, duration, **limits)
            c = _version(r, cw, draft_c, prev_controls.get(cid), created, now, seq)
            if c is not None:
                controls.append(c)
        if prev is not None:
            for gone in sorted(set(prev_controls) - {c.id for c in controls}):
                old = prev_controls[gone]
                if old.end > now:
                    log.warning(
                        "dso: control %s of %s left the schedule but gateways keep it until "
                        "%s (CSIP-AUS); to cancel it publish a newer overlapping control",
                        gone, site, _iso(old.end))
        if r.errors:
            continue
        try:
            out[site] = SiteSchedule(site, default, tuple(sorted(controls,
                                                                  key=lambda c: (c.start, c.id))))
        except ValueError as e:
            r.fail(where, str(e))
    if r.errors:
        raise ScheduleError(source, r.errors)
    return out


_V = TypeVar("_V", Control, DefaultControl)


def _version(
    r: _Reader, where: str, draft: _V, held: _V | None, created: float | None, now: float, seq: int
) -> _V | None:
    """Give ``draft`` its ``created`` (module rule in :func:`parse_schedule`)."""
    if held is not None and _content(held) == _content(draft) and created is None:
        return held  # unchanged: same version, same signature content
    if created is not None:
        if held is not None and _content(held) != _content(draft) and created <= held.created:
            r.fail(f"{where}.created", f"changed but created {_iso(created)} is not newer than "
                   f"the published version ({_iso(held.created)}); gateways would refuse it")
            return None
        return replace(draft, created=created)
    t = now + seq * _STEP
    if held is not None:
        t = max(t, held.created + _STEP)
    return replace(draft, created=round(t, 3))


def load_schedule(
    path: str | os.PathLike[str],
    *,
    now: float,
    scenario_start: float | None = None,
    previous: Mapping[str, SiteSchedule] | None = None,
    config: EnvelopeConfig = DEFAULT_CONFIG,
) -> dict[str, SiteSchedule]:
    """Read a TOML schedule file. Format::

        start = 2026-06-21T00:00:00Z      # optional: the reference of 'offset'

        [sites.home-1.default]            # the site's default control (failsafe)
        export_w = 5000                   # any of export_w, import_w, generation_w, load_w (W)
        # id = "home-1-default"           # optional; created = <time> optional

        [[sites.home-1.controls]]
        id = "midday"                     # optional (derived from the content otherwise)
        offset = "11:00"                  # or: start = 2026-06-21T11:00:00Z
        duration = "2h"                   # or: duration_s = 7200
        export_w = 1500

    Times need a zone. Raises :class:`ScheduleError` (every problem, with the file name and the
    key path) or ``ScheduleError`` for a file that cannot be read or is not TOML."""
    p = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(p, [("", f"cannot read: {e}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScheduleError(p, [("", f"not valid TOML: {e}")]) from None
    return parse_schedule(data, p, now=now, scenario_start=scenario_start, previous=previous,
                          config=config)


# --- acknowledgements -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """One acknowledgement from a gateway (``t`` is the gateway's time, ``received`` ours)."""

    site: str
    control_id: str | None  # None: a rejected message the gateway could not attribute
    status: str
    t: float
    reason: str | None
    received: float


class AckLog:
    """Acknowledgements: counters, the latest status time per control, the last ``keep`` acks in
    memory and, if ``db_path`` is given, every ack in the SQLite table ``dso_acks``."""

    def __init__(self, db_path: str | os.PathLike[str] | None = None, keep: int = 10_000) -> None:
        self.counts: Counter[str] = Counter()  # by status
        self.malformed = 0
        self.unknown_control = 0  # valid acks naming a control this publisher never sent
        self.db_errors = 0
        self.last_error: str | None = None
        self.recent: deque[Ack] = deque(maxlen=keep)
        self._status: dict[tuple[str, str | None], dict[str, float]] = {}
        self._db: sqlite_utils.Database | None = None
        if db_path is not None:
            self._db = sqlite_utils.Database(str(db_path))
            self._db.enable_wal()
            # Acks are a record, not money: no fsync per ack (WAL + NORMAL is still crash-safe).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db["dso_acks"].create(  # type: ignore[union-attr]
                {"site": str, "control_id": str, "status": str, "t": float, "reason": str,
                 "received": float}, if_not_exists=True)

    @property
    def total(self) -> int:
        """Valid acks recorded."""
        return sum(self.counts.values())

    def record(self, ack: Ack, known: bool) -> None:
        """Count and keep a valid ack (``known``: the control id was published by us)."""
        self.counts[ack.status] += 1
        if not known:
            self.unknown_control += 1
        self.recent.append(ack)
        self._status.setdefault((ack.site, ack.control_id), {})[ack.status] = ack.t
        if self._db is not None:
            try:
                self._db["dso_acks"].insert(  # type: ignore[union-attr]
                    {"site": ack.site, "control_id": ack.control_id, "status": ack.status,
                     "t": ack.t, "reason": ack.reason, "received": ack.received})
            except Exception as e:  # a full disk must not stop the publisher
                self.db_errors += 1
                self.last_error = f"ack database: {e}"
                if self.db_errors == 1 or self.db_errors % 100 == 0:
                    log.error("dso: cannot store ack (%d failures): %s", self.db_errors, e)

    def bad(self, reason: str) -> None:
        """Count a malformed ack (logged; the first 10, then every 100th)."""
        self.malformed += 1
        self.last_error = reason
        if self.malformed <= 10 or self.malformed % 100 == 0:
            log.warning("dso: malformed ack #%d: %s", self.malformed, reason)

    def status(self, site: str, control_id: str | None) -> dict[str, float]:
        """``{status: gateway time}`` of the latest ack of each status for that control."""
        return dict(self._status.get((site, control_id), {}))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def parse_ack(topic_site: str, payload: bytes, received: float) -> Ack:
    """Validate an ack payload received on ``<root>/<topic_site>/dso/ack``.
    ValueError naming what was wrong."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"ack on site {topic_site} is not UTF-8 JSON: {e}") from None
    problems = validate_payload("dso_ack", obj)
    if problems:
        raise ValueError(f"ack on site {topic_site}: {'; '.join(problems[:5])}")
    if obj["site"] != topic_site:
        raise ValueError(f"ack for site {obj['site']!r} published on site {topic_site}'s topic")
    return Ack(topic_site, obj["control_id"], obj["status"], float(obj["t"]), obj.get("reason"),
               received)


# --- broker connection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, system CAs)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Broker:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker url must start with mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker url has no host: {url!r}")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise ValueError(f"broker url has an invalid port: {url!r}") from None
        return cls(parts.hostname, port, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, parts.scheme == "mqtts")

    def client(self, identifier: str, timeout_s: float) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host, self.port, username=self.username, password=self.password,
            identifier=identifier, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
            keepalive=30, timeout=timeout_s,
            tls_context=ssl.create_default_context() if self.tls else None,
            logger=logging.getLogger("community.dso.paho"))


def _payload_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray):
        return bytes(raw)
    return str(raw if raw is not None else "").encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --- the publisher ----------------------------------------------------------------------------


@dataclass
class DsoStats:
    """Counters of the publisher (this process)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0  # messages acknowledged by the broker (re-sends included)
    documents: int = 0  # distinct signed documents (each with a new `issued`)
    skipped: int = 0  # controls/defaults withheld because a gateway would refuse them now
    reloads: int = 0
    reload_errors: int = 0
    heartbeats: int = 0  # heartbeat messages handed to the broker (QoS 0: not acknowledged)
    last_error: str | None = None


@dataclass
class _SiteState:
    schedule: SiteSchedule
    controls_key: str | None = None
    default_key: str | None = None
    controls_msg: dict[str, Any] | None = None
    default_msg: dict[str, Any] | None = None
    sent_ids: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)


class DsoPublisher:
    """Publishes each site's current controls and default as retained, signed QoS-1 messages.

    Re-publishes a site when its schedule changes (:meth:`set_schedule`, :meth:`add_control`) or
    one of its published controls ends (from ``clock``, the domain time), and everything on each
    (re)connection. Every ``heartbeat_s`` domain seconds (and at each connection) it publishes
    each site's signed heartbeat (QoS 0, not retained; ``heartbeat_s = 0``: none). Reconnects
    with exponential backoff (real seconds, ``min_backoff_s`` doubling to ``max_backoff_s``).
    Records the gateways' acks in :attr:`acks`. Run it with :meth:`run`."""

    def __init__(
        self,
        broker_url: str,
        private_key: Ed25519PrivateKey,
        clock: Clock,
        sites: Iterable[SiteSchedule],
        *,
        root: str = ROOT,
        identifier: str | None = None,
        ack_db: str | os.PathLike[str] | None = None,
        config: EnvelopeConfig = DEFAULT_CONFIG,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        timeout_s: float = 5.0,
        heartbeat_s: float = 60.0,
    ) -> None:
        if not (math.isfinite(heartbeat_s) and heartbeat_s >= 0):
            raise ValueError(f"heartbeat_s must be 0 (off) or a positive number of seconds, "
                             f"got {heartbeat_s!r}")
        self.broker = Broker.from_url(broker_url)
        self.url = broker_url
        self.key = private_key
        self.clock = clock
        self.root = root
        self.identifier = identifier or f"hems-dso-{os.getpid()}"
        self.config = config
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self._next_beat: float | None = None  # domain time of the next heartbeat; None = now
        self.stats = DsoStats()
        self.acks = AckLog(ack_db)
        self.connected = asyncio.Event()
        self._sites: dict[str, _SiteState] = {}
        self._changed = asyncio.Event()
        self._issued = 0.0
        self._resend = False
        for s in sites:
            self._sites[s.site] = _SiteState(s)

    # -- the schedule

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._sites)

    def schedule(self, site: str) -> SiteSchedule:
        return self._sites[site].schedule

    def set_schedule(self, schedule: SiteSchedule) -> None:
        """Replace (or add) one site's schedule; publication follows at once if connected."""
        st = self._sites.get(schedule.site)
        if st is None:
            self._sites[schedule.site] = _SiteState(schedule)
        else:
            st.schedule = schedule
        self._changed.set()

    def add_control(self, control: Control) -> None:
        """Add (or replace, by id) one control in its site's schedule."""
        s = self._sites[control.site].schedule
        rest = tuple(c for c in s.controls if c.id != control.id)
        self.set_schedule(replace(s, controls=tuple(sorted((*rest, control),
                                                           key=lambda c: (c.start, c.id)))))

    def published(self, site: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The last signed (controls, default) messages of ``site``."""
        st = self._sites[site]
        return st.controls_msg, st.default_msg

    # -- documents

    def _next_issued(self, now: float) -> float:
        t = round(now, 3)
        if t <= self._issued:
            t = round(self._issued + _STEP, 3)
        self._issued = t
        return t

    def _current(self, st: _SiteState, now: float) -> tuple[list[dict[str, Any]],
                                                             dict[str, Any] | None]:
        """Controls and default of a site that a gateway would accept at ``now``."""
        site = st.schedule.site
        controls: list[dict[str, Any]] = []
        for c in st.schedule.controls:
            if c.end <= now:
                continue
            d = control_wire(c)
            try:
                parse_control(d, site, now, self.config)
            except EnvelopeRejected as e:
                self._withhold(st, c.id, e)
                continue
            controls.append(d)
        default: dict[str, Any] | None = None
        if st.schedule.default is not None:
            dd = default_wire(st.schedule.default)
            try:
                parse_default(dd, site, now, self.config)
                default = dd
            except EnvelopeRejected as e:
                self._withhold(st, st.schedule.default.id, e)
        return controls, default

    def _withhold(self, st: _SiteState, cid: str, e: EnvelopeRejected) -> None:
        self.stats.skipped += 1
        if cid not in st.warned:
            st.warned.add(cid)
            log.warning("dso: %s of site %s not published: %s", cid, st.schedule.site, e.reason)

    def _build(self, site: str, now: float) -> list[tuple[str, dict[str, Any], bool]]:
        """Sign what changed for ``site``; returns (topic, message, is_new) to send."""
        st = self._sites[site]
        topics = DsoTopics(site, self.root)
        controls, default = self._current(st, now)
        out: list[tuple[str, dict[str, Any], bool]] = []
        key = json.dumps(controls, sort_keys=True)
        if key != st.controls_key or st.controls_msg is None:
            msg = sign({"v": 1, "site": site, "issued": self._next_issued(now),
                        "controls": controls}, self.key)
            self._check("dso_controls", msg)
            st.controls_key, st.controls_msg = key, msg
            st.sent_ids.update(c["id"] for c in controls)
            out.append((topics.controls, msg, True))
        elif self._resend:
            out.append((topics.controls, st.controls_msg, False))
        if default is not None:
            dkey = json.dumps(default, sort_keys=True)
            if dkey != st.default_key or st.default_msg is None:
                msg = sign({"v": 1, "site": site, "issued": self._next_issued(now),
                            "default": default}, self.key)
                self._check("dso_default", msg)
                st.default_key, st.default_msg = dkey, msg
                st.sent_ids.add(default["id"])
                out.append((topics.default, msg, True))
            elif self._resend:
                out.append((topics.default, st.default_msg, False))
        return out

    def heartbeat(self, site: str, now: float) -> dict[str, Any]:
        """The signed heartbeat of ``site`` at ``now`` (a fresh ``issued``, shared with the
        documents' sequence, so it always increases)."""
        msg = sign({"v": 1, "site": site, "issued": self._next_issued(now)}, self.key)
        self._check("dso_heartbeat", msg)
        return msg

    @staticmethod
    def _check(name: str, msg: dict[str, Any]) -> None:
        problems = validate_payload(name, msg)
        if problems:  # a bug here, not bad input: never put it on the wire
            raise RuntimeError(f"dso: built an invalid {name} message: {problems}")

    def _next_wake(self, now: float) -> float | None:
        """Next domain time at which a site's document may change: a control ending, or a
        withheld one becoming acceptable (start within reach, created no longer ahead)."""
        cfg = self.config
        ts = [t for st in self._sites.values() for c in st.schedule.controls
              for t in (c.end, c.start - cfg.max_start_future_s, c.created - cfg.max_clock_skew_s)
              if t > now]
        ts += [st.schedule.default.created - cfg.max_clock_skew_s for st in self._sites.values()
               if st.schedule.default is not None
               and st.schedule.default.created - cfg.max_clock_skew_s > now]
        if self.heartbeat_s > 0 and self._next_beat is not None:
            ts.append(self._next_beat)
        return min(ts) if ts else None

    # -- service

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, publish, record acks, reconnect with backoff; return once ``stop`` is set."""
        delay = self.min_backoff_s
        last_msg: str | None = None
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    delay = self.min_backoff_s
                except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                    raise_if_cancelling()  # a 3.11 TaskGroup puts a child's error first
                    e = eg.exceptions[0]
                    msg = str(e) or type(e).__name__
                    if self.connected.is_set():
                        self.stats.disconnects += 1
                        delay = self.min_backoff_s
                        log.warning("dso: connection to %s lost: %s; reconnecting", self.url, msg)
                    else:
                        self.stats.connect_failures += 1
                        (log.error if msg != last_msg else log.debug)(
                            "dso: cannot connect to %s: %s; retrying", self.url, msg)
                    last_msg = msg
                    self.stats.last_error = msg
                    self.connected.clear()
                if stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                delay = min(delay * 2.0, self.max_backoff_s)
        finally:
            self.connected.clear()
            self.acks.close()

    async def _session(self, stop: asyncio.Event) -> None:
        async with self.broker.client(self.identifier, self.timeout_s) as client:
            ack_topics: dict[str, str] = {}  # grows when set_schedule() adds a site
            await self._subscribe_acks(client, ack_topics)
            self.stats.connects += 1
            self._resend = True  # the broker may have lost retained messages while away
            self._next_beat = None  # a heartbeat at once: nothing was delivered while away
            log.info("dso: connected to %s; publishing %d site(s)", self.url, len(self._sites))
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._read_acks(client, ack_topics))
                    tg.create_task(self._publish_loop(client, ack_topics))
                    await stop.wait()
                    raise _Done
            except* _Done:
                pass

    async def _subscribe_acks(self, client: aiomqtt.Client, ack_topics: dict[str, str]) -> None:
        for site in list(self._sites):
            topic = DsoTopics(site, self.root).ack
            if topic not in ack_topics:
                await mqtt_calls.subscribe(client, topic, qos=1, timeout_s=self.timeout_s)
                ack_topics[topic] = site

    async def _publish_loop(self, client: aiomqtt.Client, ack_topics: dict[str, str]) -> None:
        while True:
            self._changed.clear()
            await self._subscribe_acks(client, ack_topics)
            now = self.clock.now()
            for site in list(self._sites):
                for topic, msg, new in self._build(site, now):
                    await mqtt_calls.publish(client, topic, _dumps(msg), qos=1, retain=True,
                                             timeout_s=self.timeout_s)
                    self.stats.published += 1
                    if new:
                        self.stats.documents += 1
                        log.info("dso: published %s (issued %s)", topic, _iso(msg["issued"]))
            if self.heartbeat_s > 0 and (self._next_beat is None or now >= self._next_beat):
                await self._beat(client, now)
            self._resend = False
            self.connected.set()
            await self._wait(self._next_wake(now))

    async def _beat(self, client: aiomqtt.Client, now: float) -> None:
        """Every site's heartbeat. QoS 0 and not retained: a heartbeat is only worth anything
        now; a lost one is covered by the next (the gateways' timeout spans several), and
        neither the broker nor a reconnecting gateway should ever be handed an old one."""
        for site in list(self._sites):
            msg = self.heartbeat(site, now)
            await mqtt_calls.publish(client, DsoTopics(site, self.root).heartbeat, _dumps(msg),
                                     qos=0, retain=False, timeout_s=self.timeout_s)
            self.stats.heartbeats += 1
        self._next_beat = now + self.heartbeat_s

    async def _wait(self, wake: float | None) -> None:
        """Until the schedule changes or domain time reaches ``wake``."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._changed.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(self.clock.sleep_until(wake)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _read_acks(self, client: aiomqtt.Client, ack_topics: Mapping[str, str]) -> None:
        async for m in client.messages:
            site = ack_topics.get(str(m.topic))
            if site is None:
                continue
            try:
                ack = parse_ack(site, _payload_bytes(m.payload), self.clock.now())
            except ValueError as e:
                self.acks.bad(str(e))
                continue
            known = ack.control_id is None or ack.control_id in self._sites[site].sent_ids
            self.acks.record(ack, known)
            log.debug("dso: ack %s %s %s", site, ack.control_id, ack.status)


class _Done(Exception):
    """Internal: ends a session's TaskGroup on stop."""


# --- the `hems dso` service --------------------------------------------------------------------


@dataclass(frozen=True)
class DsoConfig:
    """What ``hems dso`` runs: a schedule file, the DSO's private key file, the broker."""

    schedule_path: str
    key_path: str
    broker_url: str
    ack_db: str | None = None
    scenario_start: float | None = None  # reference of `offset` when the file has no `start`
    root: str = ROOT
    identifier: str | None = None
    reload_interval_s: float = 2.0  # real seconds between checks of the schedule file
    heartbeat_s: float = 60.0  # domain s between each site's signed heartbeat; 0 = none


async def run_dso(config: DsoConfig, stop: asyncio.Event, clock: Clock | None = None
                  ) -> DsoPublisher:
    """Serve ``config`` until ``stop`` is set: publish the schedule file and re-publish when it
    changes (a file that fails to load is logged and the last good schedule kept). Raises
    :class:`ScheduleError` / ValueError at start only (bad file, bad key, bad url)."""
    clock = clock or WallClock()
    key = load_private_key(config.key_path)
    schedules = load_schedule(config.schedule_path, now=clock.now(),
                              scenario_start=config.scenario_start)
    pub = DsoPublisher(config.broker_url, key, clock, schedules.values(), root=config.root,
                       identifier=config.identifier, ack_db=config.ack_db,
                       heartbeat_s=config.heartbeat_s)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(pub.run(stop))
        tg.create_task(_watch(config, pub, stop, clock))
    return pub


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_mtime_ns, s.st_size)


async def _watch(config: DsoConfig, pub: DsoPublisher, stop: asyncio.Event, clock: Clock) -> None:
    stamp = _stamp(config.schedule_path)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.reload_interval_s):
                await stop.wait()
        new = _stamp(config.schedule_path)
        if stop.is_set() or new == stamp:
            continue
        stamp = new
        previous = {s: pub.schedule(s) for s in pub.sites}
        try:
            schedules = load_schedule(config.schedule_path, now=clock.now(),
                                      scenario_start=config.scenario_start, previous=previous)
        except ScheduleError as e:
            pub.stats.reload_errors += 1
            pub.stats.last_error = str(e)
            log.error("dso: schedule not reloaded, keeping the last good one:\n%s", e)
            continue
        pub.stats.reloads += 1
        for s in schedules.values():
            pub.set_schedule(s)
        for site in set(previous) - set(schedules):
            log.warning("dso: site %s left the schedule; its retained messages stay", site)
        log.info("dso: schedule %s reloaded (%d sites)", config.schedule_path, len(schedules))


# --- one-off publication ----------------------------------------------------------------------


def make_control(
    site: str,
    start: float,
    duration_s: float,
    *,
    created: float,
    control_id: str | None = None,
    **limits: float | None,
) -> Control:
    """A validated control (ValueError / EnvelopeRejected naming the problem)."""
    unknown = set(limits) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown limit(s) {', '.join(sorted(unknown))}")
    cid = control_id or f"cli-{round(created * 1000)}"
    d = {"id": cid, "site": site, "created": float(created), "start": float(start),
         "duration_s": float(duration_s),
         **{k: float(v) for k, v in limits.items() if v is not None}}
    return parse_control(d, site, created)


async def publish_once(
    broker_url: str,
    private_key: Ed25519PrivateKey,
    site: str,
    *,
    control: Control | None = None,
    default: DefaultControl | None = None,
    clock: Clock | None = None,
    root: str = ROOT,
    merge: bool = True,
    retained_wait_s: float = 1.0,
    timeout_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Publish one control (added to the site's retained list) and/or a new default, then
    disconnect. Returns the signed messages sent.

    With ``merge``, the retained controls list is read first (``retained_wait_s`` real seconds)
    and its still-valid controls, if signed by this same key, are kept in the new list, so that
    a gateway connecting later still receives them. Do not mix with a running ``hems dso`` for
    the same site: its next re-publication replaces the list with its own schedule."""
    clock = clock or WallClock()
    if not SITE_RE.fullmatch(site):
        raise ValueError(f"site {site!r} must be 1-48 of a-z 0-9 _ -")
    if control is None and default is None:
        raise ValueError("nothing to publish: give a control and/or a default")
    topics = DsoTopics(site, root)
    broker = Broker.from_url(broker_url)
    sent: list[dict[str, Any]] = []
    async with broker.client(f"hems-dso-once-{os.getpid()}", timeout_s) as client:
        now = clock.now()
        issued = round(now, 3)
        if control is not None:
            keep: list[dict[str, Any]] = []
            if merge:
                old = await _retained(client, topics.controls, retained_wait_s)
                keep, old_issued = _still_valid(old, private_key, site, now, control.id)
                issued = max(issued, round(old_issued + _STEP, 3))
            controls = sorted([*keep, control_wire(parse_control(control_wire(control), site,
                                                                 now))],
                              key=lambda c: (c["start"], c["id"]))
            msg = sign({"v": 1, "site": site, "issued": issued, "controls": controls},
                       private_key)
            DsoPublisher._check("dso_controls", msg)
            await mqtt_calls.publish(client, topics.controls, _dumps(msg), qos=1, retain=True,
                                     timeout_s=timeout_s)
            sent.append(msg)
        if default is not None:
            d = default_wire(parse_default(default_wire(default), site, now))
            msg = sign({"v": 1, "site": site, "issued": round(issued + _STEP, 3), "default": d},
                       private_key)
            DsoPublisher._check("dso_default", msg)
            await mqtt_calls.publish(client, topics.default, _dumps(msg), qos=1, retain=True,
                                     timeout_s=timeout_s)
            sent.append(msg)
    return sent


async def _retained(client: aiomqtt.Client, topic: str, wait_s: float) -> object | None:
    await client.subscribe(topic, qos=1)
    try:
        async with asyncio.timeout(wait_s):
            async for m in client.messages:
                if str(m.topic) == topic and m.retain:
                    return json.loads(_payload_bytes(m.payload).decode("utf-8"))
    except (TimeoutError, ValueError, UnicodeDecodeError):
        pass
    finally:
        await client.unsubscribe(topic)
    return None


def _still_valid(old: object, key: Ed25519PrivateKey, site: str, now: float, replaced_id: str
                 ) -> tuple[list[dict[str, Any]], float]:
    """Controls of a retained list worth keeping, and its ``issued`` (0 if none)."""
    if old is None:
        return [], 0.0
    try:
        body = verify(old, key.public_key())
    except ValueError as e:
        log.warning("dso: the retained controls list is not ours (%s); replacing it", e)
        return [], 0.0
    keep: list[dict[str, Any]] = []
    for c in body.get("controls") or []:
        if isinstance(c, dict) and c.get("id") != replaced_id:
            with contextlib.suppress(EnvelopeRejected):
                keep.append(control_wire(parse_control(c, site, now)))
    issued = body.get("issued")
    if isinstance(issued, int | float) and not isinstance(issued, bool):
        return keep, float(issued)
    return keep, 0.0


# --- command line -----------------------------------------------------------------------------


def _limit_args(p: argparse.ArgumentParser) -> None:
    for n in LIMIT_NAMES:
        p.add_argument(f"--{n.replace('_', '-')}", type=float, default=None, metavar="W",
                       help=f"{n.replace('_w', '')} limit, W")


def build_parser() -> argparse.ArgumentParser:
    """``hems dso`` (serve a schedule file); ``hems dso publish``; ``hems dso keygen``."""
    p = argparse.ArgumentParser(prog="hems dso", description="DSO envelope publisher")
    p.add_argument("--schedule", required=True, help="TOML schedule file (reloaded on change)")
    p.add_argument("--key", required=True, help="the DSO's Ed25519 private key (PEM)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--ack-db", default=None, help="SQLite file recording the gateways' acks")
    p.add_argument("--start", default=None, help="reference time of 'offset' entries (ISO)")
    p.add_argument("--root", default=ROOT, help="topic root")
    p.add_argument("--heartbeat", type=float, default=60.0, metavar="S",
                   help="seconds between each site's signed heartbeat (0 = none; gateways with "
                        "dso_heartbeat_timeout_s need it)")
    return p


def build_publish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hems dso publish", description="publish one control")
    p.add_argument("--site", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--default", action="store_true", help="publish the site's default instead")
    p.add_argument("--start", default="now", help="'now', '+30m' (from now) or an ISO time")
    p.add_argument("--duration", default="1h", help="e.g. 3600, '2h', '01:30'")
    p.add_argument("--id", default=None, help="control id (default cli-<created ms>)")
    p.add_argument("--no-merge", action="store_true", help="replace the retained list")
    p.add_argument("--root", default=ROOT)
    _limit_args(p)
    return p


def build_keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hems dso keygen", description="new DSO key pair")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", default="dso")
    return p


def _cli_start(text: str, now: float) -> float:
    try:
        if text == "now":
            return now
        if text.startswith("+"):
            return now + parse_duration(text[1:])
        return parse_time(text)
    except ValueError as e:
        raise ValueError(f"--start {e}") from None


def _cli_duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise ValueError(f"--duration {e}") from None


def dso_main(argv: Sequence[str]) -> int:
    """The ``hems dso ...`` command line (``argv`` after ``dso``). Returns the exit code."""
    try:
        if argv and argv[0] == "keygen":
            a = build_keygen_parser().parse_args(argv[1:])
            priv, pub = generate_keypair(a.dir, a.name)
            print(f"private key {priv}\npublic key  {pub}")
            return 0
        if argv and argv[0] == "publish":
            a = build_publish_parser().parse_args(argv[1:])
            clock = WallClock()
            now = clock.now()
            limits = {n: getattr(a, n) for n in LIMIT_NAMES}
            key = load_private_key(a.key)
            ctl: Control | None = None
            dflt: DefaultControl | None = None
            if a.default:
                body = {"id": a.id or f"{a.site[:40]}-default", "site": a.site, "created": now,
                        **{k: v for k, v in limits.items() if v is not None}}
                dflt = parse_default(body, a.site, now)
            else:
                ctl = make_control(a.site, _cli_start(a.start, now), _cli_duration(a.duration),
                                   created=now, control_id=a.id, **limits)
            sent = asyncio.run(publish_once(a.broker, key, a.site, control=ctl, default=dflt,
                                            clock=clock, root=a.root, merge=not a.no_merge))
            for m in sent:
                print(json.dumps(m, separators=(",", ":")))
            return 0
        a = build_parser().parse_args(argv)
        if not (math.isfinite(a.heartbeat) and a.heartbeat >= 0):
            raise ValueError(f"--heartbeat must be 0 (off) or a positive number of seconds, "
                             f"got {a.heartbeat:g}")
        cfg = DsoConfig(a.schedule, a.key, a.broker, a.ack_db,
                        parse_time(a.start) if a.start else None, a.root,
                        heartbeat_s=a.heartbeat)
        asyncio.run(_serve(cfg))
        return 0
    except (ValueError, OSError) as e:  # ScheduleError, EnvelopeRejected, key/url problems
        print(f"hems dso: {e}", file=sys.stderr)
        return 2
    except aiomqtt.MqttError as e:
        print(f"hems dso: broker: {e}", file=sys.stderr)
        return 1


async def _serve(cfg: DsoConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await run_dso(cfg, stop)
