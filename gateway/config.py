"""The gateway's one TOML configuration file, validated at start.

Every problem is reported as ``config key 'a.b': problem`` so an installer can fix the file without
reading code. :func:`load_config` raises :class:`ConfigError` on the first problem;
:func:`check_config` returns all of them (``hems config check FILE``). Unknown keys are errors
too: a typo such as ``reserve_sco_pct`` must not silently fall back to a default.

See ``docs/gateway.example.toml`` for a commented example of every key.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from gateway.tariff import DEFAULT_TOU, Tariff, flat, hourly

T = TypeVar("T")

DEVICE_KINDS = ("meter", "inverter", "battery")
# "inproc": a simulated device registered in the same process (drivers.inproc), for the
# community simulation; never a real device
TRANSPORTS = ("tcp", "rtu", "rtu-over-tcp", "inproc")
_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """The configuration file is unusable. ``key`` is the dotted key at fault ('' for the file)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        where = f"config key '{key}'" if key else "config file"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class DeviceConfig:
    """One device: a field-compatible superset of ``drivers.factory.DeviceSpec``."""

    kind: str  # meter | inverter | battery
    name: str
    transport: str = "tcp"  # one of TRANSPORTS
    host: str | None = None
    port: int = 502
    unit: int = 1
    serial_port: str | None = None
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 1.0
    register_map: str | None = None  # path (or shipped map name) for non-SunSpec devices


@dataclass(frozen=True)
class TlsConfig:
    """Broker TLS: CA bundle (None = system store), optional client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip host-name verification (testing only)


@dataclass(frozen=True)
class BrokerConfig:
    """The MQTT broker. ``url`` is ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""

    url: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class ControlConfig:
    """Fast loop and battery policy."""

    cycle_s: float = 1.0
    revert_s: float = 60.0  # device revert timers we set; re-sent within half of this
    reserve_soc_pct: float = 10.0
    default_mode: str = "auto"
    read_timeout_s: float = 2.0  # real seconds, bounds one device read
    startup_grace_s: float = 15.0  # real seconds before READY=1 in a degraded state
    # Consecutive cycles without a usable meter reading before the failsafe assumes zero load
    # and curtails PV to the export limit (+ battery charge). 3: a single dropped reply or a
    # reconnect does not cut PV, and at cycle_s 1 s with 2 s read timeouts the failsafe is in
    # force ~6 s after the meter died, inside the 15 s containment of AS/NZS 4777.2.
    meter_loss_cycles: int = 3
    # Where in the period cycles run: at Unix times t with (t - phase_s) % cycle_s == 0. None:
    # from whenever the gateway started. Gateways that start together (power back after a cut,
    # a simulated community) otherwise poll their devices and publish in lockstep forever.
    phase_s: float | None = None


@dataclass(frozen=True)
class StoreConfig:
    """SQLite store: where, how coarse, how often to commit, how long to keep."""

    path: str = "/var/lib/hems/gateway.db"
    telemetry_interval_s: float = 60.0
    commit_interval_s: float = 60.0
    retention_days: float = 400.0
    event_retention_days: float = 90.0
    outbox_retention_days: float = 2.0
    outbox_max_rows: int = 600_000  # ~1 year of 1-minute records; beyond this the oldest go


@dataclass(frozen=True)
class MqttConfig:
    """What the gateway publishes and how often."""

    topic_root: str = "hems/v1"
    state_interval_s: float = 10.0
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    max_command_bytes: int = 4096


@dataclass(frozen=True)
class TariffConfig:
    """Import and feed-in prices, per kWh."""

    tariff: Tariff


@dataclass(frozen=True)
class PlannerConfig:
    """The slow loop (forecast -> optimize), see :mod:`gateway.planner`. Off by default."""

    enabled: bool = False
    step_s: int = 900  # planning interval = LP step; re-planned at every step boundary
    horizon_s: int = 86400
    budget_ms: float = 1000.0  # solve time limit; over it the self-consumption rule is used
    timezone: str = "UTC"  # IANA name: local days for the load forecast and the tariff hours
    lat: float = 0.0
    lon: float = 0.0
    pv_kwp: float = 0.0  # 0 = no PV forecast (the PV history alone is not enough)
    pv_tilt_deg: float = 30.0
    pv_azimuth_deg: float = 180.0
    pv_ac_limit_w: float | None = None
    battery_capacity_wh: float | None = None  # when the battery does not report it
    battery_efficiency: float = 0.95  # one-way, charge and discharge alike
    degradation_per_kwh: float = 0.0
    terminal_value_per_kwh: float | None = None  # None: the cheapest import price in the horizon
    # An external PV forecast (a weather service's, written by any tool): CSV
    # ``timestamp,watts`` or JSON, re-read at every plan; stale, short or broken -> own forecast.
    pv_forecast_file: str | None = None
    # Domain s: plan this site's share of it after each step boundary (and after an award), so
    # a fleet of gateways sharing a machine, a broker or a market does not plan in lockstep.
    spread_s: float = 0.0
    # "cvxpy": the LP through cvxpy (the reference model, gateway.optimize.problem); "highs":
    # the same LP held in HiGHS directly (gateway.optimize.highs_lp: ~3x less CPU per solve,
    # warm-started bid curves; for many gateways on one machine). Either falls back to the rule.
    solver: str = "cvxpy"


@dataclass(frozen=True)
class EnvelopeSection:
    """The DSO operating envelope (``[envelope]``; absent = no envelope enforcement).
    See :mod:`gateway.envelope_agent`."""

    dso_public_key: str  # base64 of the 32 raw Ed25519 bytes (from the key or the key file)
    fallback_export_w: float | None = 1500.0  # safe limit with no DSO default (connection agr.)
    fallback_import_w: float | None = None
    contact_timeout_s: float | None = 1800.0  # then limits tighten to the fallback; None = never
    ramp_pct_per_min: float = 16.0  # AS/NZS 4777.2: loosening ramp, % of DER rating per minute
    min_limit_pct: float = 2.0  # WMaxLimPct floor (never 0 %: some inverters go to standby)
    tolerance_w: float = 100.0  # measurement tolerance: the lower of this and
    tolerance_pct: float = 4.0  # this % of the inverter rating
    flood_burst: int = 30  # envelope messages accepted at once ...
    flood_per_min: float = 60.0  # ... and per minute after that (real time)
    status_interval_s: float = 60.0
    # > 0: contact also needs a valid signed DSO message (heartbeat, controls or default)
    # within this many domain seconds, not only the broker session; 0 = off (session alone).
    dso_heartbeat_timeout_s: float = 0.0


@dataclass(frozen=True)
class MarketConfig:
    """The community market agent (``[market]``; absent or ``enabled = false`` = no bidding).
    See :mod:`gateway.market_agent`."""

    enabled: bool = False
    community: str = ""
    price_floor: float = 0.08  # fallback feed-in tariff (provisional settlement) ...
    price_cap: float = 0.30  # ... and retail price, when the announce is not at hand
    prices: int = 8  # price points of each bid curve
    gate_margin_s: float = 10.0  # no bid later than this before gate closure (domain s)
    retry_s: float = 15.0  # between attempts (no plan yet; meter not settled yet)
    meter_delay_s: float = 5.0  # after delivery end before reporting the meter
    time_limit_s: float = 2.0  # per solve of the bid curve (real s)
    bid_spread_s: float = 0.0  # bid this site's share of it after the announce (domain s)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    site_id: str
    devices: tuple[DeviceConfig, ...]
    broker: BrokerConfig
    control: ControlConfig = ControlConfig()
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    tariff: TariffConfig = TariffConfig(DEFAULT_TOU)
    planner: PlannerConfig = PlannerConfig()
    envelope: EnvelopeSection | None = None
    source: str = ""
    market: MarketConfig = MarketConfig()

    def device(self, kind: str) -> DeviceConfig | None:
        """The configured device of ``kind``, if any."""
        return next((d for d in self.devices if d.kind == kind), None)


# --------------------------------------------------------------------------------------------
# Reading with error collection


class _Reader:
    """Typed access to a TOML table that records every problem instead of stopping at the first."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors

    def fail(self, key: str, problem: str) -> None:
        self.errors.append(ConfigError(key, problem))

    def table(self, data: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, Any]:
        v = data.get(key, {})
        if not isinstance(v, dict):
            self.fail(_k(prefix, key), f"must be a table, got {_tname(v)}")
            return {}
        return v

    def unknown(self, data: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
        for k in data:
            if k not in allowed:
                hint = _closest(k, allowed)
                self.fail(_k(prefix, k), "unknown key" + (f" (did you mean '{hint}'?)" if hint
                                                           else ""))

    def get(self, data: Mapping[str, Any], key: str, prefix: str, typ: type[T] | tuple[type, ...],
            default: T, check: Callable[[T], str | None] | None = None, required: bool = False
            ) -> T:
        full = _k(prefix, key)
        if key not in data:
            if required:
                self.fail(full, "is required")
            return default
        v = data[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float))
        if not ok:
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            self.fail(full, f"must be {_article(want)}, got {_tname(v)} {v!r}")
            return default
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(full, f"must be a finite number, got {v!r}")
            return default
        if check is not None:
            problem = check(v)
            if problem:
                self.fail(full, problem)
                return default
        return v


def _k(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _tname(v: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _article(word: str) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
             "list": "an array"}
    return names.get(word, word)


def _closest(word: str, options: set[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.75)
    return m[0] if m else None


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def _range(lo: float, hi: float) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v:g}"

    return check


# --------------------------------------------------------------------------------------------


def _parse(data: Mapping[str, Any], source: str, errors: list[ConfigError]) -> Config | None:
    r = _Reader(errors)
    r.unknown(data, {"site_id", "devices", "broker", "control", "store", "mqtt", "tariff",
                     "planner", "envelope", "market"}, "")
    site_id = r.get(data, "site_id", "", str, "", required=True,
                    check=lambda s: None if _SITE_RE.match(s) else
                    "must be 1-48 characters of a-z, 0-9, '-' or '_', starting with a letter or "
                    f"digit (it becomes an MQTT topic level), got {s!r}")

    devices = _parse_devices(data, r)
    broker = _parse_broker(data, r, Path(source).parent if source else Path("."))
    control = _parse_control(r.table(data, "control", ""), r)
    store = _parse_store(r.table(data, "store", ""), r, Path(source).parent if source else None)
    mqtt = _parse_mqtt(r.table(data, "mqtt", ""), r)
    tariff = _parse_tariff(r.table(data, "tariff", ""), r)
    planner = _parse_planner(r.table(data, "planner", ""), r)
    envelope = _parse_envelope(data, r, Path(source).parent if source else Path("."))
    market = _parse_market(r.table(data, "market", ""), r)
    if errors or broker is None:
        return None
    return Config(site_id=site_id, devices=devices, broker=broker, control=control, store=store,
                  mqtt=mqtt, tariff=tariff, planner=planner, envelope=envelope, source=source,
                  market=market)


def _parse_devices(data: Mapping[str, Any], r: _Reader) -> tuple[DeviceConfig, ...]:
    raw = data.get("devices")
    if raw is None:
        r.fail("devices", "is required: at least one [[devices]] entry with kind = \"meter\"")
        return ()
    if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
        r.fail("devices", "must be an array of tables ([[devices]])")
        return ()
    out: list[DeviceConfig] = []
    allowed = {"kind", "name", "transport", "host", "port", "unit", "serial_port", "baudrate",
               "parity", "stopbits", "timeout_s", "register_map"}
    for i, d in enumerate(raw):
        p = f"devices[{i}]"
        r.unknown(d, allowed, p)
        kind = r.get(d, "kind", p, str, "", required=True,
                     check=lambda s: None if s in DEVICE_KINDS else
                     f"must be one of {', '.join(DEVICE_KINDS)}, got {s!r}")
        name = r.get(d, "name", p, str, kind or f"device{i}",
                     check=lambda s: None if _NAME_RE.match(s) else
                     f"must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-', got {s!r}")
        transport = r.get(d, "transport", p, str, "tcp",
                          check=lambda s: None if s in TRANSPORTS else
                          f"must be one of {', '.join(TRANSPORTS)}, got {s!r}")
        host = r.get(d, "host", p, str, "") or None
        port = r.get(d, "port", p, int, 502, check=_port_check)
        unit = r.get(d, "unit", p, int, 1,
                     check=lambda u: None if 0 <= u <= 247 else
                     f"must be a Modbus unit id 0..247, got {u}")
        serial_port = r.get(d, "serial_port", p, str, "") or None
        baudrate = r.get(d, "baudrate", p, int, 9600, check=_positive)
        parity = r.get(d, "parity", p, str, "N", check=lambda s: None if s in ("N", "E", "O")
                       else f"must be 'N', 'E' or 'O', got {s!r}")
        stopbits = r.get(d, "stopbits", p, int, 1, check=lambda s: None if s in (1, 2) else
                         f"must be 1 or 2, got {s}")
        timeout_s = r.get(d, "timeout_s", p, float, 1.0, check=_range(0.05, 30.0))
        register_map = r.get(d, "register_map", p, str, "") or None
        if transport != "rtu" and "host" not in d:
            r.fail(f"{p}.host", f"is required when transport = '{transport}'")
        if transport == "rtu" and "serial_port" not in d:
            r.fail(f"{p}.serial_port", "is required when transport = 'rtu'")
        out.append(DeviceConfig(kind=kind, name=name, transport=transport, host=host, port=port,
                                unit=unit, serial_port=serial_port, baudrate=baudrate,
                                parity=parity, stopbits=stopbits, timeout_s=timeout_s,
                                register_map=register_map))
    kinds = [d.kind for d in out]
    for k in DEVICE_KINDS:
        if kinds.count(k) > 1:
            idx = [i for i, d in enumerate(out) if d.kind == k][1]
            r.fail(f"devices[{idx}].kind", f"a second {k!r}: one of each kind is supported")
    if out and "meter" not in kinds:
        r.fail("devices", "needs a device with kind = \"meter\" (the loop closes on the meter)")
    names = [d.name for d in out]
    for i, n in enumerate(names):
        if names.index(n) != i and kinds.count(out[i].kind) == 1:
            r.fail(f"devices[{i}].name", f"duplicate device name {n!r}")
    return tuple(out)


def _port_check(p: int) -> str | None:
    return None if 1 <= p <= 65535 else f"must be a TCP port 1..65535, got {p}"


def _parse_broker(data: Mapping[str, Any], r: _Reader, base: Path) -> BrokerConfig | None:
    if "broker" not in data:
        r.fail("broker", "is required: a [broker] table with url = \"mqtt://host:1883\"")
        return None
    b = r.table(data, "broker", "")
    p = "broker"
    r.unknown(b, {"url", "username", "password", "password_file", "tls", "client_id",
                  "keepalive_s", "connect_timeout_s"}, p)
    url = r.get(b, "url", p, str, "", required=True)
    host, port, scheme = "", 0, ""
    if url:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("mqtt", "mqtts"):
            r.fail(f"{p}.url", f"must start with mqtt:// or mqtts://, got {url!r}")
        elif not parts.hostname:
            r.fail(f"{p}.url", f"has no host name: {url!r}")
        else:
            host = parts.hostname
            try:
                port = parts.port or (8883 if scheme == "mqtts" else 1883)
            except ValueError:
                r.fail(f"{p}.url", f"has an invalid port: {url!r}")
            if parts.path not in ("", "/"):
                r.fail(f"{p}.url", f"must not have a path, got {parts.path!r}")
    username = r.get(b, "username", p, str, "") or None
    password = r.get(b, "password", p, str, "") or None
    pw_file = r.get(b, "password_file", p, str, "") or None
    if url and urlsplit(url).username:
        username = username or unquote(urlsplit(url).username or "")
        password = password or unquote(urlsplit(url).password or "") or None
    if pw_file:
        # "${CREDENTIALS_DIRECTORY}/mqtt-password" with systemd's LoadCredential=.
        pw_file = os.path.expandvars(pw_file)
        if password:
            r.fail(f"{p}.password_file", "give either password or password_file, not both")
        path = (base / pw_file) if not Path(pw_file).is_absolute() else Path(pw_file)
        try:
            password = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            r.fail(f"{p}.password_file", f"cannot read {str(path)!r}: {e.strerror}")
    if password and not username:
        r.fail(f"{p}.username", "is required when a password is given")
    tls: TlsConfig | None = None
    if "tls" in b or scheme == "mqtts":
        t = r.table(b, "tls", p)
        tp = f"{p}.tls"
        r.unknown(t, {"ca_file", "cert_file", "key_file", "insecure"}, tp)
        files: dict[str, str | None] = {}
        for key in ("ca_file", "cert_file", "key_file"):
            v = r.get(t, key, tp, str, "") or None
            if v is not None:
                fp = (base / v) if not Path(v).is_absolute() else Path(v)
                if not fp.is_file():
                    r.fail(f"{tp}.{key}", f"file not found: {str(fp)!r}")
                v = str(fp)
            files[key] = v
        if bool(files["cert_file"]) != bool(files["key_file"]):
            r.fail(f"{tp}.key_file" if files["cert_file"] else f"{tp}.cert_file",
                   "cert_file and key_file go together")
        if scheme == "mqtt" and t:
            r.fail(f"{p}.url", "TLS settings given but the url is mqtt:// (use mqtts://)")
        tls = TlsConfig(ca_file=files["ca_file"], cert_file=files["cert_file"],
                        key_file=files["key_file"],
                        insecure=r.get(t, "insecure", tp, bool, False))
    client_id = r.get(b, "client_id", p, str, "") or None
    keepalive = r.get(b, "keepalive_s", p, int, 30,
                      check=lambda k: None if 5 <= k <= 3600 else f"must be 5..3600, got {k}")
    cto = r.get(b, "connect_timeout_s", p, float, 10.0, check=_range(0.5, 120.0))
    if not host:
        return None
    return BrokerConfig(url=url, host=host, port=port, username=username, password=password,
                        tls=tls, client_id=client_id, keepalive_s=keepalive,
                        connect_timeout_s=cto)


def _parse_control(c: Mapping[str, Any], r: _Reader) -> ControlConfig:
    from gateway.commands import MODES

    p = "control"
    r.unknown(c, {"cycle_s", "revert_s", "reserve_soc_pct", "default_mode", "read_timeout_s",
                  "startup_grace_s", "meter_loss_cycles", "phase_s"}, p)
    cycle = r.get(c, "cycle_s", p, float, 1.0, check=_range(0.1, 60.0))
    revert = r.get(c, "revert_s", p, float, 60.0, check=_range(2.0, 3600.0))
    if revert < 4 * cycle:
        r.fail(f"{p}.revert_s", f"must be at least 4 x cycle_s ({4 * cycle:g} s) so setpoints "
                                f"are re-sent within half the revert time, got {revert:g}")
    return ControlConfig(
        cycle_s=cycle,
        revert_s=revert,
        reserve_soc_pct=r.get(c, "reserve_soc_pct", p, float, 10.0, check=_range(0, 100)),
        default_mode=r.get(c, "default_mode", p, str, "auto",
                           check=lambda m: None if m in ("auto", "self_consumption", "idle") else
                           f"must be one of auto, self_consumption, idle, got {m!r}"
                           + (" (force modes need a power and an end time: send them as a "
                              "command)" if m in MODES else "")),
        read_timeout_s=r.get(c, "read_timeout_s", p, float, 2.0, check=_range(0.1, 30.0)),
        startup_grace_s=r.get(c, "startup_grace_s", p, float, 15.0, check=_range(0.0, 600.0)),
        meter_loss_cycles=r.get(c, "meter_loss_cycles", p, int, 3, check=_range(1, 30)),
        phase_s=(r.get(c, "phase_s", p, float, 0.0,
                       check=lambda v: None if 0 <= v < cycle else
                       f"must be in [0, cycle_s = {cycle:g}), got {v:g}")
                 if "phase_s" in c else None),
    )


def _parse_store(s: Mapping[str, Any], r: _Reader, base: Path | None) -> StoreConfig:
    p = "store"
    r.unknown(s, {"path", "telemetry_interval_s", "commit_interval_s", "retention_days",
                  "event_retention_days", "outbox_retention_days", "outbox_max_rows"}, p)
    path = r.get(s, "path", p, str, StoreConfig.path,
                 check=lambda v: None if v.strip() else "must not be empty")
    if base is not None and path != ":memory:" and not Path(path).is_absolute():
        path = str(base / path)
    return StoreConfig(
        path=path,
        telemetry_interval_s=r.get(s, "telemetry_interval_s", p, float, 60.0,
                                   check=_range(1.0, 3600.0)),
        commit_interval_s=r.get(s, "commit_interval_s", p, float, 60.0,
                                check=_range(0.1, 3600.0)),
        retention_days=r.get(s, "retention_days", p, float, 400.0, check=_positive),
        event_retention_days=r.get(s, "event_retention_days", p, float, 90.0, check=_positive),
        outbox_retention_days=r.get(s, "outbox_retention_days", p, float, 2.0, check=_positive),
        outbox_max_rows=r.get(s, "outbox_max_rows", p, int, 600_000,
                              check=lambda n: None if n >= 100 else f"must be >= 100, got {n}"),
    )


def _parse_mqtt(m: Mapping[str, Any], r: _Reader) -> MqttConfig:
    p = "mqtt"
    r.unknown(m, {"topic_root", "state_interval_s", "discovery", "discovery_prefix",
                  "max_command_bytes"}, p)
    def topic_ok(t: str) -> (str | None):
        return (None if t and not any(ch in t for ch in "#+\0") and not t.startswith("/")
            and not t.endswith("/") else f"must be a topic without wildcards or leading/trailing "
            f"'/', got {t!r}")
    return MqttConfig(
        topic_root=r.get(m, "topic_root", p, str, "hems/v1", check=topic_ok),
        state_interval_s=r.get(m, "state_interval_s", p, float, 10.0, check=_range(0.1, 3600)),
        discovery=r.get(m, "discovery", p, bool, True),
        discovery_prefix=r.get(m, "discovery_prefix", p, str, "homeassistant", check=topic_ok),
        max_command_bytes=r.get(m, "max_command_bytes", p, int, 4096,
                                check=lambda n: None if 64 <= n <= 262144 else
                                f"must be 64..262144, got {n}"),
    )


def _parse_tariff(t: Mapping[str, Any], r: _Reader) -> TariffConfig:
    p = "tariff"
    r.unknown(t, {"preset", "import_per_kwh", "feed_in_per_kwh", "import_periods"}, p)
    if not t:
        return TariffConfig(DEFAULT_TOU)
    preset = r.get(t, "preset", p, str, "",
                   check=lambda s: None if s in ("tou-default", "flat") else
                   f"must be 'tou-default' or 'flat', got {s!r}")
    if preset == "tou-default" and len(t) == 1:
        return TariffConfig(DEFAULT_TOU)
    price = _range(-10.0, 10.0)
    imp = r.get(t, "import_per_kwh", p, float, 0.0, check=price, required=True)
    feed = r.get(t, "feed_in_per_kwh", p, float, 0.0, check=price, required=True)
    periods_raw = r.get(t, "import_periods", p, list, [])
    periods: list[tuple[int, int, float]] = []
    for i, per in enumerate(periods_raw):
        ok = (isinstance(per, list) and len(per) == 3 and all(isinstance(x, int) and
              not isinstance(x, bool) for x in per[:2]) and isinstance(per[2], int | float)
              and 0 <= per[0] < 24 and 0 <= per[1] <= 24)
        if not ok:
            r.fail(f"{p}.import_periods[{i}]",
                   f"must be [start_hour, end_hour, price] with hours 0..24, got {per!r}")
        else:
            periods.append((per[0], per[1], float(per[2])))
    if not periods:
        return TariffConfig(flat("config", imp, feed))
    table = hourly(periods, imp)
    return TariffConfig(Tariff("config", table, table, hourly([], feed)))


def _parse_planner(t: Mapping[str, Any], r: _Reader) -> PlannerConfig:
    p = "planner"
    r.unknown(t, {"enabled", "step_s", "horizon_s", "budget_ms", "timezone", "lat", "lon",
                  "pv_kwp", "pv_tilt_deg", "pv_azimuth_deg", "pv_ac_limit_w",
                  "battery_capacity_wh", "battery_efficiency", "degradation_per_kwh",
                  "terminal_value_per_kwh", "pv_forecast_file", "spread_s", "solver"}, p)
    step = r.get(t, "step_s", p, int, 900, check=lambda s: None if s >= 300 and 86400 % s == 0
                 else f"must be >= 300 and divide a day (86400 s), got {s}")
    horizon = r.get(t, "horizon_s", p, int, 86400,
                    check=lambda h: None if 3600 <= h <= 2 * 86400 else
                    f"must be between 3600 and 172800 s, got {h}")
    if horizon % step:
        r.fail(f"{p}.horizon_s", f"must be a multiple of step_s ({step}), got {horizon}")

    def tz_ok(name: str) -> str | None:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(name)
        except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            return f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')"
        return None

    ac = r.get(t, "pv_ac_limit_w", p, float, 0.0, check=_range(0.0, 1e6))
    cap = r.get(t, "battery_capacity_wh", p, float, 0.0, check=_range(0.0, 1e7))
    tv = r.get(t, "terminal_value_per_kwh", p, float, math.nan, check=_range(-10.0, 10.0)) \
        if "terminal_value_per_kwh" in t else None
    if t.get("pv_kwp") and not ("lat" in t and "lon" in t):
        r.fail(f"{p}.lat" if "lat" not in t else f"{p}.lon",
               "is required with pv_kwp > 0 (the PV forecast needs the site's position)")
    return PlannerConfig(
        enabled=r.get(t, "enabled", p, bool, False),
        step_s=step,
        horizon_s=horizon,
        budget_ms=r.get(t, "budget_ms", p, float, 1000.0, check=_range(0.0, 600_000.0)),
        timezone=r.get(t, "timezone", p, str, "UTC", check=tz_ok),
        lat=r.get(t, "lat", p, float, 0.0, check=_range(-90.0, 90.0)),
        lon=r.get(t, "lon", p, float, 0.0, check=_range(-180.0, 180.0)),
        pv_kwp=r.get(t, "pv_kwp", p, float, 0.0, check=_range(0.0, 1000.0)),
        pv_tilt_deg=r.get(t, "pv_tilt_deg", p, float, 30.0, check=_range(0.0, 90.0)),
        pv_azimuth_deg=r.get(t, "pv_azimuth_deg", p, float, 180.0, check=_range(0.0, 360.0)),
        pv_ac_limit_w=ac or None,
        battery_capacity_wh=cap or None,
        battery_efficiency=r.get(t, "battery_efficiency", p, float, 0.95,
                                 check=lambda e: None if 0.5 <= e <= 1.0 else
                                 f"must be between 0.5 and 1, got {e:g}"),
        degradation_per_kwh=r.get(t, "degradation_per_kwh", p, float, 0.0,
                                  check=_range(0.0, 10.0)),
        terminal_value_per_kwh=tv,
        pv_forecast_file=r.get(t, "pv_forecast_file", p, str, "") or None,
        spread_s=r.get(t, "spread_s", p, float, 0.0,
                       check=lambda v: None if 0.0 <= v <= step / 2 else
                       f"must be between 0 and half of step_s ({step / 2:g}), got {v:g}"),
        solver=r.get(t, "solver", p, str, "cvxpy",
                     check=lambda v: None if v in ("cvxpy", "highs") else
                     f"must be 'cvxpy' or 'highs', got {v!r}"),
    )


def _parse_envelope(data: Mapping[str, Any], r: _Reader, base: Path) -> EnvelopeSection | None:
    if "envelope" not in data:
        return None
    from gateway import signing  # cryptography: only when an envelope is configured

    t = r.table(data, "envelope", "")
    p = "envelope"
    r.unknown(t, {"dso_public_key", "dso_public_key_file", "fallback_export_w",
                  "fallback_import_w", "contact_timeout_s", "ramp_pct_per_min", "min_limit_pct",
                  "tolerance_w", "tolerance_pct", "flood_burst", "flood_per_min",
                  "status_interval_s", "dso_heartbeat_timeout_s"}, p)
    key_b64 = r.get(t, "dso_public_key", p, str, "") or None
    key_file = r.get(t, "dso_public_key_file", p, str, "") or None
    if (key_b64 is None) == (key_file is None):
        r.fail(f"{p}.dso_public_key", "give exactly one of dso_public_key (base64 of the 32 raw "
                                      "Ed25519 bytes) or dso_public_key_file (PEM)")
        return None
    key = ""
    try:
        if key_b64 is not None:
            key = signing.public_key_to_b64(signing.public_key_from_b64(key_b64))
        else:
            assert key_file is not None
            kp = Path(os.path.expandvars(key_file))
            kp = kp if kp.is_absolute() else base / kp
            key = signing.public_key_to_b64(signing.load_public_key(kp))
    except (ValueError, OSError) as e:
        r.fail(f"{p}.dso_public_key" if key_b64 else f"{p}.dso_public_key_file", str(e))
        return None
    watts = _range(0.0, 1e6)

    def opt_w(name: str, default: float | None) -> float | None:
        # A negative value means "no such limit" is not offered: omit the key instead.
        if name not in t:
            return default
        return r.get(t, name, p, float, 0.0, check=watts)

    timeout = r.get(t, "contact_timeout_s", p, float, 1800.0, check=_range(0.0, 30 * 86400.0))
    heartbeat = r.get(t, "dso_heartbeat_timeout_s", p, float, 0.0,
                      check=lambda v: None if v == 0.0 or 10.0 <= v <= 86400.0 else
                      f"must be 0 (off) or between 10 and 86400 s, got {v:g}")
    if heartbeat > 0 and not timeout:
        # Without a contact timeout, lost contact never applies the fallback: the heartbeat
        # would be checked and then change nothing. Say so rather than pretend.
        r.fail(f"{p}.dso_heartbeat_timeout_s", "needs contact_timeout_s > 0 (with "
                                               "contact_timeout_s = 0 a silent DSO never "
                                               "moves the site to the fallback)")
    return EnvelopeSection(
        dso_public_key=key,
        fallback_export_w=opt_w("fallback_export_w", 1500.0),
        fallback_import_w=opt_w("fallback_import_w", None),
        contact_timeout_s=timeout or None,
        ramp_pct_per_min=r.get(t, "ramp_pct_per_min", p, float, 16.0, check=_range(0.1, 100.0)),
        min_limit_pct=r.get(t, "min_limit_pct", p, float, 2.0, check=_range(0.1, 50.0)),
        tolerance_w=r.get(t, "tolerance_w", p, float, 100.0, check=_range(0.0, 10_000.0)),
        tolerance_pct=r.get(t, "tolerance_pct", p, float, 4.0, check=_range(0.0, 100.0)),
        flood_burst=r.get(t, "flood_burst", p, int, 30,
                          check=lambda n: None if 2 <= n <= 10_000 else
                          f"must be 2..10000, got {n}"),
        flood_per_min=r.get(t, "flood_per_min", p, float, 60.0, check=_range(1.0, 60_000.0)),
        status_interval_s=r.get(t, "status_interval_s", p, float, 60.0,
                                check=_range(1.0, 3600.0)),
        dso_heartbeat_timeout_s=heartbeat,
    )


def _parse_market(t: Mapping[str, Any], r: _Reader) -> MarketConfig:
    p = "market"
    r.unknown(t, {"enabled", "community", "price_floor", "price_cap", "prices", "gate_margin_s",
                  "retry_s", "meter_delay_s", "time_limit_s", "bid_spread_s"}, p)
    if not t:
        return MarketConfig()
    enabled = r.get(t, "enabled", p, bool, True)
    community = r.get(t, "community", p, str, "", required=enabled,
                      check=lambda c: None if re.match(r"^[A-Za-z0-9_.-]{1,64}$", c) else
                      f"must be 1-64 characters of A-Z, a-z, 0-9, '_', '.' or '-' (an MQTT "
                      f"topic level), got {c!r}")
    price = _range(-10.0, 10.0)
    floor = r.get(t, "price_floor", p, float, 0.08, check=price)
    cap = r.get(t, "price_cap", p, float, 0.30, check=price)
    if floor > cap:
        r.fail(f"{p}.price_cap", f"must be >= price_floor ({floor:g}), got {cap:g}")
    return MarketConfig(
        enabled=enabled, community=community, price_floor=floor, price_cap=cap,
        prices=r.get(t, "prices", p, int, 8, check=lambda n: None if 2 <= n <= 32 else
                     f"must be 2..32, got {n}"),
        gate_margin_s=r.get(t, "gate_margin_s", p, float, 10.0, check=_range(0.0, 3600.0)),
        retry_s=r.get(t, "retry_s", p, float, 15.0, check=_range(0.1, 3600.0)),
        meter_delay_s=r.get(t, "meter_delay_s", p, float, 5.0, check=_range(0.0, 3600.0)),
        time_limit_s=r.get(t, "time_limit_s", p, float, 2.0, check=_range(0.01, 60.0)),
        bid_spread_s=r.get(t, "bid_spread_s", p, float, 0.0, check=_range(0.0, 3600.0)),
    )


def _read(path: str | Path) -> tuple[Mapping[str, Any] | None, ConfigError | None]:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        return None, ConfigError("", f"cannot read {str(path)!r}: {e.strerror}")
    try:
        return tomllib.loads(text.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, ConfigError("", f"{str(path)!r} is not UTF-8 text: {e}")
    except tomllib.TOMLDecodeError as e:
        return None, ConfigError("", f"{str(path)!r} is not valid TOML: {e}")


def parse_config(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate an already-parsed TOML mapping; raise :class:`ConfigError` on the first problem."""
    errors: list[ConfigError] = []
    cfg = _parse(data, source, errors)
    if errors:
        raise errors[0]
    assert cfg is not None
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` naming the first bad key."""
    data, err = _read(path)
    if err is not None:
        raise err
    assert data is not None
    return parse_config(data, str(path))


def check_config(path: str | Path) -> list[str]:
    """Every problem in ``path``, one message each (empty list: the file is valid)."""
    data, err = _read(path)
    if err is not None:
        return [str(err)]
    assert data is not None
    errors: list[ConfigError] = []
    _parse(data, str(path), errors)
    return [str(e) for e in errors]
