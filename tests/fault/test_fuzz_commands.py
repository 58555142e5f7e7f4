"""Hostile operator commands, fuzzed (hypothesis) through the daemon's real command path.

``Gateway.on_command`` is what the MQTT session calls for every message on ``<site>/cmd/<name>``
(``gateway/mqtt.py`` hands it the raw payload bytes); it runs
:func:`gateway.commands.handle_command`, counts the outcome and builds the ``cmd_result``. For
arbitrary bytes, arbitrary JSON (NaN/inf literals, integers beyond float range, deep nesting)
and structured-but-wrong commands, every message must:

* return a result (no exception escapes), valid against the ``cmd_result`` schema, with a reason
  when rejected;
* move exactly one counter: ``commands_applied`` or ``commands_rejected[<category>]``, keyed
  by a fixed set of categories (bounded however many messages arrive);
* leave the mode state untouched when rejected; when applied, a state inside the limits (mode
  known, force power within the battery's rating, an end within a week, reserve 0-100 %).

Valid commands are still applied after a storm of bad ones.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.natures import BatteryReading
from gateway import messages
from gateway.commands import FORCE_MODES, MAX_FORCE_S, MODES, ModeState, SiteState
from gateway.config import Config, parse_config
from gateway.daemon import Gateway

pytestmark = pytest.mark.fault

NOW = 1_750_000_000.0
SITE = "home-1"
CATEGORIES = {"oversize", "malformed", "unknown", "invalid", "limit"}
BAT = BatteryReading(ts=NOW, w=0.0, soc_pct=50.0, capacity_wh=10000.0, max_charge_w=5000.0,
                     max_discharge_w=4000.0, reserve_pct=10.0, ctl_mode=0, in_rate_pct=None,
                     out_rate_pct=None, revert_s=None)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FixedClock:
    """Domain time that stands still (the command path only reads it)."""

    speed = 1.0

    def now(self) -> float:
        return NOW

    async def sleep_until(self, t: float) -> None:  # pragma: no cover - never awaited
        raise AssertionError("the command path must not sleep")

    async def sleep(self, dt: float) -> None:  # pragma: no cover
        raise AssertionError("the command path must not sleep")


@functools.cache
def config(max_command_bytes: int) -> Config:
    return parse_config({
        "site_id": SITE,
        "devices": [{"kind": "meter", "name": "m", "host": "127.0.0.1", "port": 1502}],
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "mqtt": {"max_command_bytes": max_command_bytes},
    })


def gateway(max_command_bytes: int = 4096, battery: BatteryReading | None = BAT) -> Gateway:
    gw = Gateway(config(max_command_bytes), FixedClock(), devices={})
    gw.live = SiteState(NOW, None, None, battery)
    return gw


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive ``on_command`` to completion: it never awaits anything (no I/O on this path)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise AssertionError("on_command suspended: it must not wait on anything")


def send(gw: Gateway, name: str, payload: bytes, retained: bool = False) -> dict[str, Any]:
    """One command through the daemon's path; checks the result and the counters."""
    before_mode = gw.mode
    applied0 = gw.stats.commands_applied
    rejected0 = dict(gw.stats.commands_rejected)
    topic, raw = run(gw.on_command(name, payload, retained))
    gw.pending.events.clear()  # drained by the store loop in the daemon
    gw.pending.kv.clear()
    result = json.loads(raw)
    assert messages.validate("cmd_result", result) == [], result
    assert topic.startswith(f"hems/v1/{SITE}/cmd_result/")
    assert "+" not in topic and "#" not in topic
    moved_rejected = {k: v - rejected0.get(k, 0) for k, v in gw.stats.commands_rejected.items()
                      if v != rejected0.get(k, 0)}
    assert set(gw.stats.commands_rejected) <= CATEGORIES  # bounded, whatever arrives
    if result["status"] == "applied":
        assert gw.stats.commands_applied == applied0 + 1 and not moved_rejected
        check_state(gw.mode, before_mode)
    else:
        assert gw.stats.commands_applied == applied0
        assert sum(moved_rejected.values()) == 1, moved_rejected
        assert isinstance(result["reason"], str) and result["reason"]
        assert gw.mode == before_mode  # never applied, not even in part
    return result


def check_state(s: ModeState, before: ModeState) -> None:
    """An applied state is inside every limit in force."""
    assert s.mode in MODES
    assert math.isfinite(s.reserve_soc_pct) and 0.0 <= s.reserve_soc_pct <= 100.0
    if s.mode in FORCE_MODES:
        assert s.power_w is not None and s.until is not None
        limit = BAT.max_charge_w if s.mode == "force_charge" else BAT.max_discharge_w
        assert math.isfinite(s.power_w) and 0.0 < s.power_w <= limit
        assert math.isfinite(s.until) and NOW < s.until <= NOW + MAX_FORCE_S
    else:
        assert s.power_w is None and s.until is None
    # One command changes one thing: a reserve command keeps the mode and vice versa.
    assert s.mode == before.mode or s.reserve_soc_pct == before.reserve_soc_pct


# ---------------------------------------------------------------- strategies

NAMES = st.one_of(st.sampled_from(["mode", "reserve"]),
                  st.text(st.characters(exclude_characters="\x00+#", codec="utf-8"),
                          max_size=80))

# Raw JSON texts of hostile numbers: literals the Python parser accepts but JSON does not,
# values beyond float range, strings that look like numbers, wrong types.
HOSTILE_NUMBER = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0",
                     "1" + "0" * 400, "-" + "9" * 400, '"NaN"', '"inf"', '"-Infinity"',
                     '"3000"', "true", "false", "null", "[]", "{}", "[3000]", '{"w":1}']),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30).map(str),
)
VALID_NUMBER = st.one_of(st.integers(1, 5000).map(str),
                         st.floats(0.5, 5000.0, allow_nan=False).map(repr))
KEYS = ["id", "mode", "power_w", "until", "duration_s", "soc_pct", "extra", "Mode", ""]


@st.composite
def structured(draw: Any) -> tuple[str, bytes]:
    """A command object with known (and unknown) keys, each value valid or hostile."""
    name = draw(st.sampled_from(["mode", "reserve"]))
    fields: dict[str, str] = {}
    if draw(st.booleans()):  # a force mode, well-formed but for its numbers
        fields["mode"] = json.dumps(draw(st.sampled_from(FORCE_MODES)))
        fields["power_w"] = draw(st.one_of(VALID_NUMBER, HOSTILE_NUMBER))
        end = draw(st.sampled_from(["until", "duration_s"]))
        fields[end] = draw(st.one_of(HOSTILE_NUMBER, st.floats(
            NOW - 10 if end == "until" else -10, NOW + 2 * MAX_FORCE_S).map(repr)))
        return "mode", ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items())
                        + "}").encode()
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
        if key == "mode":
            fields[key] = json.dumps(draw(st.sampled_from([*MODES, "FORCE_CHARGE", "", "off"])))
        elif key == "id":
            fields[key] = draw(st.one_of(st.text(max_size=80).map(json.dumps), HOSTILE_NUMBER))
        elif key == "until":
            fields[key] = draw(st.one_of(
                HOSTILE_NUMBER, st.floats(NOW - 10, NOW + 2 * MAX_FORCE_S).map(repr)))
        else:
            fields[key] = draw(st.one_of(VALID_NUMBER, HOSTILE_NUMBER))
    body = ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items())
    return name, ("{" + body + "}").encode()


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 400), 10 ** 400),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON_DOC = st.recursive(
    JSON_LEAF,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), c, max_size=5),
    max_leaves=25)


@st.composite
def valid_command(draw: Any) -> tuple[str, dict[str, Any]]:
    if draw(st.booleans()):
        return "reserve", {"soc_pct": draw(st.floats(0.0, 100.0))}
    mode = draw(st.sampled_from(MODES))
    cmd: dict[str, Any] = {"id": "v1", "mode": mode}
    if mode in FORCE_MODES:
        limit = BAT.max_charge_w if mode == "force_charge" else BAT.max_discharge_w
        cmd["power_w"] = draw(st.floats(1.0, limit))
        cmd["duration_s"] = draw(st.floats(1.0, MAX_FORCE_S))
    return "mode", cmd


HOSTILE = st.one_of(
    st.tuples(NAMES, st.binary(min_size=1, max_size=600)),
    st.tuples(NAMES, JSON_DOC.map(lambda d: json.dumps(d).encode())),
    structured(),
)


# ---------------------------------------------------------------- properties


@FUZZ
@given(name=NAMES, payload=st.binary(min_size=1, max_size=6000))
def test_arbitrary_bytes_get_a_reasoned_result_and_change_nothing(name: str,
                                                                  payload: bytes) -> None:
    gw = gateway()
    result = send(gw, name, payload)
    if len(payload) > 4096:
        assert result["status"] == "rejected" and gw.stats.commands_rejected == {"oversize": 1}


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(["mode", "reserve"]), doc=JSON_DOC)
def test_arbitrary_json_never_escapes_and_applies_only_within_limits(name: str, doc: Any) -> None:
    send(gateway(), name, json.dumps(doc).encode())  # NaN/Infinity literals included


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=structured())
def test_structured_but_wrong_commands_are_rejected_by_category(cmd: tuple[str, bytes]) -> None:
    name, payload = cmd
    result = send(gateway(), name, payload)
    poison = ("poison",)  # a NaN/inf literal, or a number no float holds
    values = json.loads(payload, parse_constant=lambda _: poison,
                        parse_int=lambda t: poison if len(t) > 300 else int(t),
                        parse_float=lambda t: f if math.isfinite(f := float(t)) else poison)
    if any(v is poison for v in values.values()):
        # A NaN/inf literal or a number beyond float range is never applied, whatever field.
        assert result["status"] == "rejected", (payload, result)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(storm=st.lists(HOSTILE, min_size=20, max_size=80), valid=st.lists(valid_command(),
                                                                         min_size=1, max_size=4))
def test_valid_commands_are_still_applied_after_a_storm(storm: list[tuple[str, bytes]],
                                                        valid: list[tuple[str, Any]]) -> None:
    gw = gateway()
    for name, payload in storm:
        send(gw, name, payload)
    assert sum(gw.stats.commands_rejected.values()) + gw.stats.commands_applied == len(storm)
    for name, cmd in valid:
        want_before = gw.mode
        result = send(gw, name, json.dumps(cmd).encode())
        assert result["status"] == "applied", result
        if name == "reserve":
            assert gw.mode.reserve_soc_pct == cmd["soc_pct"]
            assert gw.mode.mode == want_before.mode
        else:
            assert gw.mode.mode == cmd["mode"] and gw.mode.power_w == cmd.get("power_w")


# ---------------------------------------------------------------- edge cases found by fuzzing


@pytest.mark.parametrize(("payload", "max_bytes", "category"), [
    # A JSON integer beyond float range for 'until' passed the schema (a number > 0) and then
    # float() raised OverflowError out of handle_command: no result, no counter.
    (b'{"mode":"force_charge","power_w":100,"until":1' + b"0" * 400 + b"}", 4096, "invalid"),
    # 'until' had no upper bound while 'duration_s' is capped at a week.
    (b'{"mode":"force_charge","power_w":100,"until":1e300}', 4096, "invalid"),
    (json.dumps({"mode": "force_charge", "power_w": 100,
                 "until": NOW + MAX_FORCE_S + 1}).encode(), 4096, "invalid"),
    # With max_command_bytes raised, an integer literal over Python's 4300-digit limit made
    # json.loads raise a plain ValueError (not a JSONDecodeError), which escaped.
    (b'{"mode":"idle","id":' + b"7" * 5000 + b"}", 262144, "malformed"),
    # Deeper than the parser's recursion limit.
    (b'{"mode":' + b"[" * 5000 + b"]" * 5000 + b"}", 262144, "malformed"),
    (b'{"mode":"force_discharge","power_w":NaN,"duration_s":60}', 4096, "invalid"),
    (b'{"soc_pct":Infinity}', 4096, "invalid"),
])
def test_hostile_edge_cases_are_rejected_by_category(payload: bytes, max_bytes: int,
                                                     category: str) -> None:
    gw = gateway(max_command_bytes=max_bytes)
    name = "reserve" if b"soc_pct" in payload else "mode"
    result = send(gw, name, payload)
    assert result["status"] == "rejected"
    assert gw.stats.commands_rejected == {category: 1}, result


def test_retained_and_batteryless_force_commands_are_refused() -> None:
    ok = json.dumps({"mode": "force_charge", "power_w": 100, "duration_s": 60}).encode()
    gw = gateway()
    assert send(gw, "mode", ok, retained=True)["status"] == "rejected"
    assert send(gateway(battery=None), "mode", ok)["status"] == "rejected"
    assert send(gw, "mode", ok)["status"] == "applied"
