"""The elastic sampler: one global order per epoch, dealt out per optimizer step.

Epoch ``e`` visits positions ``0..n-1`` in the order of a keyed bijection of
``[0, n)`` seeded by ``(seed, e)``. A step takes the next ``G`` positions of the
stream (crossing into the next epoch when one runs out), and each rank takes its
contiguous share. The state is two integers plus the dataset identity, so the
sampler can jump to any position in O(1) and resume on any world size or global
batch without replaying anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A random permutation of ``[0, n)`` evaluated pointwise, without a table.

    A balanced Feistel network is a bijection on ``2^(2h)`` values; cycle-walking
    (re-applying it until the value falls below ``n``) restricts it to ``[0, n)``.
    The domain is under ``4n``, so few walks are needed.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._low = np.uint64((1 << self._half) - 1)
        self._keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._low
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._low)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} is outside an epoch of {self.n}")
        with np.errstate(over="ignore"):
            x = self._feistel(x)
            outside = x >= np.uint64(self.n)
            while outside.any():
                x[outside] = self._feistel(x[outside])
                outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


@dataclass
class GlobalBatch:
    """The samples of one optimizer step, in global order."""

    epochs: np.ndarray  # epoch of each sample
    positions: np.ndarray  # position within its epoch's order
    indices: np.ndarray  # dataset index (fixed mode) or position (dynamic mode)

    def __len__(self) -> int:
        return len(self.positions)

    def deal(self, part: int, parts: int) -> GlobalBatch:
        """Part ``part`` of ``parts`` contiguous shares as even as can be (sizes differ by at most
        one): a step's batch over the ranks (equal: the config makes the world size divide it), or
        over the replicas of a step's quorum, then a group's ranks."""
        part_slice = slice(len(self) * part // parts, len(self) * (part + 1) // parts)
        return GlobalBatch(self.epochs[part_slice], self.positions[part_slice], self.indices[part_slice])

    def record(self) -> dict:
        """The samples as a log line's fields (``--data.record_indices``, read by ``dtrain report``)."""
        return {"epochs": self.epochs.tolist(), "positions": self.positions.tolist(), "indices": self.indices.tolist()}

    def split(self, parts: int) -> list[GlobalBatch]:
        """Consecutive pieces (micro-batches of an accumulation), equal when ``parts`` divides."""
        return [self.deal(i, parts) for i in range(parts)]


class ElasticSampler:
    """Deals global batches from the epoch orders and remembers where it is.

    ``epoch_length`` is the length of the current epoch; ``train_samples`` that of
    the epochs to come. They differ only after a resize that waits for the epoch
    to end, so the current epoch is always one permutation, consumed exactly once.
    """

    def __init__(self, train_samples: int, seed: int, mode: str = "fixed"):
        if mode not in ("fixed", "dynamic"):
            raise ValueError(f"unknown data mode {mode!r}")
        self.train_samples = self.epoch_length = train_samples
        self.seed = seed
        self.mode = mode
        self.epoch = 0
        self.samples_in_epoch = 0
        self._permutation = None

    def _order(self, epoch: int) -> IndexPermutation:
        key = (epoch, self.epoch_length, self.seed)
        if self._permutation is None or self._permutation[0] != key:
            self._permutation = (key, IndexPermutation(self.epoch_length, self.seed, epoch))
        return self._permutation[1]

    def _next_epoch(self) -> None:
        self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        self.epoch_length = self.train_samples

    def take(self, count: int) -> GlobalBatch:
        """The next ``count`` samples of the stream; advances the state past them."""
        epochs, positions, indices = [], [], []
        while count > 0:
            chunk = min(count, self.epoch_length - self.samples_in_epoch)
            pos = np.arange(self.samples_in_epoch, self.samples_in_epoch + chunk, dtype=np.int64)
            epochs.append(np.full(chunk, self.epoch, dtype=np.int64))
            positions.append(pos)
            indices.append(self._order(self.epoch)(pos) if self.mode == "fixed" else pos)
            count -= chunk
            self.samples_in_epoch += chunk
            if self.samples_in_epoch == self.epoch_length:
                self._next_epoch()
        return GlobalBatch(np.concatenate(epochs), np.concatenate(positions), np.concatenate(indices))

    def end_epoch_now(self) -> None:
        """Close the current epoch where it stands (if it has begun); the next one starts fresh."""
        if self.samples_in_epoch:
            self._next_epoch()
        else:
            self.epoch_length = self.train_samples

    def resize(self, train_samples: int, now: bool = False) -> None:
        """Change the epoch length: from the next epoch, or (``now``) by ending this one here."""
        self.train_samples = train_samples
        if now or self.samples_in_epoch == 0:
            self.end_epoch_now()

    def reidentify(self, seed: int, mode: str) -> None:
        """A new order (seed) or generation mode, from a fresh epoch that starts now."""
        self.seed, self.mode = seed, mode
        self.end_epoch_now()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "epoch_length": self.epoch_length,
            "train_samples": self.train_samples,
            "seed": self.seed,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict) -> None:
        """Take the saved position and dataset identity as they are; the trainer
        decides afterwards whether the configuration may change them."""
        self.epoch, self.samples_in_epoch = int(state["epoch"]), int(state["samples_in_epoch"])
        self.epoch_length, self.train_samples = int(state["epoch_length"]), int(state["train_samples"])
        self.seed, self.mode = int(state["seed"]), str(state["mode"])
