"""The community market operator: auctions, bids, clearing, awards and settlement over MQTT.

The contract is ``docs/mqtt-market.md`` (schemas in ``community/schemas/market_*.json``).
Pure parts: :mod:`~community.market.schedule` (auction calendar), :mod:`~community.market.auction`
(stored bids -> result and awards, via :func:`community.clearing.clear`),
:mod:`~community.market.settlement` (statements and budget balance),
:mod:`~community.market.messages` (topics, payloads, validation). With I/O:
:mod:`~community.market.ledger` (SQLite) and :mod:`~community.market.operator` (the service).
"""

from community.market.operator import MarketOperator, OperatorStats, run_market

__all__ = ["MarketOperator", "OperatorStats", "run_market"]
