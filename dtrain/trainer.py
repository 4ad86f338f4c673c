"""The training loop: FSDP2 steps with accumulation, evaluation, metrics."""

from __future__ import annotations

import copy
import math
import time
import uuid

import numpy as np
import torch

from .config import ExperimentConfig
from .dist import DistContext, broadcast_from_main, on_every_rank, on_main
from .errors import TrainingDiverged
from .finite import diverged
from .metrics import squared_error
from .preempt import StopRequest
from .prefetch import Prefetcher, micro_batches
from .progress import Progress
from .rundir import RunDirectory
from .sampler import GlobalBatch
from .step_log import LossWindow
from .step_sums import StepSums
from .train_state import TrainState
from .validation import Validator, scores_line


def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-step randomness (dropout) derived from (seed, step, rank), never stored."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class Trainer(TrainState):
    """How a run trains: each step's batch, forward, backward and update; validation, logging,
    checkpoint cadence and the agreed stop (docs/how-it-works.md)."""

    def __init__(self, config: ExperimentConfig, ctx: DistContext, run: RunDirectory, lease=None):
        super().__init__(config, ctx, run, lease)
        self.stopped_by_signal: str | None = None
        self.leg = ""  # id of this start of the run: sample records of rolled-back steps are told apart by it
        self.startup: dict = {}  # wall-clock marks of this start (dtrain/startup.py), for its event
        self.validate = Validator(config, ctx)
        self.sums = StepSums(ctx.device, self._nonfinite_step)
        self.prefetch = Prefetcher(self._micro_batches)
        self.params = list(self.model.parameters())  # fixed after fully_shard
        self.prefetching = ctx.device.type == "cuda"  # on CPU the step's threads hold every core (docs/how-it-works.md)
        self.stop = StopRequest("")  # fit() installs the real one

    def _micro_batches(self, share: GlobalBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.ctx.device.type == "cuda"
        return micro_batches(self.spec, self.config.data, share.split(self.accumulation), pin)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step over the next global batch; returns this rank's loss sum."""
        ctx, train = self.ctx, self.config.train
        global_batch = self.sampler.take(train.global_batch_size)
        mine = global_batch.deal(ctx.rank, ctx.world_size)
        if self.config.data.record_indices:
            record = {"step": self.step, "leg": self.leg, "world_size": ctx.world_size, **mine.record()}
            self.logs.write(f"samples/rank_{ctx.rank}.jsonl", record)
        micro_batches = self.prefetch.take(mine)
        if self.prefetching:
            self.prefetch.start(copy.copy(self.sampler).take(train.global_batch_size).deal(ctx.rank, ctx.world_size))
        # FSDP averages over ranks; dividing by the rank's share makes it a global-batch mean.
        loss_sum = self._forward_backward(micro_batches, len(mine))
        grads = [p.grad for p in self.params if p.grad is not None]
        # The step's one small all-reduce; a non-finite step is skipped on the device, and the host
        # reads the sums a step later (dtrain/step_sums.py).
        norm, found_inf = self.sums.reduce(self.step, grads, loss_sum, self.stop.code(self.logs.failure is not None))
        self._apply(norm, found_inf)
        return loss_sum

    def _forward_backward(self, micro_batches: list, divisor: float) -> torch.Tensor:
        """Gradients of sum(loss over the micro-batches) / ``divisor`` at this step's learning rate."""
        ctx, train = self.ctx, self.config.train
        lr = self.schedule(self.samples_seen + train.global_batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.model.dropout:  # the only randomness of a step (about 0.1 ms: not without it)
            torch.manual_seed(step_seed(train.seed, self.step, ctx.rank))
        if not self.model.training:  # after an evaluation (a walk over every module: not each step)
            self.model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        for i, (points, targets) in enumerate(micro_batches):
            # Reduce-scatter gradients once per step, on the last micro-batch.
            if len(micro_batches) > 1:  # it walks every module: only when accumulating
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            predicted = self.model(points.to(ctx.device, non_blocking=True))
            per_example = squared_error(predicted, targets.to(ctx.device, non_blocking=True))
            (per_example.sum() / divisor).backward()
            loss_sum += per_example.detach().sum()
        return loss_sum

    def _gradient_norm(self) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _apply(self, norm: torch.Tensor, found_inf: torch.Tensor | None = None) -> None:
        """Clip, step the optimizer (no update where ``found_inf`` is set) and count the step."""
        train = self.config.train
        if train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, train.grad_clip, norm)
        self.checkpoints.wait_for_staging()  # a background save copies the state during fwd/bwd
        self.optimizer.found_inf = found_inf  # read by fused AdamW
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += train.global_batch_size

    def _nonfinite_step(self, after_step: int, norm: float) -> TrainingDiverged:
        return self._diverged(
            f"the loss or gradient norm ({norm:.3g}) of the step after step "
            f"{after_step} is not finite; that step was not applied"
        )

    def _boundary(self, stop: StopRequest) -> str | None:
        """What every rank agreed at this step boundary: "failure", "signal" or None."""
        self.sums.read(now=False)
        return stop.settle(self.sums.take_agreed())

    def save(self, tags: list[str], blocking: bool) -> None:
        self.sums.read(now=True)  # nothing after a non-finite step is saved
        started = time.perf_counter()
        super().save(tags, blocking)
        if self.logs.tensorboard is not None:
            self.logs.tensorboard.checkpoint(self.step, time.perf_counter() - started)

    def _diverged(self, what: str) -> TrainingDiverged:
        return diverged(what, self.checkpoints.last_committed, self.config.train.lr)

    def evaluate(self) -> dict:
        return self.validate(self.model)

    def _log(self, kind: str, record: dict) -> None:
        if self.ctx.is_main:
            self.logs.metric(kind, record)

    def fit(self, stop_at_step: int | None = None) -> dict:
        """Train to the planned end (or ``stop_at_step``), saving on the way.

        Returns the last validation metrics. A stop before the end saves a
        checkpoint like the end does, so the next start continues from it.
        """
        ctx, ck = self.ctx, self.config.checkpoint
        self.leg = broadcast_from_main(ctx, uuid.uuid4().hex[:12] if ctx.is_main else None)
        if self.config.metrics.tensorboard:  # rank 0's writer; its one-line error is every rank's
            on_main(ctx, lambda: self.logs.open_tensorboard(self.config.metrics.tensorboard_dir, self.step))
        self._announce_start({**self.describe(), "startup": self.startup})
        progress = Progress(self.total_steps, self.step, ctx.is_main)
        progress.message(f"{self.summary()}, {self.total_steps} steps, run {self.run.url}")
        # Handlers first: a signal during the first evaluation is honoured at the first boundary.
        self.stop = stop = StopRequest(ck.stop_signals if ck.save_on_signal else "", ck.grace_seconds)
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
            self.prefetch.close()
            self.logs.close()
            stop.close()
            self.logs.ship()  # whatever ended training; a failure here was already reported
        return self.metrics

    def _announce_start(self, fields: dict) -> None:
        fields = {"step": self.step, "leg": self.leg, "samples_seen": self.samples_seen, **fields}
        on_main(self.ctx, lambda: self.run.event("start" if self.step == 0 else "resume", **fields))

    def _loop(self, progress: Progress, stop: StopRequest, stop_at_step: int | None) -> None:
        """Steps until the end, ``stop_at_step`` or an agreed stop; then the last, synchronous save."""
        ctx, train = self.ctx, self.config.train
        self.checkpoints.start_clock()
        window = LossWindow(ctx.device)
        tags: list[str] = []
        agreed = None  # when the ranks agreed to stop on a signal
        while not self.finished:
            epoch_before = self.sampler.epoch
            started = time.perf_counter()
            loss = self.train_step()
            window.add(loss, time.perf_counter() - started)
            if loss is not None:  # None: a replica step that was not committed (dtrain/replica_trainer.py)
                self.checkpoints.poll()
                logging = self.step % train.log_interval == 0 or self.finished
                evaluating = bool(train.eval_interval and self.step % train.eval_interval == 0) or self.finished
                ending = self.finished or bool(stop_at_step and self.step >= stop_at_step)
                saving = not ending and self.checkpoints.due(self.step, epoch_before, self.sampler.epoch)
                if logging or evaluating or ending:
                    self.sums.read(now=True)  # where the host waits anyway; saves read them too
                record = None
                if logging:
                    record = self._train_record(*window.close(train.global_batch_size))
                    self._log("train", record)
                progress.step(record)
                tags = []
                if evaluating:
                    tags += self._evaluate_and_log(progress)
                if ending:
                    break
                if tags or saving:
                    self.save(tags, blocking=False)
            # After any evaluation or save, so a signal during them is honoured right here.
            verdict = self._boundary(stop)
            if verdict == "failure":
                on_every_rank(ctx, self.logs.raise_failure)  # every rank raises the failing rank's error
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
        self.logs.ship()
        on_every_rank(ctx, self.logs.raise_failure)  # a log line that could not be written: say so now
        fields = {"step": self.step, "samples_seen": self.samples_seen, **self.metrics, **self._end_fields()}
        if self.stopped_by_signal:
            fields.update(reason=self.stopped_by_signal, requested=stop.received_time, agreed=agreed)
        on_main(ctx, lambda: self.run.event("end" if self.finished else "stop", **fields))

    def _train_record(self, loss: float, samples_per_s: float) -> dict:
        at = {"step": self.step, "leg": self.leg, "epoch": self.sampler.epoch, "time": time.time()}
        lr = self.optimizer.param_groups[0]["lr"]
        return {**at, "samples_seen": self.samples_seen, "loss": loss, "lr": lr, "samples_per_s": samples_per_s}

    def _end_fields(self) -> dict:
        return {}

    def _stop_now(self) -> bool:
        """Whether an agreed signal stops this group at this boundary (replica groups first learn
        whether the others stop too)."""
        return True

    def _evaluate_and_log(self, progress: Progress) -> list[str]:
        """Validate, log, and return ["best"] when this is a new best worth saving."""
        started = time.perf_counter()
        with self.watchdog.not_counted():
            self.metrics = metrics = self.evaluate()
        if not math.isfinite(metrics["val_mse"]):  # every rank has the same all-reduced metrics
            raise self._diverged(f"validation MSE at step {self.step} is {metrics['val_mse']}")
        seconds = {"eval_s": time.perf_counter() - started}  # for goodput (dtrain/goodput.py)
        self._log("eval", {"step": self.step, "samples_seen": self.samples_seen, **metrics, **seconds})
        progress.message(f"step {self.step}: {scores_line(metrics)}")
        if self.step == 0 or not metrics["val_mse"] < self.counters.best["val_mse"]:
            return []
        self.counters.best = {"val_mse": metrics["val_mse"], "step": self.step}
        return ["best"] if self.config.checkpoint.save_best else []
