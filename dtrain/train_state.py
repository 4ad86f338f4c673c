"""What a run trains and checkpoints: the sharded model and optimizer, the sampler, the LR
schedule and the counters, with the checkpoint manager that saves and restores them
(docs/checkpoints.md). ``Trainer`` (dtrain/trainer.py) adds how they are trained."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .checkpoint import CheckpointManager, Manifest
from .checkpoint.state import Counters, ModelState, OptimizerState
from .config import ExperimentConfig, micro_batches
from .data import mixture_spec
from .dist import DistContext, on_every_rank, on_main
from .finite import nonfinite_state
from .model import build_model, count_parameters
from .parallel import resolve_precision, shard_model
from .resume import Position, plan_record, planned_samples, reconcile
from .rundir import RunDirectory
from .sampler import ElasticSampler
from .schedule import LRSchedule
from .step_log import StepLog
from .watchdog import StepWatchdog


class TrainState:
    def __init__(self, config: ExperimentConfig, ctx: DistContext, run: RunDirectory, lease=None):
        self.config, self.ctx, self.run = config, ctx, run
        train, data = config.train, config.data
        self.micro_batch, self.accumulation = micro_batches(config, ctx.world_size)
        self.precision = resolve_precision(train.precision, ctx.device)
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        model = build_model(config.model, data.dim)
        self.num_parameters = count_parameters(model)
        self.model = shard_model(model, ctx.mesh, self.precision)
        # Fused: it can skip a non-finite step on the device (found_inf; dtrain/step_sums.py).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True
        )
        self.sampler = ElasticSampler(data.train_samples, data.seed, data.mode)
        self.spec = mixture_spec(data)
        self.counters = Counters(plan=plan_record(config))  # step, samples seen, best, plan
        self.schedule = LRSchedule.from_config(train, self.planned_samples)
        self.metrics: dict = {}  # the latest validation metrics, recorded in each manifest
        self.logs = StepLog(run)  # log lines, and a storage failure agreed on at the step boundary
        ck = config.checkpoint
        # Counts while the loop runs; one rank has no peer to hang (nor should a debugger kill it).
        self.watchdog = StepWatchdog(train.step_timeout if ctx.world_size > 1 else 0, ctx.rank)
        self.checkpoints = CheckpointManager(
            run.catalog(ck.keep_last, ck.keep_every),
            ctx,
            ck,
            events=run.event if ctx.is_main else None,
            lease=lease,
            watchdog=self.watchdog,
        )

    def describe(self) -> dict:
        """Collective: the shape this start trains in, for its start or resume event."""
        ctx, counts = self.ctx, [None] * self.ctx.world_size
        dist.all_gather_object(counts, sum(p.to_local().numel() for p in self.model.parameters()))
        shape = {
            "world_size": ctx.world_size,
            "global_batch_size": self.config.train.global_batch_size,
            "micro_batch_size": self.micro_batch,
            "accumulation": self.accumulation,
        }
        return {
            **shape,
            "device": str(ctx.device),
            "backend": ctx.backend,
            "precision": self.precision,
            "parameters": self.num_parameters,
            "parameters_per_rank": counts,
            "torch": torch.__version__,
        }

    def summary(self) -> str:
        ctx, batch = self.ctx, self.config.train.global_batch_size
        return (
            f"training {self.num_parameters:,} parameters on {ctx.world_size} rank(s) ({ctx.device.type}, "
            f"{self.precision}), global batch {batch} = {ctx.world_size} x {self.micro_batch} x {self.accumulation}"
        )

    @property
    def step(self) -> int:
        return self.counters.step

    @step.setter
    def step(self, value: int) -> None:
        self.counters.step = value

    @property
    def samples_seen(self) -> int:
        return self.counters.samples_seen

    @samples_seen.setter
    def samples_seen(self, value: int) -> None:
        self.counters.samples_seen = value

    @property
    def planned_samples(self) -> int:
        """Samples seen when training ends, counted from the current point."""
        return planned_samples(self.config.train, self.step, self.samples_seen, self.sampler)

    @property
    def total_steps(self) -> int:
        return self.step + math.ceil(
            max(self.planned_samples - self.samples_seen, 0) / self.config.train.global_batch_size
        )

    @property
    def finished(self) -> bool:
        train = self.config.train
        return self.step >= train.max_steps if train.max_steps else self.sampler.epoch >= train.num_epochs

    def state(self) -> dict:
        """The components a checkpoint holds, each a DCP ``Stateful`` (checkpoint/state.py)."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "progress": self.counters,
            "sampler": self.sampler,
            "schedule": self.schedule,
        }

    def restore(self, which: str = "latest") -> Manifest | None:
        """Load the newest sound committed checkpoint for ``which``; None if there is none."""
        manifest = self.checkpoints.load(self.state(), which, check=lambda: nonfinite_state(self.model, self.optimizer))
        if manifest is not None:
            self.metrics = dict(manifest.metrics)
            c = self.counters
            position, changes = reconcile(
                self.config, Position(c.step, c.samples_seen, self.sampler, self.schedule, c.best, c.plan)
            )
            self.sampler, self.schedule, c.best = position.sampler, position.schedule, position.best
            c.plan = plan_record(self.config)  # what later saves record

            def announce() -> None:
                for change in changes:
                    print(f"dtrain: {change.message}", flush=True)
                    self.run.event(change.event, step=self.step, **change.fields)

            on_main(self.ctx, announce)
        return manifest

    def save(self, tags: list[str], blocking: bool) -> None:
        info = {
            "progress": {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "epoch": self.sampler.epoch,
                "samples_in_epoch": self.sampler.samples_in_epoch,
            },
            "world_size": self.ctx.world_size,
            "global_batch_size": self.config.train.global_batch_size,
            "micro_batch_size": self.micro_batch,
            "config_fingerprint": self.config.fingerprint(),
            "config": self.config.to_dict(),
            "metrics": self.metrics,
        }
        with self.watchdog.not_counted():
            self.checkpoints.save(self.state(), self.step, tags, info, blocking=blocking)
            # Object stores: every rank's log lines up to this checkpoint (dtrain/rundir.py), ending
            # in a collective, so that ranks wait for the slowest one here, where it is not counted.
            on_every_rank(self.ctx, self.logs.ship)
