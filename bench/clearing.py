"""Time to clear one delivery interval of 1,000 and 10,000 bid steps (community.clearing.clear).

Random but realistic curves: homes submit ~10 steps each; buyers' prices fall and sellers' rise
along their curves, on a 0.1 cent grid (so the margin usually has ties), between a feed-in tariff
floor and a retail cap; quantities 0.05-1.5 kWh. Each timing covers building the BidSteps from
kWh arrays (structural validation) plus clearing, i.e. what the operator does per interval.
Median of several repeats. Last stdout line: one JSON object.

Anchor (issue 6): pymarket's Huang double auction took ~1.0 s for 1,000 bids on this machine.
Target: 10,000 steps in <= 50 ms.

Run: .venv/bin/python bench/clearing.py [--repeats N]  (project installed, or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from community.clearing import BUY, SELL, BidSteps, Mechanism, clear

FLOOR, CAP = 0.08, 0.35
STEPS_PER_HOME = 10


def random_market(n_steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n_steps steps from n_steps/10 homes, each a monotone buy or sell curve."""
    homes = max(1, n_steps // STEPS_PER_HOME)
    site = np.repeat(np.arange(homes), STEPS_PER_HOME)[:n_steps]
    home_side = rng.choice([BUY, SELL], homes)
    side = home_side[site]
    # A buyer's curve starts near the cap and falls; a seller's starts near the floor and rises.
    step = np.tile(np.arange(STEPS_PER_HOME), homes)[:n_steps]
    buy_start, sell_start = rng.uniform(0.20, CAP, homes), rng.uniform(FLOOR, 0.22, homes)
    start = np.where(home_side == BUY, buy_start, sell_start)
    slope = rng.uniform(0.002, 0.012, homes)
    price = start[site] - side * slope[site] * step
    price = np.clip(np.round(price, 3), FLOOR, CAP)
    return {
        "site": site,
        "bid": site * 1000 + step,
        "side": side,
        "price": price,
        "quantity_kwh": np.round(rng.uniform(0.05, 1.5, n_steps), 3),
        "seq": rng.permutation(n_steps),
    }


def time_clear(
    n_steps: int, mechanism: Mechanism, repeats: int, seed: int
) -> tuple[float, float, int]:
    """Median ms over ``repeats`` fresh markets, plus the last price and volume (sanity line)."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    price, volume = float("nan"), 0
    for _ in range(repeats):
        market = random_market(n_steps, rng)
        t0 = time.perf_counter()
        steps = BidSteps.from_kwh(**market)
        result = clear(steps, floor=FLOOR, cap=CAP, mechanism=mechanism)
        times.append((time.perf_counter() - t0) * 1000.0)
        price = result.price if result.price is not None else float("nan")
        volume = result.volume_wh
    return statistics.median(times), price, volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()

    # Warm-up so that first-call imports/allocations are not timed.
    time_clear(1000, "uniform", 3, seed=0)
    figures: dict[str, object] = {"mechanism": "uniform", "repeats": args.repeats}
    mechanisms: tuple[Mechanism, ...] = ("uniform", "pay_as_bid")
    for mechanism in mechanisms:
        for n in (1_000, 10_000):
            ms, price, volume = time_clear(n, mechanism, args.repeats, seed=n)
            print(
                f"{mechanism:>10}: {n:>6} steps cleared in {ms:7.2f} ms "
                f"(median of {args.repeats}); "
                f"last run: price {price:.4f}/kWh, volume {volume / 1000:.1f} kWh"
            )
            key = f"steps_{n}_ms" if mechanism == "uniform" else f"pay_as_bid_steps_{n}_ms"
            figures[key] = round(ms, 3)
    print("anchor: pymarket Huang double auction ~1000 ms for 1,000 bids; target <= 50 ms @ 10k")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
