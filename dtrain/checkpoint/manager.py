"""Saving, committing, retaining and choosing checkpoints under ``RUN/checkpoints/``.

Every save goes to a new ``step_NNNNNNNN`` directory (DCP must never write over
an existing checkpoint). It counts only once rank 0 has written its manifest,
after DCP's ``.metadata`` exists and every file's checksums are known (computed
as DCP wrote them: nothing is read back), and only while this job still holds
the run directory's lease. Retention runs only after
a commit and never removes the newest or the best checkpoint. A checkpoint that
a load finds unusable (a missing file, a wrong size, bytes whose checksum differs
as they are read) is quarantined and the previous one is tried.

Every rank reaches the same verdict at the same point: rank-0-only steps and
per-rank checks are agreed (``dist.on_main``, ``dist.on_every_rank``), so a
storage failure stops all ranks with one line instead of hanging them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ..config import CheckpointConfig
from ..dist import DistContext, gather_on_main, on_every_rank, on_main
from ..errors import CheckpointError, StorageError
from ..watchdog import StepWatchdog
from .catalog import CheckpointCatalog, Listing
from .dcp_io import SavePlanner, UnsafeCheckpointError, gc_paused
from .integrity import CorruptCheckpointError
from .manifest import Manifest, data_files, find_problems, unlisted_shards
from .state import load_parts
from .storage import STORAGE_EXCEPTIONS, cause, guard, root_errors


@dataclass
class PendingSave:
    name: str
    step: int
    tags: list[str]
    info: dict  # manifest fields the trainer knows: progress, batch sizes, metrics, ...
    started: float
    blocked_s: float
    mode: str
    written: Future  # this rank's files as manifest entries, once DCP's write is done


class CheckpointManager:
    def __init__(
        self,
        catalog: CheckpointCatalog,
        ctx: DistContext,
        config: CheckpointConfig | None = None,
        events=None,
        lease=None,
        watchdog: StepWatchdog | None = None,
    ):
        self.catalog = catalog
        self.url, self.fs, self.root, self.storage = catalog.url, catalog.fs, catalog.root, catalog.storage
        self.ctx = ctx
        self.config = config or CheckpointConfig()
        self.events = events  # callable(kind, **fields) on rank 0, or None
        self.lease = lease  # rank 0's RunLease, checked before every commit; None elsewhere
        self.watchdog = watchdog or StepWatchdog()  # a commit's wait for storage is not a step's
        self._pending: PendingSave | None = None
        self.last_blocked_s = 0.0
        self.last_directory = ""  # of the newest save this manager started
        self.last_committed: str | None = None  # newest committed checkpoint of this line (loaded or saved)
        self.last_saved_step = -1
        self._last_save_time = time.monotonic()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtrain-save")
        # Background saves get their own gloo group: sharing the training group with
        # FSDP's collectives hung or aborted with "collective mismatch" (docs/design.md).
        self._save_group = dist.new_group(backend="gloo") if self.config.async_save else None
        # One stager for the run: it copies the state to CPU in its own thread while the next
        # step's forward and backward run, and keeps its buffers (pinned on CUDA) for the next
        # save. Only the optimizer's update must wait for the copy (``wait_for_staging``).
        cuda = ctx.device.type == "cuda"
        self._stager = (
            DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda
                )
            )
            if self.config.async_save
            else None
        )
        self._staging: Future | None = None
        self._deleting = None  # rank 0's deletion of what retention dropped at the last commit

    # ---- saving ----------------------------------------------------------------------------
    def start_clock(self) -> None:
        """``interval_seconds`` counts from now: training starts, or a save has returned."""
        self._last_save_time = time.monotonic()

    def due(self, step: int, epoch_before: int, epoch: int) -> bool:
        """Whether an interval (steps, epochs or seconds) asks for a save after ``step`` (collective)."""
        ck = self.config
        due = bool(ck.interval_steps and step % ck.interval_steps == 0)
        due |= bool(ck.interval_epochs and epoch // ck.interval_epochs > epoch_before // ck.interval_epochs)
        if ck.interval_seconds:
            # Rank 0's clock decides for everyone: ranks must never disagree about a save.
            late = time.monotonic() - self._last_save_time >= ck.interval_seconds
            flag = torch.tensor([int(self.ctx.is_main and late)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due |= bool(flag.item())
        return due

    def save(self, state: dict, step: int, tags: list[str], info: dict, blocking: bool = False) -> None:
        """Start a save of ``state`` (collective); it is committed by ``poll``/``wait``.

        With ``async_save`` and not ``blocking``, DCP stages the state and writes it
        in the background; otherwise the save is written and committed before returning.
        """
        self.wait()  # at most one save in flight
        self._finish_deleting()
        self.last_saved_step = step
        name = on_main(self.ctx, lambda: self.catalog.new_directory(step))
        url = f"{self.url}/{name}"
        self.last_directory = name
        started = time.perf_counter()
        background = self.config.async_save and not blocking
        writer = self.storage.writer(url)
        writer.in_background = background
        # DCP gathers every rank's failure: all raise. The collector is paused while DCP plans
        # (dcp_io.gc_paused); a background save's own thread plans and writes later with it on.
        with guard("writing checkpoint", url), gc_paused():
            # The plan is the same from save to save: DCP skips re-planning across ranks.
            planner = SavePlanner(enable_plan_caching=True)
            if background:
                response = dcp.async_save(
                    state,
                    storage_writer=writer,
                    planner=planner,
                    process_group=self._save_group,
                    async_stager=self._stager,
                )
                self._staging, future = response.staging_completion, response.upload_completion
            else:
                dcp.save(state, storage_writer=writer, planner=planner)
                future = Future()
                future.set_result(None)
        blocked = self.last_blocked_s = time.perf_counter() - started
        self.start_clock()
        written = self._background.submit(self._written, future, writer, url)
        self._pending = PendingSave(
            name, step, list(tags), info, started, blocked, "async" if background else "sync", written
        )
        if not background:
            self.wait()

    @property
    def saving(self) -> bool:
        """Whether a save is started and not yet committed."""
        return self._pending is not None

    def wait_for_staging(self) -> None:
        """Block until a background save has copied the state (call before changing it in place).
        A failed copy is not raised here: the save's own future carries it to the commit."""
        if self._staging is not None:
            wait_for([self._staging])
            self._staging = None

    @staticmethod
    def _written(future: Future, writer, url: str) -> dict:
        """This rank's files with their checksums, once DCP's write is done (every rank's: DCP's
        finish is collective, and rank 0's share includes .metadata)."""
        with guard("writing checkpoint", url):
            future.result()
        return writer.written

    def poll(self) -> None:
        """Commit the save in flight if every rank has finished it (collective, cheap)."""
        if self._pending is None:
            return
        done = torch.tensor([1 if self._pending.written.done() else 0])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self._commit()

    def wait(self) -> None:
        """Block until the save in flight is written, then commit it (collective)."""
        if self._pending is not None:
            self._commit()

    def _commit(self) -> None:
        with self.watchdog.not_counted():
            self._commit_pending()

    def _commit_pending(self) -> None:
        pending, self._pending = self._pending, None
        shares = gather_on_main(self.ctx, pending.written.result)  # only rank 0 writes the manifest
        files = {name: entry for share in shares or [] for name, entry in share.items()}
        total_s = time.perf_counter() - pending.started

        def write_manifest_and_retain() -> None:
            if self.lease is not None:
                self.lease.check()  # another job took the run over: commit nothing, delete nothing
            with guard("listing checkpoint", f"{self.url}/{pending.name}"):
                self.fs.invalidate_cache()
                present = data_files(self.fs, f"{self.root}/{pending.name}")
            if sorted(files) != present:  # every file DCP wrote passed through the checksums
                raise CheckpointError(
                    f"checkpoint {pending.name} holds {present}, but checksums were "
                    f"computed for {sorted(files)}; this torch's DCP writes files "
                    "dtrain does not see: report it"
                )
            manifest = Manifest(
                step=pending.step,
                tags=pending.tags,
                files=files,
                created=time.time(),
                save={"mode": pending.mode, "blocked_s": round(pending.blocked_s, 4), "total_s": round(total_s, 4)},
                sequence=self.catalog.next_sequence(),
                parent=self.last_committed,
                **pending.info,
            )
            self.catalog.write_manifest(pending.name, manifest.to_json())
            # The commit is durable now: old checkpoints are deleted while training goes on
            # (a delete of 100s of MB frees pages for a while), finished before the next save.
            doomed = self.catalog.doomed()
            removed = list(doomed)
            self._deleting = self._background.submit(self.catalog.delete_all, doomed)
            if self.events:
                self.events(
                    "checkpoint",
                    step=pending.step,
                    directory=pending.name,
                    tags=pending.tags,
                    mode=pending.mode,
                    blocked_s=pending.blocked_s,
                    total_s=total_s,
                    bytes=sum(f["size"] for f in files.values()),
                    removed=removed,
                )

        on_main(self.ctx, write_manifest_and_retain)
        self.last_committed = pending.name

    # ---- loading ---------------------------------------------------------------------------
    def load(self, state: dict, which: str = "latest", check: Callable[[], list[str]] | None = None) -> Manifest | None:
        """Load the newest sound checkpoint for ``which`` into ``state`` (collective).

        Each rank checks a share of the files' sizes; with ``verify``, the bytes are
        checked as DCP reads them (format 1-2 checkpoints: read whole first). ``check``
        (per rank, after loading) may find more, such as non-finite values. A damaged,
        corrupt or unsafe checkpoint is reported, quarantined, and the previous one is
        tried. Returns the loaded manifest, or None when the run has no committed checkpoint.
        """
        listing: Listing = on_main(self.ctx, self.catalog.scan)
        rejected = []
        for name, why in sorted(listing.damaged.items()):
            self._reject(name, [why])
            rejected.append(name)
        candidates = listing.candidates(which)
        if not candidates:
            if which != "latest":
                raise CheckpointError(
                    f"no committed checkpoint {which!r} in {self.url}; see `dtrain inspect` for what is there"
                )
            return None
        for manifest in candidates:
            problems = self._problems(manifest)
            if not problems:
                problems = self._load_into(state, manifest)
            if not problems and check is not None:
                problems = sorted(set(p for share in on_every_rank(self.ctx, check) for p in share))
            if problems:
                rejected.append(manifest.directory)
                self._reject(manifest.directory, problems)
                continue
            if rejected:
                self._report(
                    f"resumed from {manifest.directory} after rejecting {', '.join(rejected)}",
                    "fallback",
                    directory=manifest.directory,
                    rejected=rejected,
                )
            self.last_committed = manifest.directory
            return manifest
        raise CheckpointError(
            f"none of the committed checkpoints in {self.url} is usable "
            f"({', '.join(rejected)} quarantined); run `dtrain verify` on it, or start a new run"
        )

    def _problems(self, manifest: Manifest) -> list[str]:
        """Every rank checks its share of the files; rank 0 also that no shard is unlisted."""
        directory = f"{self.root}/{manifest.directory}"
        mine = sorted(manifest.files)[self.ctx.rank :: self.ctx.world_size]
        read_whole = self.config.verify and not manifest.checked_as_read

        def check_share() -> list[str]:
            with guard("reading checkpoint", f"{self.url}/{manifest.directory}"):
                problems = find_problems(self.fs, directory, manifest, mine, read_whole)
                if self.ctx.is_main:
                    present = {p.rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)}
                    problems += unlisted_shards(present, manifest)
                return problems

        return [p for share in on_every_rank(self.ctx, check_share) for p in share]

    def _load_into(self, state: dict, manifest: Manifest) -> list[str]:
        """DCP's load into ``state``'s components (no code run: restricted metadata, weights-only
        objects; every byte checked as it is read); the problems found.

        A failure of the storage stops the job; anything else wrong with what was read
        (unsafe or damaged metadata, bytes that fail their checksum, missing keys, wrong
        sizes) rejects this checkpoint.
        """
        url = f"{self.url}/{manifest.directory}"
        reader = self.storage.reader(url, manifest.files if self.config.verify else None)
        try:
            with guard("loading checkpoint", url):
                reader.read_metadata()
            loaded = load_parts(reader, {name: part.state_dict() for name, part in state.items()})
        except (UnsafeCheckpointError, CorruptCheckpointError) as error:
            return [str(error)]
        except CheckpointException as error:  # DCP gathers every rank's failure: all ranks are here
            roots = root_errors(error)
            if any(isinstance(e, STORAGE_EXCEPTIONS) and not isinstance(e, EOFError) for e in roots):
                raise StorageError(f"loading checkpoint {url} failed: {cause(error)}") from error
            return [" ".join(str(roots[0] if roots else error).split())[:200]]
        for name, part in state.items():
            part.load_state_dict(loaded[name])
        return []

    def _reject(self, name: str, problems: list[str]) -> None:
        """Report a checkpoint as unusable and quarantine it (rank 0 writes, everyone agrees)."""

        def quarantine() -> None:
            print(
                f"dtrain: checkpoint {name} is unusable ({'; '.join(problems)}); quarantined, trying the previous one",
                flush=True,
            )
            self.catalog.quarantine(name, problems)
            if self.events:
                self.events("checkpoint_rejected", directory=name, problems=problems)

        on_main(self.ctx, quarantine)

    def _report(self, message: str, event: str, **fields) -> None:
        def report() -> None:
            print(f"dtrain: {message}", flush=True)
            if self.events:
                self.events(event, **fields)

        on_main(self.ctx, report)

    def _finish_deleting(self) -> None:
        """Wait for retention's deletes. One that failed is said, not raised: the checkpoint it
        followed is committed, and the next commit's retention deletes what is left."""
        deleting, self._deleting = self._deleting, None
        if deleting is None:
            return
        try:
            deleting.result()
        except Exception as error:  # storage errors are reported as the catalog's guard words them
            print(f"dtrain: warning: retention could not delete an old checkpoint ({error}); the next commit retries")

    def close(self) -> None:
        self.wait()
        self._finish_deleting()
        self._background.shutdown()
        if self._stager is not None:
            self._stager.close()
