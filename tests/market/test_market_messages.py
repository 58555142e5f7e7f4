"""Market contract: schemas load, builders produce valid payloads, each bad input gets its code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from community.market import messages as m
from community.market.auction import StoredBid, clear_auction
from community.market.ledger import statement_payload
from community.market.schedule import Calendar, interval_id
from community.market.settlement import Award, Tariff, settle_site

FLOOR, CAP = 0.08, 0.30
CAL = Calendar(community="c1", interval_s=900, gate_lead_s=300, price_floor=FLOOR,
               price_cap=CAP, members=["s2", "s1"])


def bid(**over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"v": 1, "community": "c1", "interval_id": "20260621T101500Z",
                         "site": "s1", "bid_id": "b1", "buy": [[0.25, 1.0], [0.20, 2.0]],
                         "sell": [[0.26, 1.5]]}
    b.update(over)
    return {k: v for k, v in b.items() if v is not ...}


def parse(doc: Any, site: str = "s1") -> m.Bid | m.Rejection:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return m.parse_bid(raw, site)


def code_of(doc: Any, site: str = "s1") -> str:
    r = parse(doc, site)
    if isinstance(r, m.Bid):
        bad = m.check_curves(r, FLOOR, CAP)
        return "ok" if bad is None else bad.code
    return r.code


def test_every_schema_loads() -> None:
    for name in m.SCHEMA_NAMES:
        assert m.schema(name)["type"] == "object"


def test_calendar_open_auction_and_ids() -> None:
    t = 1_782_036_000.0  # 2026-06-21T10:00:00Z
    a = CAL.open_auction(t)
    # Gate of 10:00 closed at 09:55; of 10:15 at 10:10 (> 10:00): that one is open.
    assert a.interval_id == "20260621T101500Z" == interval_id(t + 900)
    assert (a.delivery_start, a.delivery_end, a.gate_closure) == (t + 900, t + 1800, t + 600)
    assert CAL.open_auction(t + 599.9).interval_id == a.interval_id
    assert CAL.open_auction(t + 600).interval_id == "20260621T103000Z"  # at gate: next one
    assert a.members == ("s1", "s2")
    assert m.validate("market_announce", m.announce_payload(a)) == []
    with pytest.raises(ValueError, match="interval_s"):
        Calendar(community="c", interval_s=0, gate_lead_s=0, price_floor=0, price_cap=1)
    with pytest.raises(ValueError, match="floor <= cap"):
        Calendar(community="c", interval_s=60, gate_lead_s=0, price_floor=2, price_cap=1)
    with pytest.raises(ValueError, match="community"):
        Calendar(community="a/b", interval_s=60, gate_lead_s=0, price_floor=0, price_cap=1)


def test_a_good_bid_parses() -> None:
    r = parse(bid(seq=3))
    assert isinstance(r, m.Bid)
    assert r.buy == ((0.25, 1.0), (0.20, 2.0)) and r.sell == ((0.26, 1.5),) and r.seq == 3
    assert m.check_curves(r, FLOOR, CAP) is None
    # Equal prices are monotone; an empty bid (withdrawal) is valid.
    assert code_of(bid(buy=[[0.2, 1], [0.2, 1]], sell=[[0.2, 1], [0.2, 0]])) == "ok"
    assert code_of(bid(buy=..., sell=...)) == "ok"


@pytest.mark.parametrize(("doc", "site", "code", "names"), [
    (b"x" * (m.MAX_PAYLOAD_BYTES + 1), "s1", "oversize", "limit"),
    (b"{not json", "s1", "malformed", "JSON"),
    (b"\xff\xfe", "s1", "malformed", "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "s1", "oversize", "bytes"),
    (b"[" * 5000 + b"]" * 5000, "s1", "malformed", "JSON"),
    (b'{"v":1,"community":"c1","interval_id":"20260621T101500Z","site":"s1","bid_id":"b",'
     b'"buy":[[0.2,1e999]]}', "s1", "non_finite", "buy[0][1]"),
    (b'{"v":1,"community":"c1","interval_id":"20260621T101500Z","site":"s1","bid_id":"b",'
     b'"sell":[[NaN,1]]}', "s1", "non_finite", "sell[0][0]"),
    (bid(bid_id=...), "s1", "schema", "bid_id"),
    (bid(v=2), "s1", "schema", "'v'"),
    (bid(extra=1), "s1", "schema", "extra"),
    (bid(buy="lots"), "s1", "schema", "buy"),
    (bid(buy=[[0.2, "1"]]), "s1", "schema", "buy[0][1]"),
    (bid(interval_id="tomorrow"), "s1", "schema", "interval_id"),
    (bid(seq=-1), "s1", "schema", "seq"),
    ([1, 2], "s1", "schema", "payload"),
    (bid(site="s2"), "s1", "site_mismatch", "topic"),
    (bid(buy=[[0.2]]), "s1", "bad_step", "buy[0]"),
    (bid(sell=[[0.2, 1, 3]]), "s1", "bad_step", "sell[0]"),
    (bid(buy=[[0.2, 0.01]] * (m.MAX_STEPS + 1)), "s1", "bad_step", "steps"),
    (bid(buy=[[0.2, -1.0]]), "s1", "negative_quantity", "buy[0]"),
    (bid(sell=[[0.31, 1.0]]), "s1", "price_out_of_bounds", "sell[0]"),
    (bid(buy=[[0.07, 1.0]]), "s1", "price_out_of_bounds", "buy[0]"),
    (bid(buy=[[0.20, 1.0], [0.25, 1.0]]), "s1", "non_monotone", "buy[1]"),
    (bid(sell=[[0.26, 1.0], [0.25, 1.0]]), "s1", "non_monotone", "sell[1]"),
    (bid(buy=[[0.27, 1.0]], sell=[[0.26, 1.0]]), "s1", "crossing", "0.27"),
    (bid(sell=[[0.26, m.MAX_SIDE_KWH], [0.27, 1.0]]), "s1", "quantity_too_large", "sell"),
])
def test_bad_bids_get_their_code(doc: Any, site: str, code: str, names: str) -> None:
    r = parse(doc, site)
    if isinstance(r, m.Bid):
        bad = m.check_curves(r, FLOOR, CAP)
        assert bad is not None
        r = bad
    assert r.code == code, r
    assert names in r.reason
    assert r.code in m.REJECTION_CODES


def test_a_crossing_of_zero_quantity_steps_is_not_a_crossing() -> None:
    assert code_of(bid(buy=[[0.29, 0.0], [0.2, 1.0]], sell=[[0.25, 1.0]])) == "ok"


def test_meter_parse() -> None:
    ok = {"v": 1, "community": "c1", "interval_id": "20260621T101500Z", "site": "s1",
          "net_export_kwh": -0.75}
    r = m.parse_meter(json.dumps(ok).encode(), "s1")
    assert isinstance(r, m.Meter) and r.net_export_kwh == -0.75
    bad = m.parse_meter(json.dumps(ok).encode(), "s9")
    assert isinstance(bad, m.Rejection) and bad.code == "site_mismatch"
    bad = m.parse_meter(json.dumps({**ok, "net_export_kwh": 2e6}).encode(), "s1")
    assert isinstance(bad, m.Rejection) and bad.code == "schema"


def test_builders_produce_schema_valid_payloads() -> None:
    a = CAL.open_auction(1_782_036_000.0)
    bids = [StoredBid("s1", "b1", 1, ((0.25, 1.0),), ()),
            StoredBid("s2", "b2", 2, (), ((0.10, 0.6),)),
            StoredBid("s3", "b3", 3, ((0.09, 1.0),), ())]
    out = clear_auction(a, bids, cleared_at=1.0)
    assert m.validate("market_result", out.result) == []
    assert out.result["volume_kwh"] == 0.6 and out.result["trades"] == 2
    assert out.result["bids"] == 3
    for site in ("s1", "s2", "s3"):
        assert m.validate("market_award", out.award_payload(a, site)) == []
    assert out.award_payload(a, "s3")["side"] == "none"
    assert out.award_payload(a, "s3")["price"] is None
    empty = clear_auction(a, [], cleared_at=1.0)
    assert m.validate("market_result", empty.result) == []
    assert empty.result["clearing_price"] is None and empty.awards == {}
    st = settle_site("s1", Award(-0.6, -0.105), -1.0, Tariff(FLOOR, CAP))
    assert m.validate("market_settlement", statement_payload(a, st, 5.0)) == []
    for code in ("ok", "replaced", *m.REJECTION_CODES):
        p = m.bid_result_payload("c1", "s1", "bid", None, None, code, "why" * 300, 1.0)
        assert m.validate("market_bid_result", p) == []
        assert p["status"] == ("accepted" if code in ("ok", "replaced") else "rejected")


def test_topics() -> None:
    t = m.MarketTopics("c1")
    assert t.bids() == "hems/v1/market/c1/bids/+"
    assert t.site_of("hems/v1/market/c1/bids/s1", "bids") == "s1"
    assert t.site_of("hems/v1/market/c1/bids/s1/x", "bids") is None
    assert t.site_of("hems/v1/market/c2/bids/s1", "bids") is None
    assert t.site_of("hems/v1/market/c1/meter/s1", "bids") is None


def test_validator_agrees_with_jsonschema_when_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for doc in (bid(), bid(v=2), bid(extra=1), bid(buy=[[0.2, "x"]]), bid(bid_id=...)):
        ours = m.validate("market_bid", doc) == []
        theirs = jsonschema.Draft202012Validator(m.schema("market_bid")).is_valid(doc)
        assert ours == theirs, doc
