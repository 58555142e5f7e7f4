"""The MQTT contract: schemas, the small validator, commands, HA discovery, state payloads."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from drivers.natures import BatteryReading, MeterReading
from gateway import hass, messages
from gateway.commands import CommandOutcome, ModeState, SiteState, handle_command, rule_setpoints
from gateway.messages import SCHEMA_NAMES, SchemaError, Topics, validate

TOPICS = Topics("hems/v1", "home-1")


def battery(w: float = 0.0, soc: float = 50.0) -> BatteryReading:
    return BatteryReading(ts=0.0, w=w, soc_pct=soc, capacity_wh=10000, max_charge_w=5000,
                          max_discharge_w=4000, reserve_pct=10, ctl_mode=0, in_rate_pct=None,
                          out_rate_pct=None, revert_s=None)


def meter(site_w: float) -> MeterReading:
    return MeterReading(ts=0.0, site_w=site_w, phases_w=(None, None, None), import_wh=None,
                        export_wh=None)


def test_every_schema_loads_and_uses_only_checked_keywords() -> None:
    for name in SCHEMA_NAMES:
        assert messages.schema(name)["$id"].endswith(f"{name}.json")


def test_unsupported_keyword_is_refused() -> None:
    with pytest.raises(SchemaError, match="oneOf"):
        messages._check_keywords({"oneOf": []}, "x")


@pytest.mark.parametrize(("payload", "error"), [
    ({"mode": "auto"}, None),
    ({"mode": "force_charge", "power_w": 1000, "duration_s": 60}, None),
    ({}, "field 'mode': is required"),
    ({"mode": "turbo"}, "field 'mode': must be one of"),
    ({"mode": "force_charge"}, "field 'power_w': is required"),
    ({"mode": "force_charge", "power_w": -5, "until": 1}, "field 'power_w': must be > 0"),
    ({"mode": "auto", "extra": 1}, "field 'extra': is not allowed"),
    ({"mode": "auto", "id": "x" * 65}, "field 'id': must have at most 64"),
    ({"mode": True}, "field 'mode': must be one of"),
    ([1, 2], "payload: must be object"),
])
def test_cmd_mode_validation(payload: Any, error: str | None) -> None:
    errors = validate("cmd_mode", payload)
    if error is None:
        assert errors == []
    else:
        assert any(error in e for e in errors), errors


def test_validator_agrees_with_jsonschema_when_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    cases = [{"mode": "auto"}, {"mode": "force_charge"}, {"mode": "idle", "x": 1},
             {"soc_pct": 101}, {"soc_pct": 50}, {"mode": "force_discharge", "power_w": 1}]
    for name in ("cmd_mode", "cmd_reserve"):
        for c in cases:
            ours = validate(name, c) == []
            theirs = jsonschema.Draft202012Validator(messages.schema(name)).is_valid(c)
            assert ours == theirs, (name, c)


NOW = 1_750_000_000.0


def cmd(name: str, obj: Any, state: ModeState | None = None, bat: BatteryReading | None = None,
        max_bytes: int = 4096) -> CommandOutcome:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return handle_command(name, raw, state or ModeState(), bat, NOW, max_bytes)


def test_commands_applied() -> None:
    out = cmd("mode", {"id": "a1", "mode": "force_charge", "power_w": 3000, "duration_s": 600},
              bat=battery())
    assert out.applied and out.cmd_id == "a1" and out.state is not None
    assert (out.state.mode, out.state.power_w, out.state.until) == ("force_charge", 3000,
                                                                   NOW + 600)
    out = cmd("reserve", {"soc_pct": 25})
    assert out.applied and out.state is not None and out.state.reserve_soc_pct == 25


@pytest.mark.parametrize(("name", "payload", "category", "reason"), [
    ("mode", b"x" * 5000, "oversize", "payload too large: 5000 bytes > 4096"),
    ("mode", b"{not json", "malformed", "malformed JSON"),
    ("mode", b"\xff\xfe", "malformed", "malformed JSON"),
    ("reboot", {"now": True}, "unknown", "unknown command 'reboot'"),
    ("mode", {"mode": "force_charge", "power_w": 6000, "duration_s": 60}, "limit",
     "exceeds the battery's max charge power 5000 W"),
    ("mode", {"mode": "force_discharge", "power_w": 4500, "duration_s": 60}, "limit",
     "max discharge power 4000 W"),
    ("mode", {"mode": "force_charge", "power_w": 100}, "invalid", "exactly one end"),
    ("mode", {"mode": "force_charge", "power_w": 100, "until": NOW - 1}, "invalid",
     "not in the future"),
    ("mode", {"mode": "idle", "power_w": 100}, "invalid", "only allowed with force"),
    ("reserve", {"soc_pct": 120}, "invalid", "field 'soc_pct': must be <= 100"),
])
def test_commands_rejected_with_reason(name: str, payload: Any, category: str,
                                       reason: str) -> None:
    out = cmd(name, payload, bat=battery())
    assert not out.applied and out.state is None
    assert out.category == category
    assert out.reason is not None and reason in out.reason


def test_force_mode_without_battery_reading_is_rejected() -> None:
    out = cmd("mode", {"mode": "force_charge", "power_w": 100, "duration_s": 60}, bat=None)
    assert not out.applied and "no battery reading" in (out.reason or "")


def test_force_mode_expires_back_to_auto() -> None:
    s = ModeState(mode="force_charge", power_w=1000, until=NOW + 10)
    assert s.current(NOW + 9).mode == "force_charge"
    assert s.current(NOW + 10).mode == "auto" and s.current(NOW + 10).until is None


def test_rule_setpoints_self_consumption_and_reserve() -> None:
    st = SiteState(NOW, meter(-1200.0), None, battery(w=300.0))
    assert rule_setpoints(st, ModeState()).battery_w == 1500.0  # absorb the export
    st = SiteState(NOW, meter(9000.0), None, battery(w=0.0))
    assert rule_setpoints(st, ModeState()).battery_w == -4000.0  # clamped to max discharge
    st = SiteState(NOW, meter(500.0), None, battery(w=0.0, soc=10.0))
    assert rule_setpoints(st, ModeState(reserve_soc_pct=10)).battery_w == 0.0  # at reserve
    st = SiteState(NOW, None, None, battery())
    assert rule_setpoints(st, ModeState()).battery_w is None  # blind: release
    assert rule_setpoints(st, ModeState(mode="idle")).battery_w == 0.0
    st = SiteState(NOW, meter(0), None, battery(soc=50))
    fc = ModeState(mode="force_charge", power_w=9000, until=NOW + 1)
    assert rule_setpoints(st, fc).battery_w == 5000.0
    fd = ModeState(mode="force_discharge", power_w=2000, until=NOW + 1, reserve_soc_pct=60)
    assert rule_setpoints(st, fd).battery_w == 0.0  # below the reserve: no discharge


HA_SENSOR_UNITS: dict[str | None, set[str | None]] = {
    "power": {"W", "kW"}, "energy": {"Wh", "kWh", "MWh"}, "battery": {"%"}, "enum": {None},
    None: {None},
}


def test_ha_discovery_payloads_are_valid_for_home_assistant() -> None:
    msgs = hass.discovery_messages(TOPICS)
    state_keys = set(messages.schema("state")["properties"])
    unique: set[str] = set()
    for topic, raw in msgs:
        m = re.fullmatch(r"homeassistant/(sensor|binary_sensor|number)/hems_home_1/(\w+)/config",
                         topic)
        assert m, topic
        cfg = json.loads(raw)
        assert cfg["unique_id"] not in unique
        unique.add(cfg["unique_id"])
        assert cfg["device"]["identifiers"] == ["hems_home_1"]
        assert cfg["name"] and cfg["state_topic"]
        if m.group(1) != "binary_sensor":
            assert cfg["availability"] == [{"topic": TOPICS.availability,
                                            "payload_available": "online",
                                            "payload_not_available": "offline"}]
            keys = re.findall(r"value_json\.(\w+)", cfg["value_template"])
            assert keys and set(keys) <= state_keys, keys
        if m.group(1) == "sensor":
            assert cfg.get("unit_of_measurement") in HA_SENSOR_UNITS[cfg.get("device_class")]
            assert cfg.get("state_class") in (None, "measurement", "total", "total_increasing")
            if cfg.get("device_class") == "enum":
                assert cfg["options"] and "state_class" not in cfg
        if m.group(1) == "number":
            assert cfg["command_topic"] == TOPICS.cmd("reserve")
            rendered = cfg["command_template"].replace("{{ value }}", "42")
            assert validate("cmd_reserve", json.loads(rendered)) == []
    by_id = {json.loads(r)["unique_id"]: json.loads(r) for _, r in msgs}
    for e in ("grid_import_energy", "grid_export_energy", "pv_energy"):
        c = by_id[f"hems_home_1_{e}"]
        assert (c["device_class"], c["state_class"], c["unit_of_measurement"]) == (
            "energy", "total_increasing", "kWh")
    for e in ("site_power", "pv_power", "battery_power", "battery_soc", "gateway_online",
              "gateway_status", "mode"):
        assert f"hems_home_1_{e}" in by_id
