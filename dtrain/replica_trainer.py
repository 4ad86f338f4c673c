"""The training loop of one replica group: each step is dealt over the step's quorum, and
counts only once torchft commits it (docs/fault-tolerance.md).

A step here:

1. join the quorum (dtrain/replicas.py); a group that is behind first takes the
   whole training state from a live peer (a heal): weights, AdamW, sampler,
   schedule and counters, so it deals the same global batches as the others;
2. take the next global batch and deal it: replica ``i`` of ``R`` its contiguous
   share, then the group's ranks theirs; each rank's loss is scaled so that the
   gradients summed over the group (FSDP2) and over the replicas (torchft) are
   the global batch's mean;
3. commit or not: a step torchft does not commit (a replica died in it) puts the
   sampler back, so the same global batch is dealt again over the next quorum.
   No sample is lost or repeated, whatever dies when.
"""

from __future__ import annotations

import hashlib
import math
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .dist import on_main
from .errors import ConfigError
from .replicas import FaultTolerance, ReplicaError, ReplicaGroup
from .trainer import Trainer

HEAL_FORMAT = 1
MAX_UNCOMMITTED = 20  # steps in a row; a failure costs one or two


class ReplicaTrainer(Trainer):
    def __init__(self, config, ctx, run, lease, ft: FaultTolerance):
        super().__init__(config, ctx, run, lease)
        self.ft = ft
        # torchft asks for the state from its quorum thread: keep the sharded parameters as they
        # are now, never what the module holds at call time (FSDP2 swaps in unsharded ones mid-step).
        self._shards = dict(self.model.named_parameters())
        self.replicas = ReplicaGroup(ft, ctx.device, self._heal_state, self._load_heal_state)
        self.replica_rank, self.num_replicas = ft.replica_id, 1  # until the first quorum
        self.uncommitted = 0  # steps dealt but not committed (a replica failed in them)
        self.healed_from: int | None = None  # the step this group was at before a heal
        self.left_alone = False  # stopped on a signal while the other replicas go on
        self._stop_asked = False
        self._leave: str | None = None  # "all" or "alone", decided one step after a signal
        self._uncommitted_in_a_row = 0
        self._start_fields: dict = {}  # of this group's start event; later heal events repeat them
        self._announced = True  # until fit() asks for the start event
        self._resumed_from: str | None = None  # the newest commit when this group resumed ("" for none)

    # ---- state that travels in a heal -------------------------------------------------------
    def _heal_state(self) -> dict:
        """This rank's shards and the group-wide counters, as plain tensors and numbers."""
        optimizer = {}
        for name, p in self._shards.items():
            optimizer[name] = {
                key: (value.to_local() if isinstance(value, DTensor) else value).detach()
                for key, value in self.optimizer.state.get(p, {}).items()
            }
        return {
            "format": HEAL_FORMAT,
            "group_world_size": self.ctx.world_size,
            "fingerprint": self.config.fingerprint(),
            "leg": self.leg,
            "model": {name: p.to_local().detach() for name, p in self._shards.items()},
            "optimizer": optimizer,
            "progress": self.counters.state_dict(),
            "sampler": self.sampler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "metrics": dict(self.metrics),
        }

    def _load_heal_state(self, state: dict) -> None:
        if state.get("format") != HEAL_FORMAT or state.get("fingerprint") != self.config.fingerprint():
            raise ConfigError(
                "a live replica group trains another configuration than this one; start every "
                "replica group of a job with the same options"
            )
        if state["group_world_size"] != self.ctx.world_size:
            raise ConfigError(
                f"a live replica group has {state['group_world_size']} ranks and this one "
                f"{self.ctx.world_size}; replica groups of one job must have the same size "
                "(their shards are exchanged rank by rank)"
            )
        with torch.no_grad():
            for name, p in self._shards.items():
                p.to_local().copy_(state["model"][name])
        # An evaluation leaves the root's parameters gathered (FSDP2 does not reshard the root after
        # a forward); the next forward would use that copy of the old weights. Drop it.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, p in self._shards.items():
            self.optimizer.state[p] = {
                key: (
                    DTensor.from_local(
                        value.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
                    if key != "step"
                    else value
                )
                for key, value in state["optimizer"][name].items()
            }
        self.healed_from = self.step
        self.counters.load_state_dict(state["progress"])
        self.sampler.load_state_dict(state["sampler"])
        self.schedule.load_state_dict(state["schedule"])
        self.metrics = dict(state["metrics"])

    # ---- the step -------------------------------------------------------------------------
    def restore(self, which: str = "latest"):
        manifest = super().restore(which)
        self.replicas.set_step(self.step)
        if which == "latest":  # checked at the first quorum: another group may commit meanwhile
            self._resumed_from = manifest.directory if manifest is not None else ""
        return manifest

    def _check_not_overtaken(self) -> None:
        """A group that resumed from the newest commit and met nobody ahead of it at its first quorum
        must not train a run that finished while it started: the groups that finished it are gone,
        and it would train the last steps again and end the run twice. (A newer commit that is not
        the end is left alone: going on from the older one rolls the steps after it back, as any
        start from a checkpoint does.)"""
        if self._resumed_from is None:
            return
        listing = on_main(self.ctx, self.checkpoints.catalog.scan)
        newest = listing.candidates("latest")
        if newest and newest[0].directory != self._resumed_from and "final" in newest[0].tags:
            raise ReplicaError(
                f"replica group {self.ft.replica_id} resumed from {self._resumed_from or 'no checkpoint'}, "
                f"but the run finished meanwhile ({newest[0].directory}); it stops without training "
                "(started again, it finds the run done)"
            )

    def train_step(self) -> torch.Tensor | None:
        ctx, train = self.ctx, self.config.train
        was_writer = self.writer
        self.replica_rank, self.num_replicas = self.replicas.start_step()
        if was_writer and not self.writer:
            self.checkpoints.wait()  # a returning lower replica writes from now on: finish ours first
        self._announce()  # before this group's first commit, which no other group can have made
        position = self.sampler.state_dict()
        batch = self.sampler.take(train.global_batch_size)
        ours = batch.deal(self.replica_rank, self.num_replicas)
        mine = ours.deal(ctx.rank, ctx.world_size)
        # The same number of micro-batches on every rank of the group (shares differ by one sample):
        # FSDP2's collectives must pair up.
        self.accumulation = max(1, math.ceil(math.ceil(len(ours) / ctx.world_size) / self.micro_batch))
        # FSDP2 averages over the group's W ranks, torchft sums over the replicas: G / W makes it the
        # global batch's mean gradient whatever the shares.
        loss_sum = self._forward_backward(self._micro_batches(mine), train.global_batch_size / ctx.world_size)
        stopping = torch.tensor([1.0 if self._stop_asked else 0.0], device=ctx.device)
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        self.replicas.sum_across([*grads, loss_sum.view(1), stopping])
        norm = self._gradient_norm()
        sound = self._agree_in_group(loss_sum, norm)
        if not self.replicas.commit() or not sound:
            self.sampler.load_state_dict(position)  # dealt again over the next quorum
            self.optimizer.zero_grad(set_to_none=True)
            self.uncommitted += 1
            self._uncommitted_in_a_row += 1
            if self._uncommitted_in_a_row >= MAX_UNCOMMITTED:
                raise ReplicaError(
                    f"{MAX_UNCOMMITTED} steps in a row were not committed (replica groups of different "
                    "sizes or options, or a network that drops the cross-group all-reduce); this group "
                    "stops: start every group with the same options and --nproc_per_node"
                )
            return None
        self._uncommitted_in_a_row = 0
        if self._stop_asked:  # every replica that was asked to stop said so in this step's sum
            self._leave = "all" if stopping.item() >= self.num_replicas else "alone"
        if self.config.data.record_indices and ctx.is_main:
            self.logs.write(
                f"samples/replica_{self.ft.replica_id}.jsonl",
                {
                    "step": self.step,
                    "time": time.time(),
                    "replica_id": self.ft.replica_id,
                    "replicas": self.num_replicas,
                    **batch.record(),
                },
            )
        self._apply(norm)
        return loss_sum

    def _agree_in_group(self, loss_sum: torch.Tensor, norm: torch.Tensor) -> bool:
        """One all-reduce over the group: is the step sound on every rank? A rank whose cross-group
        sum failed only fails the commit (its buffers are undefined, so the finiteness verdict
        waits for a step that sums); ranks at different steps mean a heal reached only some of
        them, which no later quorum can see: the group stops and starts again."""
        errored = self.replicas.manager.errored() is not None
        finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(norm))
        flags = torch.tensor(
            [0.0 if errored else 1.0, 1.0 if finite or errored else 0.0, float(self.step), -float(self.step)],
            dtype=torch.float64,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        summed, finite_everywhere, lowest, highest = flags[0].item(), flags[1].item(), flags[2].item(), -flags[3].item()
        if lowest != highest:
            raise ReplicaError(
                f"a heal reached only some ranks of replica group {self.ft.replica_id} (steps "
                f"{lowest:.0f} and {highest:.0f}); it stops without committing, start it again "
                "to heal the whole group"
            )
        if summed and not finite_everywhere:
            raise self._nonfinite_step(self.step, norm.item())
        return bool(summed)

    # ---- who writes what --------------------------------------------------------------------
    @property
    def writer(self) -> bool:
        """The lowest live replica writes the persistent checkpoints and the metrics."""
        return self.replica_rank == 0 and not self.left_alone

    def save(self, tags: list[str], blocking: bool) -> None:
        if self.writer:
            super().save(tags, blocking)

    def _log(self, kind: str, record: dict) -> None:
        if self.writer:
            super()._log(kind, {**record, "replicas": self.num_replicas})

    def _announce_start(self, fields: dict) -> None:
        # Written after the first quorum, when this group knows whether it healed: a start from a
        # checkpoint rolls back the steps after it, a heal does not (dtrain/report.py).
        self._start_fields, self._announced = {**fields, "replica_id": self.ft.replica_id}, False

    def _announce(self) -> None:
        """This group's start (from a checkpoint or a heal) once, and every later heal (a group that
        was frozen or cut off finds itself behind)."""
        if self._announced and self.healed_from is None:
            return
        fields, self._announced = self._start_fields, True
        step, healed_from, self.healed_from = self.step, self.healed_from, None
        if healed_from is not None:
            name, fields = "heal", {**fields, "from_step": healed_from}
        else:
            self._check_not_overtaken()
            name = "start" if step == 0 else "resume"
        on_main(
            self.ctx,
            lambda: self.run.event(
                name, step=step, leg=self.leg, samples_seen=self.samples_seen, replicas=self.num_replicas, **fields
            ),
        )

    def _end_fields(self) -> dict:
        return {
            "replica_id": self.ft.replica_id,
            "replicas": self.num_replicas,
            "uncommitted_steps": self.uncommitted,
            "weights_digest": self._weights_digest(),
        }

    def _weights_digest(self) -> str:
        """SHA-256 over the group's weights, rank by rank: equal across replica groups in sync."""
        local = hashlib.sha256()
        for name, p in sorted(self._shards.items()):
            local.update(name.encode())
            local.update(p.to_local().detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * self.ctx.world_size
        dist.all_gather_object(digests, local.hexdigest())
        return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]

    def _boundary(self, stop) -> str | None:
        # torchft's commit already waits for the host every step: the stop is agreed here, as before.
        return stop.agree(failed=self.logs.failure is not None)

    def _stop_now(self) -> bool:
        """A signalled group says so in the next step's sum; then it knows whether every replica
        stops (the writer saves, as a job without replicas does) or only this one (it leaves
        without a save: the others hold the state)."""
        self._stop_asked = True
        if self._leave is None:
            return False
        self.left_alone = self._leave == "alone"
        return True

    def fit(self, stop_at_step=None) -> dict:
        try:
            return super().fit(stop_at_step)
        finally:
            self.replicas.close()
