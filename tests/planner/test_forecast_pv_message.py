"""The MQTT ``forecast/pv`` payload on its own: schema, every refusal with its code, and fuzzing
(only :class:`ExternalForecastError` ever escapes; nothing non-finite is ever accepted)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import messages
from gateway.forecast.pv import (
    MAX_MESSAGE_BYTES,
    MAX_POINTS,
    ExternalForecast,
    ExternalForecastError,
    parse_forecast_message,
)

NOW = 1_750_090_800.0
SITE = "home-1"


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "site": SITE, "issued": NOW - 600, "id": "f-1",
                         "points": [[NOW - 900 + k * 900, 100.0 * k] for k in range(8)]}
    d.update(over)
    return d


def parse(obj: Any) -> ExternalForecast:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_forecast_message(raw, site=SITE, now=NOW)


def test_a_valid_document_is_read_exactly() -> None:
    fc = parse(doc(source="solcast"))
    assert fc.issued_at == NOW - 600 and fc.ref == "f-1"
    assert fc.times.tolist() == [NOW - 900 + k * 900 for k in range(8)]
    assert fc.watts.tolist() == [100.0 * k for k in range(8)]
    assert not fc.times.flags.writeable and not fc.watts.flags.writeable  # shared with a thread


def test_the_schema_loads_and_agrees_with_jsonschema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    s = messages.schema("forecast_pv")
    assert s["$id"].endswith("forecast_pv.json")
    cases: list[Any] = [doc(), doc(v=2), doc(site=""), doc(issued=0), doc(issued="x"),
                        doc(points=[[1, "a"]]), doc(points={}), doc(extra=1), doc(id=""),
                        doc(id="x" * 65), doc(source="y" * 65), [1], "x", None,
                        {k: v for k, v in doc().items() if k != "points"}]
    for c in cases:
        ours = messages.validate("forecast_pv", c) == []
        theirs = jsonschema.Draft202012Validator(s).is_valid(c)
        assert ours == theirs, c


BIG = b'{"v":1,"site":"home-1","issued":1,"points":[' + b"[1,1]," * 30000 + b"[2,2]]"


@pytest.mark.parametrize(("payload", "code", "detail"), [
    (BIG, "oversize", f"> {MAX_MESSAGE_BYTES}"),
    (b"{not json", "json", "not UTF-8 JSON"),
    (b"\xff\xfe", "json", "not UTF-8 JSON"),
    (doc(v=2), "schema", "field 'v'"),
    ({k: v for k, v in doc().items() if k != "issued"}, "schema", "field 'issued': is required"),
    (doc(points=[[NOW, 1, 2], [NOW + 60, 1]]), "schema", "points[0]': must be [time, watts]"),
    (doc(points=[[NOW, "1"], [NOW + 60, 1]]), "schema", "field 'points[0][1]'"),
    (doc(wind=3), "schema", "field 'wind': is not allowed"),
    (doc(site="home-2"), "site", "'home-2'"),
    (b'{"v":1,"site":"home-1","issued":1,"points":[[1,NaN]]}', "non_finite", "NaN"),
    (b'{"v":1,"site":"home-1","issued":1,"points":[[1,Infinity]]}', "non_finite", "Infinity"),
    (b'{"v":1,"site":"home-1","issued":1,"points":[[1,1e400]]}', "non_finite", "finite"),
    (doc(points=[[NOW, 0], [NOW + 60, 10**400]]), "non_finite", "float range"),
    (doc(points=[[NOW, 0], [NOW + 60, -5]]), "negative", "points[1] watts -5"),
    (doc(points=[[NOW, 0], [NOW + 60, 2e6]]), "absurd", "points[1] watts 2e+06"),
    (doc(points=[[NOW, 0], [NOW + 60, 1], [NOW + 30, 1]]), "unsorted", "points[2]"),
    (doc(points=[[NOW, 0], [NOW, 1]]), "duplicate", "points[1]"),
    (doc(points=[[NOW, 1]]), "too_few", "at least 2"),
    (doc(points=[[NOW + k, 1] for k in range(MAX_POINTS + 1)]), "too_many", f"> {MAX_POINTS}"),
    (doc(points=[[NOW, 1], [NOW + 9 * 86400, 1]]), "span", "of issued"),
    (doc(points=[[NOW - 3 * 86400, 1], [NOW + 60, 1]]), "span", "of issued"),
    (doc(issued=NOW - 13 * 3600), "stale", "13.0 h ago"),
    (doc(issued=NOW + 3600), "future", "3600 s ahead"),
    (doc(points=[[NOW - 7200, 1], [NOW - 60, 1]]), "expired", "60 s before"),
])
def test_each_bad_document_is_refused_with_its_code(payload: Any, code: str,
                                                    detail: str) -> None:
    with pytest.raises(ExternalForecastError) as ei:
        parse(payload)
    assert ei.value.code == code
    assert str(ei.value).startswith(f"{code}: ") and detail in str(ei.value), str(ei.value)


def test_the_id_is_kept_for_the_reply_when_it_could_be_read() -> None:
    with pytest.raises(ExternalForecastError) as ei:
        parse(doc(id="mine", points=[[NOW, -1], [NOW + 60, 1]]))
    assert ei.value.ref == "mine"
    with pytest.raises(ExternalForecastError) as ei:
        parse(b"[")
    assert ei.value.ref is None


def test_a_small_clock_skew_is_tolerated() -> None:
    assert parse(doc(issued=NOW + 200)).issued_at == NOW + 200


# ------------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 10**400, NOW, NOW + 60, NOW - 60]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)
points = st.lists(st.one_of(st.lists(numbers, min_size=0, max_size=3), json_values),
                  max_size=12)
near = st.floats(min_value=NOW - 3 * 86400, max_value=NOW + 9 * 86400, allow_nan=False)
plausible_points = st.lists(st.tuples(near, st.one_of(numbers, st.floats(0, 5000))),
                            max_size=12).map(lambda ps: [list(p) for p in ps])
wild_documents = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_values),
     "site": st.one_of(st.just(SITE), json_values),
     "issued": st.one_of(near, numbers, json_values),
     "points": st.one_of(points, plausible_points)},
    optional={"id": json_values, "source": json_values, "extra": json_values},
)
# Past the schema: right version and site, about the right time, valid points with at most
# one of them corrupted (a number from anywhere, or a time moved).
def _corrupt(d: dict[str, Any], bad: tuple[int, int, Any] | None) -> dict[str, Any]:
    if bad is not None and d["points"]:
        i, j, value = bad
        d["points"][i % len(d["points"])][j] = value
    return d


plausible_documents = st.builds(
    _corrupt,
    st.fixed_dictionaries(
        {"v": st.just(1), "site": st.just(SITE),
         "issued": st.one_of(st.floats(NOW - 11 * 3600, NOW + 200), st.floats(NOW - 13 * 3600,
                                                                               NOW + 400)),
         "points": st.lists(st.tuples(st.floats(NOW - 3600, NOW + 3 * 86400), st.floats(0, 5000)),
                            min_size=1, max_size=12, unique_by=lambda q: q[0])
         .map(lambda ps: [list(q) for q in sorted(ps)])},
        optional={"id": st.text(max_size=70)}),
    st.one_of(st.none(), st.tuples(st.integers(0, 11), st.integers(0, 1),
                                   st.one_of(numbers, near, json_values))),
)
documents = st.one_of(wild_documents, plausible_documents, plausible_documents)


def check_accepted(fc: ExternalForecast) -> None:
    """What an accepted forecast always is, whatever came in."""
    assert math.isfinite(fc.issued_at)
    assert fc.times.size >= 2 and fc.times.size == fc.watts.size <= MAX_POINTS
    assert np.all(np.isfinite(fc.times)) and np.all(np.isfinite(fc.watts))
    assert np.all(fc.watts >= 0) and np.all(np.diff(fc.times) > 0)
    assert fc.issued_at <= NOW + 300 and fc.times[-1] >= NOW


def run(raw: bytes) -> None:
    try:
        fc = parse_forecast_message(raw, site=SITE, now=NOW)
    except ExternalForecastError as e:
        assert str(e).startswith(f"{e.code}: ")
        return
    check_accepted(fc)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_bytes(raw: bytes) -> None:
    run(raw)


@FUZZ
@given(documents)
def test_fuzz_documents(d: dict[str, Any]) -> None:
    run(json.dumps(d, allow_nan=True).encode())


@FUZZ
@given(st.lists(st.tuples(st.floats(0, 7 * 86400), st.floats(0, 10000)), min_size=2,
                max_size=50, unique_by=lambda p: p[0]),
       st.floats(0, 11 * 3600))
def test_fuzz_valid_documents_are_accepted_as_sent(pts: list[tuple[float, float]],
                                                   age: float) -> None:
    pts = sorted(pts)
    d = doc(issued=NOW - age, points=[[NOW + t, w] for t, w in pts])
    d["points"][-1][0] = max(d["points"][-1][0], NOW)  # not expired
    if len({p[0] for p in d["points"]}) < len(d["points"]):
        return  # NOW + t rounded two times together
    fc = parse(d)
    check_accepted(fc)
    assert fc.times.tolist() == [p[0] for p in d["points"]]
    assert fc.watts.tolist() == [p[1] for p in d["points"]]
