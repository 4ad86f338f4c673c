"""Skipping the sampler to any position of a huge epoch: O(1) time and memory.

Restores a sampler at position p of an epoch of 2*10^9 samples (as a resume does)
and takes one global batch of 256, for p from 0 to 10^9; reports time and peak
Python memory (tracemalloc) side by side, the state's size, and for contrast the
cost of materialising a shuffled index table of only 10^7 samples.

    python benchmarks/sampler_skip.py
"""

from __future__ import annotations

import json
import statistics
import time
import tracemalloc

import numpy as np

from dtrain.sampler import ElasticSampler

EPOCH = 2 * 10**9
BATCH = 256


def resume_and_take(position: int) -> tuple[float, float, int, int]:
    """(skip seconds, first-batch seconds, peak bytes, state bytes) of a resume at ``position``."""
    start = time.perf_counter()
    sampler = ElasticSampler(EPOCH, seed=1234)
    sampler.load_state_dict({**sampler.state_dict(), "samples_in_epoch": position})
    skipped = time.perf_counter()
    batch = sampler.take(BATCH)
    taken = time.perf_counter()
    assert batch.positions[0] == position and len(set(batch.indices.tolist())) == BATCH
    tracemalloc.start()  # memory measured on a second, traced run (tracing slows it down)
    again = ElasticSampler(EPOCH, seed=1234)
    again.load_state_dict({**again.state_dict(), "samples_in_epoch": position})
    again.take(BATCH)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return skipped - start, taken - skipped, peak, len(json.dumps(sampler.state_dict()).encode())


def main() -> None:
    print(f"epoch of {EPOCH:.0e} samples, global batch {BATCH}, median of 50 runs")
    print(
        "| position | skip: restore state (us) | first batch after it (us) | peak memory (KiB) | state (bytes, JSON) |"
    )
    print("|---|---|---|---|---|")
    resume_and_take(0)  # warm numpy up
    for position in (0, 10**6, 10**9, EPOCH - BATCH):
        runs = [resume_and_take(position) for _ in range(50)]
        print(
            f"| {position:,} | {statistics.median(r[0] for r in runs) * 1e6:.1f} | "
            f"{statistics.median(r[1] for r in runs) * 1e6:.0f} | "
            f"{max(r[2] for r in runs) / 1024:.1f} | {runs[0][3]} |"
        )
    start = time.perf_counter()
    np.random.default_rng(0).permutation(10**7)
    elapsed = time.perf_counter() - start
    print(f"| contrast: shuffling a table of 1e7 indices | | {elapsed * 1e6:,.0f} | {10**7 * 8 / 1024:,.0f} | - |")


if __name__ == "__main__":
    main()
