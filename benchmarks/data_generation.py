"""Data generation speed against the model that consumes it, side by side.

For each preset's data spec: examples/s of ``make_examples`` (one process, one
thread, as a trainer rank makes its own batches) and, on the same batch, the time
of one forward+backward of that preset's model on this machine's CPU. The ratio
says what fraction of a training step goes to making its data.

    python benchmarks/data_generation.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from dtrain.config import ExperimentConfig
from dtrain.data import TRAIN_STREAM, make_examples, mixture_spec
from dtrain.metrics import squared_error
from dtrain.model import build_model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(
        "| preset | points x dim | batch | generate (ms) | examples/s | model fwd+bwd on CPU (ms) "
        "| data share of step |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("tiny", "small", "medium"):
        config = ExperimentConfig.preset(name)
        spec, batch = mixture_spec(config.data), 32
        starts = iter(range(0, 10**9, batch))  # fresh indices each repeat
        gen = timed(lambda: make_examples(spec, 0, TRAIN_STREAM, next(starts) + np.arange(batch)), 20)
        model = build_model(config.model, config.data.dim)
        examples = make_examples(spec, 0, TRAIN_STREAM, np.arange(batch))

        def step():
            squared_error(model(examples["points"]), examples["targets"]).mean().backward()

        step()
        compute = timed(step, 3 if name == "medium" else 10)
        print(
            f"| {name} | {spec.points} x {spec.dim} | {batch} | {gen * 1e3:.2f} | {batch / gen:,.0f} | "
            f"{compute * 1e3:.1f} | {gen / (gen + compute):.1%} |"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
