"""Saving, committing, retaining and choosing checkpoints under ``RUN/checkpoints/``.

Every save goes to a new ``step_NNNNNNNN`` directory (DCP must never write over
an existing checkpoint). It counts only once rank 0 has written its manifest,
after DCP's ``.metadata`` exists and every file's checksum is known. Retention
runs only after a commit, and never removes the newest or the best checkpoint.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..dist import DistContext, broadcast_from_main
from .catalog import CheckpointCatalog
from .manifest import Manifest, checksum_files, data_files, find_problems
from .storage import reader, writer


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required; the message says what to do."""


@dataclass
class PendingSave:
    name: str
    step: int
    tags: list[str]
    info: dict  # manifest fields the trainer knows: progress, batch sizes, metrics, ...
    started: float
    blocked_s: float
    mode: str
    checksums: Future  # this rank's {file: {size, sha256}}, once DCP's write is done


class CheckpointManager:
    def __init__(self, url: str, ctx: DistContext, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = False, verify: bool = True, endpoint_url: str = "",
                 events=None):
        self.catalog = CheckpointCatalog(url, endpoint_url, keep_last, keep_every)
        self.url, self.fs, self.root = self.catalog.url, self.catalog.fs, self.catalog.root
        self.ctx = ctx
        self.async_save, self.verify, self.endpoint_url = async_save, verify, endpoint_url
        self.events = events  # callable(kind, **fields) on rank 0, or None
        self._pending: PendingSave | None = None
        self.last_blocked_s = 0.0
        self.last_directory = ""  # of the newest save this manager made
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtrain-checksum")
        # Background saves get their own gloo group: sharing the training group with
        # FSDP's collectives hung or aborted with "collective mismatch" (DCP-NOTES.md).
        self._save_group = dist.new_group(backend="gloo") if async_save else None

    # ---- saving ----------------------------------------------------------------------------
    def save(self, state: dict, step: int, tags: list[str], info: dict, blocking: bool = False) -> None:
        """Start a save of ``state`` (collective); it is committed by ``poll``/``wait``.

        With ``async_save`` and not ``blocking``, DCP stages the state and writes it
        in the background; otherwise the save is written and committed before returning.
        """
        self.wait()  # at most one save in flight
        name = broadcast_from_main(self.ctx, self.catalog.new_directory(step) if self.ctx.is_main else None)
        url = f"{self.url}/{name}"
        self.last_directory = name
        started = time.perf_counter()
        background = self.async_save and not blocking
        if background:
            future = dcp.async_save(state, storage_writer=writer(url, self.endpoint_url),
                                    process_group=self._save_group)
        else:
            dcp.save(state, storage_writer=writer(url, self.endpoint_url))
            future = Future()
            future.set_result(None)
        blocked = self.last_blocked_s = time.perf_counter() - started
        checksums = self._background.submit(self._checksum_my_share, future, name)
        self._pending = PendingSave(name, step, list(tags), info, started, blocked,
                                    "async" if background else "sync", checksums)
        if not background:
            self.wait()

    def _checksum_my_share(self, future: Future, name: str) -> dict:
        """After DCP's write (every rank's, since DCP's finish is collective), hash 1/W of the files."""
        future.result()
        directory = f"{self.root}/{name}"
        self.fs.invalidate_cache()
        names = data_files(self.fs, directory)
        return checksum_files(self.fs, directory, names[self.ctx.rank :: self.ctx.world_size])

    def poll(self) -> None:
        """Commit the save in flight if every rank has finished it (collective, cheap)."""
        if self._pending is None:
            return
        done = torch.tensor([1 if self._pending.checksums.done() else 0])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self._commit()

    def wait(self) -> None:
        """Block until the save in flight is written, then commit it (collective)."""
        if self._pending is not None:
            self._pending.checksums.result()
            self._commit()

    def _commit(self) -> None:
        pending, self._pending = self._pending, None
        shares = [None] * self.ctx.world_size
        dist.all_gather_object(shares, pending.checksums.result())
        if not self.ctx.is_main:
            return
        files = {name: entry for share in shares for name, entry in share.items()}
        total_s = time.perf_counter() - pending.started
        manifest = Manifest(step=pending.step, tags=pending.tags, files=files, created=time.time(),
                            save={"mode": pending.mode, "blocked_s": round(pending.blocked_s, 4),
                                  "total_s": round(total_s, 4)}, **pending.info)
        self.catalog.write_manifest(pending.name, manifest.to_json())
        removed = self.catalog.apply_retention()
        if self.events:
            self.events("checkpoint", step=pending.step, directory=pending.name, tags=pending.tags,
                        mode=pending.mode, blocked_s=pending.blocked_s, total_s=total_s,
                        bytes=sum(f["size"] for f in files.values()), removed=removed)

    # ---- loading ---------------------------------------------------------------------------
    def load(self, state: dict, which: str = "latest") -> Manifest | None:
        """Load the newest sound checkpoint for ``which`` into ``state`` (collective).

        Each rank checks a share of the files (sizes always, checksums if ``verify``);
        a torn or corrupt checkpoint is reported and the previous one is tried.
        Returns the loaded manifest, or None when the run has no committed checkpoint.
        """
        candidates = broadcast_from_main(self.ctx, self.catalog.candidates(which) if self.ctx.is_main else None)
        if not candidates:
            if which not in ("latest", "best"):
                raise CheckpointError(f"no committed checkpoint at step {which} in {self.url}; "
                                      "see `dtrain inspect` for the steps there")
            return None
        rejected = []
        for manifest in candidates:
            directory = f"{self.root}/{manifest.directory}"
            mine = sorted(manifest.files)[self.ctx.rank :: self.ctx.world_size]
            shares = [None] * self.ctx.world_size
            dist.all_gather_object(shares, find_problems(self.fs, directory, manifest, mine, self.verify))
            problems = [p for share in shares for p in share]
            if problems:
                rejected.append(manifest.directory)
                self._report(f"checkpoint {manifest.directory} is unusable ({'; '.join(problems)}); "
                             "trying the previous one", "checkpoint_rejected",
                             directory=manifest.directory, problems=problems)
                continue
            dcp.load(state, storage_reader=reader(f"{self.url}/{manifest.directory}", self.endpoint_url))
            if rejected:
                self._report(f"resumed from {manifest.directory} after rejecting {', '.join(rejected)}",
                             "fallback", directory=manifest.directory, rejected=rejected)
            return manifest
        raise CheckpointError(f"none of the committed checkpoints in {self.url} is usable "
                              f"({', '.join(rejected)}); run `dtrain verify` on it, or start a new run")

    def _report(self, message: str, event: str, **fields) -> None:
        if self.ctx.is_main:
            print(f"dtrain: {message}", flush=True)
            if self.events:
                self.events(event, **fields)

    def close(self) -> None:
        self.wait()
        self._background.shutdown()
