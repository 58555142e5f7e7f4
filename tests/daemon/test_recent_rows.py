"""RecentRows answers the publisher's reads exactly as the store's outbox would, or not at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.recent_rows import RecentRows
from gateway.store import OutboxRow


def _row(seq: int) -> OutboxRow:
    return OutboxRow(seq, "t", str(seq).encode(), 1, float(seq))


def test_reads_back_the_last_commit_then_nothing() -> None:
    r = RecentRows(committed_seq=10)
    r.committed([_row(11), _row(12), _row(13)])
    assert [x.seq for x in r.get(10, 100) or []] == [11, 12, 13]
    assert [x.seq for x in r.get(11, 1) or []] == [12]
    r.published(13)
    assert r.get(13, 100) == [] and len(r) == 0
    # older than what is held (a restart's backlog): the store must answer
    assert r.get(9, 100) is None


def test_over_the_cap_the_oldest_go_and_reads_before_them_go_to_the_store() -> None:
    r = RecentRows(committed_seq=0, cap=3)
    r.committed([_row(i) for i in range(1, 6)])
    assert len(r) == 3 and r.after == 2
    assert r.get(1, 100) is None
    assert [x.seq for x in r.get(2, 100) or []] == [3, 4, 5]


def test_bad_cap() -> None:
    with pytest.raises(ValueError, match="cap"):
        RecentRows(0, cap=0)


# One operation: ("commit", n rows, gap before them) | ("ack", how far into the unacked rows)
# | ("forget", _) | ("read", offset back from the acked seq, limit).
_ops = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("ack"), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("forget"), st.just(0), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, 4), st.integers(1, 6)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 50), cap=st.integers(1, 12), ops=_ops)
def test_any_history_reads_like_the_store(start: int, cap: int, ops: list[tuple[str, int, int]]
                                          ) -> None:
    stored = [_row(s) for s in range(1, start + 1)]  # the store's outbox (the model)
    committed = start
    acked = 0
    r = RecentRows(committed, cap=cap)
    for op, a, b in ops:
        if op == "commit":
            seqs = range(committed + 1 + b, committed + 1 + b + a)  # b: rows lost before disk
            rows = [_row(s) for s in seqs]
            stored += rows
            r.committed(rows)
            if rows:
                committed = rows[-1].seq
        elif op == "ack":
            unacked = [x.seq for x in stored if x.seq > acked]
            if unacked:
                acked = unacked[min(a, len(unacked) - 1)]
                r.published(acked)
        elif op == "forget":
            stored = stored[len(stored) // 2:]  # retention dropped the oldest half
            r.forget(committed)
        else:
            after = max(0, acked - a)
            got = r.get(after, b)
            want = [x for x in stored if x.seq > after][:b]
            if got is not None:
                assert got == want
        # what the publisher reads next (everything after its ack) is held unless the cap
        # pushed past it or the store dropped rows
        if acked >= committed:
            assert r.get(acked, cap) == []
    # (that answers are not always None is the deterministic tests' job)
