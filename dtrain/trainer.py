"""The training loop: FSDP2 steps with accumulation, evaluation, metrics."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointManager, Manifest
from .checkpoint.state import Counters, ModelState, OptimizerState
from .config import ExperimentConfig, micro_batches
from .data import make_examples, mixture_spec, train_streams
from .dist import DistContext, broadcast_from_main, on_every_rank, on_main
from .errors import DtrainError, TrainingDiverged
from .metrics import squared_error
from .model import build_model, count_parameters
from .parallel import resolve_precision, shard_model
from .preempt import StopRequest
from .progress import Progress
from .resume import Position, plan_record, planned_samples, reconcile
from .rundir import METRICS, RunDirectory
from .sampler import ElasticSampler, GlobalBatch
from .schedule import LRSchedule
from .validation import baseline_sums, prediction_sums, rank_share, validation_examples
from .watchdog import StepWatchdog


def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-step randomness (dropout) derived from (seed, step, rank), never stored."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class Trainer:
    def __init__(self, config: ExperimentConfig, ctx: DistContext, run: RunDirectory, lease=None):
        self.config, self.ctx, self.run = config, ctx, run
        train, data = config.train, config.data
        self.micro_batch, self.accumulation = micro_batches(config, ctx.world_size)
        self.precision = resolve_precision(train.precision, ctx.device)
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        model = build_model(config.model, data.dim)
        self.num_parameters = count_parameters(model)
        self.model = shard_model(model, ctx.mesh, self.precision)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.sampler = ElasticSampler(data.train_samples, data.seed, data.mode)
        self.spec = mixture_spec(data)
        self.counters = Counters(plan=plan_record(config))  # step, samples seen, best, plan
        self.schedule = LRSchedule.from_config(train, self.planned_samples)
        self.stopped_by_signal: str | None = None
        self.leg = ""  # id of this start of the run: sample records of rolled-back steps are told apart by it
        self.metrics: dict = {}  # the latest validation metrics
        self.startup: dict = {}  # wall-clock marks of this start (dtrain/startup.py), for its event
        self._validation = None
        self._failure: DtrainError | None = None  # a storage failure of this rank, agreed at the boundary
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

    # ---- checkpoints -----------------------------------------------------------------------
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
        manifest = self.checkpoints.load(self.state(), which, check=self._nonfinite_state)
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

    def _nonfinite_state(self) -> list[str]:
        """This rank's shards of the model and optimizer state that hold NaN or inf."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p.to_local()).all()]
        for state in self.optimizer.state.values():
            bad += [
                f"optimizer {key}"
                for key, value in state.items()
                if torch.is_tensor(value)
                and value.is_floating_point()
                and not torch.isfinite(value.to_local() if hasattr(value, "to_local") else value).all()
            ]
        return [f"non-finite values in {', '.join(sorted(set(bad))[:3])}"] if bad else []

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
            on_every_rank(self.ctx, self._ship_logs)

    def _examples(self, batch: GlobalBatch) -> dict[str, torch.Tensor]:
        streams = train_streams(self.config.data.mode, batch.epochs)
        return make_examples(self.spec, self.config.data.seed, streams, batch.indices)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step over the next global batch; returns this rank's loss sum."""
        ctx, train = self.ctx, self.config.train
        global_batch = self.sampler.take(train.global_batch_size)
        mine = global_batch.deal(ctx.rank, ctx.world_size)
        if self.config.data.record_indices:
            self._write(
                f"samples/rank_{ctx.rank}.jsonl",
                {
                    "step": self.step,
                    "leg": self.leg,
                    "world_size": ctx.world_size,
                    "epochs": mine.epochs.tolist(),
                    "positions": mine.positions.tolist(),
                    "indices": mine.indices.tolist(),
                },
            )
        # FSDP averages over ranks; dividing by the rank's share makes it a global-batch mean.
        loss_sum = self._forward_backward(mine, len(mine))
        norm = self._gradient_norm()
        self._check_finite(loss_sum, norm)  # before the update: a non-finite step is never applied
        self._apply(norm)
        return loss_sum

    def _forward_backward(self, mine: GlobalBatch, divisor: float) -> torch.Tensor:
        """Gradients of sum(loss over ``mine``) / ``divisor`` at this step's learning rate."""
        ctx, train = self.ctx, self.config.train
        lr = self.schedule(self.samples_seen + train.global_batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(train.seed, self.step, ctx.rank))
        self.model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        for i, micro in enumerate(mine.split(self.accumulation)):
            # Reduce-scatter gradients once per step, on the last micro-batch.
            self.model.set_requires_gradient_sync(i == self.accumulation - 1)
            examples = self._examples(micro)
            predicted = self.model(examples["points"].to(ctx.device))
            per_example = squared_error(predicted, examples["targets"].to(ctx.device))
            (per_example.sum() / divisor).backward()
            loss_sum += per_example.detach().sum()
        return loss_sum

    def _gradient_norm(self) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _apply(self, norm: torch.Tensor) -> None:
        """Clip, step the optimizer and count the step."""
        train = self.config.train
        if train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(list(self.model.parameters()), train.grad_clip, norm)
        self.checkpoints.wait_for_staging()  # a background save copies the state during fwd/bwd
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += train.global_batch_size

    def _check_finite(self, loss_sum: torch.Tensor, norm: torch.Tensor) -> None:
        """Stop every rank if any rank's loss, or the global gradient norm, is not finite."""
        finite = torch.tensor([float(bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(norm)))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise self._nonfinite_step(norm)

    def _nonfinite_step(self, norm: torch.Tensor) -> TrainingDiverged:
        return self._diverged(
            f"the loss or gradient norm ({norm.item():.3g}) of the step after step "
            f"{self.step} is not finite; that step was not applied"
        )

    def _diverged(self, what: str) -> TrainingDiverged:
        last = self.checkpoints.last_committed
        where = (
            f"resume from {last} with a lower --train.lr (now {self.config.train.lr:g}), e.g. "
            f"--resume {last.split('_')[1].lstrip('0') or '0'} --train.lr={self.config.train.lr / 10:g}"
            if last
            else f"start again in a new --run-dir with a lower --train.lr (now "
            f"{self.config.train.lr:g}), e.g. --train.lr={self.config.train.lr / 10:g}"
        )
        return TrainingDiverged(f"training diverged: {what}; nothing non-finite was saved; {where}")

    def _write(self, name: str, record: dict) -> None:
        """Append a log line; a storage failure is kept and agreed on at the step boundary."""
        if self._failure is None:
            try:
                self.run.append_jsonl(name, record)
            except DtrainError as error:
                self._failure = error

    def _ship_logs(self) -> None:
        try:
            self.run.ship()
        except DtrainError as error:
            self._failure = self._failure or error

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _validation_share(self):
        """This rank's share of the validation set (validation.rank_share) and its baselines, once."""
        if self._validation is None:
            indices, weight = rank_share(self.config.data.val_samples, self.ctx.rank, self.ctx.world_size)
            examples = validation_examples(self.config.data, indices)
            real = int(weight.sum())
            baselines = baseline_sums({k: v[:real] for k, v in examples.items()}, seeds=indices[:real])
            self._validation = examples, weight, baselines
        return self._validation

    @torch.no_grad()
    def evaluate(self) -> dict:
        examples, weight, baselines = self._validation_share()
        self.model.eval()
        sums = prediction_sums(
            lambda points: self.model(points.to(self.ctx.device)), examples, self.config.train.eval_batch_size, weight
        )
        totals = torch.tensor([sums["mse"], sums["wasserstein"], *baselines.values()], dtype=torch.float64)
        dist.all_reduce(totals)  # gloo or the CPU side of the cuda group
        mse, w2, *rest = (totals / self.config.data.val_samples).tolist()
        return {"val_mse": mse, "val_wasserstein": w2, **dict(zip(baselines, rest))}

    def _parameters_per_rank(self) -> list[int]:
        local = sum(p.to_local().numel() for p in self.model.parameters())
        counts = [None] * self.ctx.world_size
        dist.all_gather_object(counts, local)
        return counts

    def _log(self, kind: str, record: dict) -> None:
        if self.ctx.is_main:
            self._write(METRICS, {"kind": kind, **record})

    def fit(self, stop_at_step: int | None = None) -> dict:
        """Train to the planned end (or ``stop_at_step``), saving on the way.

        Returns the last validation metrics. A stop before the end saves a
        checkpoint like the end does, so the next start continues from it.
        """
        ctx, train, ck = self.ctx, self.config.train, self.config.checkpoint
        per_rank = self._parameters_per_rank()
        self.leg = broadcast_from_main(ctx, uuid.uuid4().hex[:12] if ctx.is_main else None)
        self._announce_start(
            dict(
                world_size=ctx.world_size,
                global_batch_size=train.global_batch_size,
                micro_batch_size=self.micro_batch,
                accumulation=self.accumulation,
                device=str(ctx.device),
                backend=ctx.backend,
                precision=self.precision,
                parameters=self.num_parameters,
                parameters_per_rank=per_rank,
                torch=torch.__version__,
                startup=self.startup,
            )
        )
        progress = Progress(self.total_steps, self.step, ctx.is_main)
        progress.message(
            f"training {self.num_parameters:,} parameters on {ctx.world_size} "
            f"rank(s) ({ctx.device.type}, {self.precision}), global batch "
            f"{train.global_batch_size} = {ctx.world_size} x {self.micro_batch} x "
            f"{self.accumulation}, {self.total_steps} steps, run {self.run.url}"
        )
        # Handlers first: a signal during the first evaluation is honoured at the first boundary.
        stop = StopRequest(ck.stop_signals if ck.save_on_signal else "", ck.grace_seconds)
        try:
            if self.step == 0:
                self._evaluate_and_log(progress)
            self.watchdog.start()
            self._loop(progress, stop, stop_at_step)
        except TrainingDiverged as error:
            message = str(error)
            progress.close()
            self.checkpoints.close()  # a save in flight holds an earlier, finite state: commit it
            on_main(ctx, lambda: self.run.event("diverged", step=self.step, error=message))
            raise
        finally:
            self.watchdog.close()
            stop.close()
            self._ship_logs()  # whatever ended training; a failure here was already reported
        return self.metrics

    def _announce_start(self, fields: dict) -> None:
        on_main(
            self.ctx,
            lambda: self.run.event(
                "start" if self.step == 0 else "resume",
                step=self.step,
                leg=self.leg,
                samples_seen=self.samples_seen,
                **fields,
            ),
        )

    def _loop(self, progress: Progress, stop: StopRequest, stop_at_step: int | None) -> None:
        """Steps until the end, ``stop_at_step`` or an agreed stop; then the last, synchronous save."""
        ctx, train = self.ctx, self.config.train
        self.checkpoints.start_clock()
        window_loss = torch.zeros((), device=ctx.device)
        window_steps, window_busy = 0, 0.0  # throughput counts step time, not evaluation or saving
        tags: list[str] = []
        agreed = None  # when the ranks agreed to stop on a signal
        while not self.finished:
            epoch_before = self.sampler.epoch
            started = time.perf_counter()
            loss = self.train_step()
            window_busy += time.perf_counter() - started
            if loss is not None:  # None: a replica step that was not committed (dtrain/replica_trainer.py)
                window_loss += loss
                window_steps += 1
                self.checkpoints.poll()
                record = None
                if self.step % train.log_interval == 0 or self.finished:
                    dist.all_reduce(window_loss)
                    record = {
                        "step": self.step,
                        "leg": self.leg,
                        "epoch": self.sampler.epoch,
                        "time": time.time(),
                        "samples_seen": self.samples_seen,
                        "loss": window_loss.item() / (window_steps * train.global_batch_size),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "samples_per_s": window_steps * train.global_batch_size / window_busy,
                    }
                    self._log("train", record)
                    window_loss.zero_()
                    window_steps, window_busy = 0, 0.0
                progress.step(record)
                tags = []
                if (train.eval_interval and self.step % train.eval_interval == 0) or self.finished:
                    tags += self._evaluate_and_log(progress)
                if self.finished or (stop_at_step and self.step >= stop_at_step):
                    break
                if tags or self.checkpoints.due(self.step, epoch_before, self.sampler.epoch):
                    self.save(tags, blocking=False)
            # After any evaluation or save, so a signal during them is honoured right here.
            verdict = stop.agree(failed=self._failure is not None)
            if verdict == "failure":
                on_every_rank(ctx, self._raise_failure)  # every rank raises the failing rank's error
            if verdict == "signal" and self._stop_now():
                self.stopped_by_signal = stop.received or stop.agreed_reason or "a signal to another rank"
                agreed = time.time()
                break
            self.watchdog.beat()
        self.watchdog.close()  # the last save is not a step
        progress.close()
        if self.finished:
            tags = tags + ["final"]
        elif self.stopped_by_signal:
            tags = tags + ["preempted"]
        if self.checkpoints.last_saved_step != self.step:
            self.save(tags, blocking=True)  # synchronous: the process is about to end
        self.checkpoints.close()
        self._ship_logs()
        on_every_rank(ctx, self._raise_failure)  # a log line that could not be written: say so now
        reason = (
            {"reason": self.stopped_by_signal, "requested": stop.received_time, "agreed": agreed}
            if self.stopped_by_signal
            else {}
        )
        fields = self._end_fields()  # collective where it gathers from every rank
        on_main(
            ctx,
            lambda: self.run.event(
                "end" if self.finished else "stop",
                step=self.step,
                samples_seen=self.samples_seen,
                **reason,
                **self.metrics,
                **fields,
            ),
        )

    def _end_fields(self) -> dict:
        return {}

    def _stop_now(self) -> bool:
        """Whether an agreed signal stops this group at this boundary (replica groups first learn
        whether the others stop too)."""
        return True

    def _evaluate_and_log(self, progress: Progress) -> list[str]:
        """Validate, log, and return ["best"] when this is a new best worth saving."""
        with self.watchdog.not_counted():
            self.metrics = metrics = self.evaluate()
        if not math.isfinite(metrics["val_mse"]):  # every rank has the same all-reduced metrics
            raise self._diverged(f"validation MSE at step {self.step} is {metrics['val_mse']}")
        self._log("eval", {"step": self.step, "samples_seen": self.samples_seen, **metrics})
        progress.message(
            f"step {self.step}: val mse {metrics['val_mse']:.4f} "
            f"(k-means {metrics['kmeans_mse']:.4f}, set mean {metrics['trivial_mse']:.4f}), "
            f"wasserstein {metrics['val_wasserstein']:.4f} "
            f"(k-means {metrics['kmeans_wasserstein']:.4f})"
        )
        if self.step == 0 or not metrics["val_mse"] < self.counters.best["val_mse"]:
            return []
        self.counters.best = {"val_mse": metrics["val_mse"], "step": self.step}
        return ["best"] if self.config.checkpoint.save_best else []
