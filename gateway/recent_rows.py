"""The outbox rows committed lately, kept in memory for the MQTT publisher.

The publisher reads telemetry back from the store's outbox after each commit (store-and-forward:
a row is published only once it is on disk). Reading back what was written a moment ago cost a
hop to the store's thread and a query per commit, plus a second hop that found nothing; with
many gateways in one process (the community simulation) those hops were a visible share of the
CPU. :class:`RecentRows` answers those reads from memory and says ``None`` whenever it cannot
answer exactly, so the caller falls back to the store (after a restart, a long broker outage, or
rows dropped by retention).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from gateway.store import OutboxRow


class RecentRows:
    """Committed outbox rows after :attr:`after`, oldest first.

    Invariant: every committed row with ``seq > after`` is held (rows never committed, such as
    a pending backlog dropped under a failing disk, are in neither place). At most ``cap`` rows
    are held; beyond that the oldest go and :attr:`after` moves past them.
    """

    def __init__(self, committed_seq: int, cap: int = 1000) -> None:
        if cap < 1:
            raise ValueError(f"RecentRows cap must be >= 1, got {cap}")
        self.after = committed_seq
        self.cap = cap
        self._rows: deque[OutboxRow] = deque()

    def __len__(self) -> int:
        return len(self._rows)

    def committed(self, rows: Iterable[OutboxRow]) -> None:
        """Rows just committed (in seq order, each after every row committed before)."""
        q = self._rows
        q.extend(rows)
        while len(q) > self.cap:
            self.after = q.popleft().seq

    def published(self, seq: int) -> None:
        """Rows up to ``seq`` are acknowledged: they are not read again."""
        q = self._rows
        while q and q[0].seq <= seq:
            q.popleft()
        self.after = max(self.after, seq)

    def forget(self, committed_seq: int) -> None:
        """Hold nothing (the store dropped rows behind our back, e.g. retention)."""
        self._rows.clear()
        self.after = committed_seq

    def get(self, after_seq: int, limit: int) -> list[OutboxRow] | None:
        """Committed rows with ``seq > after_seq``, oldest first, at most ``limit``; ``None``
        when some of them may be older than what is held (read the store instead)."""
        if after_seq < self.after:
            return None
        out: list[OutboxRow] = []
        for r in self._rows:
            if len(out) >= limit:
                break
            if r.seq > after_seq:
                out.append(r)
        return out
