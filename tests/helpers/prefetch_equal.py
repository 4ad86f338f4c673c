"""Run in one process: the same 7 steps of the tiny preset with and without examples made ahead
(forced on, as on a GPU); prints whether the weights, AdamW's state and the sampler's position
are bitwise equal, and whether a peek ever moved the sampler."""

import sys

import torch

from dtrain.config import ExperimentConfig
from dtrain.dist import init_distributed
from dtrain.rundir import RunDirectory
from dtrain.train import exit_now
from dtrain.trainer import Trainer

ctx = init_distributed("cpu")
results = {}
for prefetching in (False, True):
    config = ExperimentConfig.preset("tiny")
    config.train.micro_batch_size = 8  # two micro-batches a step
    trainer = Trainer(config, ctx, RunDirectory(f"{sys.argv[1]}/{prefetching}"))
    trainer.prefetching = prefetching
    positions = []
    for _ in range(7):
        trainer.train_step()
        positions.append(trainer.sampler.state_dict())
    trainer.sums.read(now=True)
    trainer.prefetch.close()
    state = [p.detach().full_tensor() for p in trainer.model.parameters()]
    state += [
        v.full_tensor() if hasattr(v, "full_tensor") else v
        for s in trainer.optimizer.state.values()
        for v in s.values()
    ]
    results[prefetching] = (state, positions)
(a, pa), (b, pb) = results[False], results[True]
print("equal" if all(torch.equal(x, y) for x, y in zip(a, b)) and pa == pb else "DIFFERENT", flush=True)
exit_now(0)
