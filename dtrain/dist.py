"""Process-group setup and teardown: backend and device chosen from the hardware.

Under torchrun the group comes from the environment (``env://``); run as a plain
``python -m dtrain.train`` it is a one-rank group on an in-memory store, so the
single-process path is the same FSDP2 code as the multi-rank one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .errors import KINDS, ConfigError, DtrainError
from .heartbeat import PeerHeartbeat


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: DeviceMesh
    owns_group: bool  # we created the group, so we tear it down
    heartbeat: PeerHeartbeat | None = None  # watches the next rank while the group lives

    def watch_peers(self, timeout_s: float) -> None:
        """Exit when the next rank goes silent for ``timeout_s`` (dtrain/heartbeat.py); the group
        must be ours, since the watching ends only with ``shutdown``."""
        if self.owns_group and self.heartbeat is None:
            self.heartbeat = PeerHeartbeat.for_job(self.rank, self.world_size, timeout_s)

    def stop_watching(self) -> None:
        """No collective: safe on a failure path too."""
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_preference: str = "auto", timeout_s: float = 600) -> DistContext:
    device = choose_device(device_preference)
    # nccl for the GPU collectives, gloo beside it for CPU work such as async checkpointing.
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "TORCHELASTIC_RESTART_COUNT" in os.environ:
            # Under torchrun, each restart of the group gets its own keys on the agent's store:
            # seen here, a restarted rank read a gloo address left by a killed one and hung.
            # One agent only: a newly started agent counts restarts from 0, so jobs across nodes
            # run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and take the next branch (docs/elastic.md).
            store = dist.PrefixStore(
                f"dtrain/restart_{os.environ['TORCHELASTIC_RESTART_COUNT']}/",
                dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    int(os.environ["WORLD_SIZE"]),
                    is_master=False,
                    timeout=timeout,
                ),
            )
            dist.init_process_group(
                backend,
                store=store,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timeout,
            )
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistContext(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device, backend, mesh, owns_group
    )


def shutdown(ctx: DistContext) -> None:
    """Orderly teardown after success: a barrier first, so no gloo thread outlives Python.

    (Destroying without the barrier lets a gloo worker free tensors during
    interpreter shutdown, which aborts the process; see docs/design.md, "Shutdown".)
    On a failure path do not call this: peers may be gone and a barrier would hang.
    """
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        ctx.stop_watching()  # after the barrier: a peer still at work is still watched
        dist.destroy_process_group()


def broadcast_from_main(ctx: DistContext, value):
    """Rank 0's ``value`` on every rank (for decisions only rank 0 may take)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_agreed(outcome) -> None:
    if outcome is not None:
        kind, message = outcome
        raise KINDS.get(kind, DtrainError)(message)


def _attempt(fn) -> tuple:
    """``(fn(), None)``, or ``(None, (kind, message))`` for an expected failure (``DtrainError``)."""
    try:
        return fn(), None
    except DtrainError as error:
        return None, (type(error).__name__, str(error))


def on_main(ctx: DistContext, fn):
    """``fn()`` on rank 0 only (a write only rank 0 makes); its result on every rank.

    An expected failure (``DtrainError``) on rank 0 is raised on every rank, so all
    of them stop at the same point instead of waiting for rank 0 in a collective.
    """
    result, outcome = broadcast_from_main(ctx, _attempt(fn) if ctx.is_main else (None, None))
    _raise_agreed(outcome)
    return result


def on_every_rank(ctx: DistContext, fn) -> list:
    """``fn()`` on every rank; every rank's result, gathered. An expected failure on
    any rank is raised on all of them (the lowest failing rank's message)."""
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, _attempt(fn))
    _raise_agreed(next((o for _, o in gathered if o is not None), None))
    return [r for r, _ in gathered]


def gather_on_main(ctx: DistContext, fn) -> list | None:
    """``fn()`` on every rank; every rank's result on rank 0 (None elsewhere). An expected
    failure on any rank is raised on all of them, as ``on_every_rank`` does, but the
    results travel to rank 0 alone: N shares, not N x N (benchmarks/scale_sim.py)."""
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(_attempt(fn), gathered, dst=0)
    failed = next((o for _, o in gathered if o is not None), None) if ctx.is_main else None
    _raise_agreed(broadcast_from_main(ctx, failed))
    return [r for r, _ in gathered] if ctx.is_main else None
