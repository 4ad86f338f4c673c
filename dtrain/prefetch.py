"""The next step's examples, made in a background thread while this step trains.

An example is a pure function of its sample (dtrain/data.py), so a batch made ahead equals one
made on time; the sampler counts samples only when a step takes them, so a checkpoint never
records a batch made ahead as consumed. A step whose samples are not the ones made ahead (the
plan changed, or nothing was) makes them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .data import make_examples, train_streams
from .sampler import GlobalBatch


def micro_batches(spec, data, micros: list[GlobalBatch], pin: bool) -> list[tuple]:
    """Each micro-batch's points and targets, on the host (pinned for a GPU's non-blocking copy)."""
    out = []
    for micro in micros:
        examples = make_examples(spec, data.seed, train_streams(data.mode, micro.epochs), micro.indices)
        pair = examples["points"], examples["targets"]
        out.append(tuple(t.pin_memory() for t in pair) if pin else pair)
    return out


class Prefetcher:
    def __init__(self, make: Callable[[GlobalBatch], list]):
        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtrain-data")
        self._ahead: tuple[GlobalBatch, Future] | None = None

    def take(self, share: GlobalBatch) -> list:
        """The examples of ``share``: the ones made ahead if they are these samples, else made now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and _same_samples(ahead[0], share):
            return ahead[1].result()
        return self._make(share)

    def start(self, share: GlobalBatch) -> None:
        """Make ``share``'s examples in the background (the next step's, as far as is known now)."""
        self._ahead = (share, self._pool.submit(self._make, share))

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def _same_samples(a: GlobalBatch, b: GlobalBatch) -> bool:
    return all(
        np.array_equal(x, y) for x, y in ((a.epochs, b.epochs), (a.positions, b.positions), (a.indices, b.indices))
    )
