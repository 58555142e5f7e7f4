"""The DSO's schedule file, parsers, schemas, acks and the stress-day scenario (no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from community.dso import (
    ScheduleError,
    control_wire,
    default_wire,
    load_schedule,
    parse_ack,
    parse_duration,
    parse_time,
    validate_payload,
)
from community.scenarios import STRESS_WINDOWS, stress_day
from gateway.envelope import parse_control, parse_default
from gateway.signing import sign

DAY = 1_782_000_000.0  # 2026-06-21 00:00 UTC
NOW = DAY + 600.0
GOOD = """
start = 2026-06-21T00:00:00Z

[sites.home-1.default]
export_w = 5000

[[sites.home-1.controls]]
id = "midday"
offset = "11:00"
duration = "2h"
export_w = 1500

[[sites.home-1.controls]]
start = "2026-06-21T13:00:00+00:00"
duration_s = 1800
export_w = 0

[sites.home-2.default]
id = "d2"
import_w = 7000
generation_w = 9000
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "schedule.toml"
    p.write_text(text)
    return p


def test_a_good_file_gives_controls_the_gateway_accepts(tmp_path: Path) -> None:
    s = load_schedule(write(tmp_path, GOOD), now=NOW)
    assert set(s) == {"home-1", "home-2"}
    h1 = s["home-1"]
    assert [c.start - DAY for c in h1.controls] == [11 * 3600, 13 * 3600]
    assert [c.duration_s for c in h1.controls] == [7200, 1800]
    assert h1.controls[0].id == "midday" and h1.controls[1].id.startswith("home-1-")
    assert h1.controls[1].export_w == 0.0
    # created: the load time, later in the file = newer (wins an overlap)
    created = [h1.default.created] + [c.created for c in h1.controls]  # type: ignore[union-attr]
    assert created == sorted(created) and len(set(created)) == 3 and created[0] >= NOW
    for c in h1.controls:
        assert parse_control(control_wire(c), "home-1", NOW) == c
    d2 = s["home-2"].default
    assert d2 is not None and d2.id == "d2" and d2.import_w == 7000 and d2.export_w is None
    assert parse_default(default_wire(d2), "home-2", NOW + 1) == d2
    assert s["home-2"].controls == ()


@pytest.mark.parametrize(
    ("text", "where", "needle"),
    [
        ('[[sites.h.controls]]\noffset = 0\nduration = "1h"\nexport_kw = 5',
         "sites.h.controls[0].export_kw", "unknown key"),
        ('[[sites.h.controls]]\noffset = 0\nduration = "1h"\nexport_w = -5',
         "sites.h.controls[0].export_w", ">= 0"),
        ('[[sites.h.controls]]\noffset = 0\nduration = "1h"\nexport_w = 5e7',
         "sites.h.controls[0].export_w", "unit error"),
        ('[[sites.h.controls]]\noffset = 0\nduration = "1h"\nexport_w = nan',
         "sites.h.controls[0].export_w", "finite"),
        ('[[sites.h.controls]]\noffset = 0\nduration = "1h"\nexport_w = "1500"',
         "sites.h.controls[0].export_w", "number"),
        ('[[sites.h.controls]]\nduration = "1h"\nexport_w = 1', "sites.h.controls[0]",
         "exactly one of 'start'"),
        ('[[sites.h.controls]]\noffset = 0\nduration = "soon"\nexport_w = 1',
         "sites.h.controls[0].duration", "duration like"),
        ('[[sites.h.controls]]\noffset = 0\nduration_s = 0\nexport_w = 1',
         "sites.h.controls[0].duration_s", "> 0"),
        ('[[sites.h.controls]]\nstart = 2026-06-21T11:00:00\nduration_s = 60\nexport_w = 1',
         "sites.h.controls[0].start", "time zone"),
        ('[[sites.h.controls]]\noffset = 0\nduration_s = 60', "sites.h.controls[0]",
         "sets none"),
        ('[[sites.h.controls]]\nid = "a b"\noffset = 0\nduration_s = 60\nexport_w = 1',
         "sites.h.controls[0].id", "1-64"),
        ('[sites.H.default]\nexport_w = 1', "sites.H", "site id"),
        ('[sites.h.default]\nexport_w = 1\nstart = 5', "sites.h.default.start", "unknown key"),
        ('[sites.h]\ncontrols = 3', "sites.h.controls", "array of tables"),
        ("", "sites", "at least one"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, where: str,
                                          needle: str) -> None:
    p = write(tmp_path, 'start = "2026-06-21T00:00:00Z"\n' + text)
    with pytest.raises(ScheduleError) as ei:
        load_schedule(p, now=NOW)
    e = ei.value
    assert any(w == where and needle in m for w, m in e.errors), e.errors
    assert str(p) in str(e) and where in str(e)


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path) -> None:
    p = write(tmp_path, "[[sites.h.controls]]\noffset = 0\nduration = -1\nexport_w = -1\n"
              "[sites.h.default]\nload_w = true\n")
    with pytest.raises(ScheduleError) as ei:
        load_schedule(p, now=NOW, scenario_start=DAY)
    wheres = {w for w, _ in ei.value.errors}
    assert {"sites.h.controls[0].duration", "sites.h.controls[0].export_w",
            "sites.h.default.load_w"} <= wheres


def test_offset_without_a_reference_and_unreadable_files(tmp_path: Path) -> None:
    p = write(tmp_path, "[[sites.h.controls]]\noffset = 60\nduration = 60\nexport_w = 1\n")
    with pytest.raises(ScheduleError, match=r"controls\[0\]\.offset: needs a top-level 'start'"):
        load_schedule(p, now=NOW)
    assert load_schedule(p, now=NOW, scenario_start=DAY)["h"].controls[0].start == DAY + 60
    with pytest.raises(ScheduleError, match="not valid TOML"):
        load_schedule(write(tmp_path, "[sites"), now=NOW)
    with pytest.raises(ScheduleError, match="cannot read"):
        load_schedule(tmp_path / "missing.toml", now=NOW)


def test_reload_keeps_the_version_of_unchanged_controls(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    first = load_schedule(p, now=NOW)
    again = load_schedule(p, now=NOW + 100, previous=first)
    assert again == first  # same created everywhere: nothing to re-publish
    edited = load_schedule(write(tmp_path, GOOD.replace("export_w = 1500", "export_w = 1200")),
                           now=NOW + 200, previous=first)
    old = {c.id: c for c in first["home-1"].controls}
    new = {c.id: c for c in edited["home-1"].controls}
    assert new["midday"].export_w == 1200 and new["midday"].created > NOW + 200
    other = next(i for i in new if i != "midday")
    assert new[other] == old[other]
    assert edited["home-1"].default == first["home-1"].default


def test_an_edit_with_an_explicit_old_created_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace('id = "midday"', 'id = "midday"\ncreated = 2026-06-20T00:00:00Z')
    first = load_schedule(write(tmp_path, text), now=NOW)
    assert first["home-1"].controls[0].created == DAY - 86400
    with pytest.raises(ScheduleError, match=r"controls\[0\]\.created: changed but created"):
        load_schedule(write(tmp_path, text.replace("1500", "1400")), now=NOW, previous=first)


@pytest.mark.parametrize(("text", "s"), [(90, 90.0), (1.5, 1.5), ("01:30", 5400.0),
                                         ("1:30:15", 5415.0), ("1h30m", 5400.0), ("90s", 90.0),
                                         ("2d", 172800.0), ("30min", 1800.0), ("1.5h", 5400.0)])
def test_parse_duration(text: object, s: float) -> None:
    assert parse_duration(text) == s


@pytest.mark.parametrize("bad", ["", "h", "-5", -5, True, float("nan"), float("inf"), "1:75",
                                 None, [1]])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_parse_time() -> None:
    assert parse_time("2026-06-21T00:00:00Z") == DAY
    assert parse_time("2026-06-21T02:00:00+02:00") == DAY
    assert parse_time(DAY) == DAY
    for bad in ("2026-06-21T00:00:00", "yesterday", 0, -1, True, math.inf):
        with pytest.raises(ValueError):
            parse_time(bad)


# --- schemas ----------------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()


def controls_msg(controls: list[dict[str, Any]]) -> dict[str, Any]:
    return sign({"v": 1, "site": "h", "issued": NOW, "controls": controls}, KEY)


CTL = {"id": "c1", "site": "h", "created": NOW, "start": NOW, "duration_s": 60.0,
       "export_w": 100.0}


def test_schemas_accept_what_the_publisher_sends_and_refuse_the_rest() -> None:
    assert validate_payload("dso_controls", controls_msg([CTL])) == []
    assert validate_payload("dso_controls", controls_msg([])) == []
    assert validate_payload("dso_controls", controls_msg([{**CTL, "import_w": None}])) == []
    no_limit = {k: v for k, v in CTL.items() if k != "export_w"}
    assert validate_payload("dso_controls", controls_msg([no_limit])) == [
        "field 'controls[0].export_w': is required"]
    assert validate_payload("dso_controls", controls_msg([{**no_limit, "load_w": None}]))
    assert validate_payload("dso_controls", controls_msg([{**CTL, "export_kw": 1}])) == [
        "field 'controls[0].export_kw': is not allowed"]
    nan = {**controls_msg([CTL]), "controls": [{**CTL, "export_w": math.nan}]}  # unsignable
    assert validate_payload("dso_controls", nan) == [
        "field 'controls[0].export_w': must be a finite number"]
    assert validate_payload("dso_controls", controls_msg([{**CTL, "export_w": -1}]))
    assert validate_payload("dso_controls", {**controls_msg([CTL]), "sig": "abc"})
    assert validate_payload("dso_controls", {k: v for k, v in controls_msg([]).items()
                                             if k != "sig"})
    d = sign({"v": 1, "site": "h", "issued": NOW,
              "default": {"id": "d", "site": "h", "created": NOW, "import_w": 10.0}}, KEY)
    assert validate_payload("dso_default", d) == []
    d["default"] = {"id": "d", "site": "h", "created": NOW}
    assert validate_payload("dso_default", d) == ["field 'default.export_w': is required"]


def test_schemas_agree_with_jsonschema_when_it_is_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    root = Path(__file__).parents[2] / "community" / "schemas"
    cases = {
        "dso_controls": [controls_msg([CTL]), controls_msg([{**CTL, "export_w": None}]),
                         controls_msg([{**CTL, "x": 1}])],
        "dso_ack": [{"v": 1, "site": "h", "control_id": "c", "status": "rejected", "t": 1.0},
                    {"v": 1, "site": "h", "control_id": None, "status": "rejected", "t": 1.0,
                     "reason": "bad sig"},
                    {"v": 1, "site": "h", "control_id": "c", "status": "started", "t": 1.0},
                    {"v": 1, "site": "H", "control_id": "c", "status": "started", "t": 1.0}],
        "dso_default": [
            sign({"v": 1, "site": "h", "issued": NOW, "default": {"id": "d", "site": "h",
                                                                  "created": NOW}}, KEY),
            sign({"v": 1, "site": "h", "issued": NOW, "default": {"id": "d", "site": "h",
                                                                  "created": NOW,
                                                                  "load_w": 0}}, KEY)],
    }
    cases["dso_controls"].append(controls_msg([{k: v for k, v in CTL.items()
                                                if k != "export_w"}]))
    for name, values in cases.items():
        schema = json.loads((root / f"{name}.json").read_text())
        for v in values:
            ours = validate_payload(name, v) == []
            theirs = jsonschema.Draft202012Validator(schema).is_valid(v)
            assert ours == theirs, (name, v)


def ack(**kw: Any) -> bytes:
    body = {"v": 1, "site": "h", "control_id": "c1", "status": "received", "t": NOW, **kw}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_parse_ack() -> None:
    a = parse_ack("h", ack(), NOW + 1)
    assert (a.site, a.control_id, a.status, a.t, a.reason, a.received) == (
        "h", "c1", "received", NOW, None, NOW + 1)
    r = parse_ack("h", ack(status="rejected", control_id=None, reason="bad signature"), NOW)
    assert r.control_id is None and r.reason == "bad signature"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"{not json", "UTF-8 JSON"),
        (b"[1]", "must be object"),
        (ack(status="done"), "status"),
        (ack(status="rejected"), "reason"),
        (ack(t=...), "'t': is required"),
        (ack(t="now"), "field 't'"),
        (ack(v=2), "field 'v'"),
        (ack(extra=1), "extra"),
        (ack(site="other"), "for site 'other'"),
        (ack(control_id="x" * 65), "control_id"),
    ],
)
def test_parse_ack_refuses_with_a_reason(payload: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as ei:
        parse_ack("h", payload, NOW)
    assert needle in str(ei.value)


# --- the stress day ---------------------------------------------------------------------------


def test_stress_day_limits_by_hand() -> None:
    d = stress_day("home-0", DAY)
    expect = {  # hour: (export_w, import_w)
        0.0: (5000, None), 10.999: (5000, None), 11.0: (1500, None), 12.99: (1500, None),
        13.0: (0, None), 13.49: (0, None), 13.5: (5000, None), 17.49: (5000, None),
        17.5: (5000, 2500), 19.49: (5000, 2500), 19.5: (5000, None), 23.99: (5000, None),
    }
    for h, (exp, imp) in expect.items():
        t = DAY + h * 3600
        assert (d.expected_limit(t, "export_w"), d.expected_limit(t, "import_w")) == (exp, imp), h
        assert d.limits_at(t).generation_w is None and d.limits_at(t).load_w is None
    assert [round((t - DAY) / 3600, 2) for t in d.change_times()] == [11, 13, 13.5, 17.5, 19.5]


def test_stress_day_limits_resolved_per_segment_are_the_resolvers() -> None:
    """limits_at answers from one resolution per segment between edges: at, just before and
    just after every edge, and in a random order, it agrees with the schedule itself."""
    d = stress_day("home-0", DAY)
    edges = [c.start for c in d.controls] + [c.start + c.duration_s for c in d.controls]
    ts = [DAY - 1.0, DAY + 86400.0] + [e + dt for e in edges for dt in (-1e-6, 0.0, 1e-6)]
    ts += list(DAY + np.random.default_rng(5).uniform(0, 86400, 200))
    for t in sorted(ts, key=math.sin):  # not in time order: the cache must not rely on it
        assert d.limits_at(t) == d._resolver.active(t).limits, t


def test_stress_day_is_publishable() -> None:
    d = stress_day("home-0", DAY)
    created = [d.default.created] + [c.created for c in d.controls]
    assert created == sorted(created) and len(set(created)) == len(created)
    assert len(d.controls) == len(STRESS_WINDOWS)
    for c in d.controls:
        assert parse_control(control_wire(c), "home-0", DAY + 10) == c
    assert parse_default(default_wire(d.default), "home-0", DAY + 10) == d.default
    s = d.schedule()
    assert s.site == "home-0" and s.controls == d.controls
    doc = json.loads(json.dumps(d.to_dict()))
    assert doc["default"]["export_w"] == 5000 and "import_w" not in doc["default"]
    assert [c["export_w"] for c in doc["controls"][:2]] == [1500, 0]


def test_a_later_correction_supersedes_in_the_expected_limits() -> None:
    from community.scenarios import Window

    windows = (*STRESS_WINDOWS, Window("relief", 12.0, 14.0, "export_w", 3000.0))
    d = stress_day("home-0", DAY, windows=windows)
    # The newer "relief" supersedes both older export windows for their whole windows (rule 2).
    assert d.expected_limit(DAY + 11.5 * 3600) == 5000
    assert d.expected_limit(DAY + 13.2 * 3600) == 3000
