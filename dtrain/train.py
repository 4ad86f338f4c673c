"""``python -m dtrain.train`` / ``torchrun ... -m dtrain.train``: train or continue one run.

Pointed at a run directory that already holds a run, it continues from the
newest committed checkpoint, with the run's configuration (as of that
checkpoint) plus whatever the command line changes. Exit codes are listed in
``dtrain/errors.py`` (0 done, 2 bad configuration, 65 diverged, 74 storage,
75 stopped on a signal with a committed checkpoint).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist

from .checkpoint.catalog import Listing
from .checkpoint.storage import Storage
from .config import ExperimentConfig, Settings, build_parser, parse_args, validate
from .dist import broadcast_from_main, init_distributed, on_main, shutdown
from .errors import EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, KINDS, ConfigError, DtrainError
from .lease import RunLease
from .model import check_fits
from .replicas import FaultTolerance
from .resume import changed_keys, refusal
from .rundir import CONFIG, RunDirectory
from .startup import CLOCK, StartupClock
from .tensorboard import check_tensorboard
from .trainer import Trainer

CLOCK.mark("imported")

DESCRIPTION = """Train a cluster-prediction transformer on Gaussian mixtures with FSDP2.

Options are --preset, --config FILE, --run-dir, --resume, and any --SECTION.KEY=VALUE
below (precedence: preset < config file < command line). In a run directory that
already holds a run, training continues from its newest committed checkpoint with
the run's configuration, changed only by the options given.
Run under torchrun for several ranks: torchrun --nproc_per_node=N -m dtrain.train ..."""


def stored_config(run_url: str, storage: Storage | None = None):
    """A run's configuration (as of its newest committed checkpoint) and that manifest."""
    config, manifest, _ = RunDirectory(run_url, storage).stored_config()
    return config, manifest


def plan_run(
    run: RunDirectory, settings: Settings, resume: str, world_size: int, lease: RunLease, device: torch.device
) -> dict:
    """Rank 0: the config of this start and what it changes, or the problem (one line).

    Nothing is written unless the config is valid for this world size and this job
    holds the run directory's lease.
    """
    try:
        return _plan_run(run, settings, resume, world_size, lease, device)
    except DtrainError as error:
        return {"problem": str(error), "kind": type(error).__name__}


def _describe(listing: Listing) -> str:
    parts = [f"{name} ({why})" for name, why in listing.damaged.items()]
    parts += [f"{name} (quarantined: {why})" for name, why in listing.rejected.items()]
    parts += [f"{name} (DCP files but no manifest)" for name, meta in listing.torn.items() if meta]
    return "; ".join(sorted(parts))


def _plan_run(
    run: RunDirectory, settings: Settings, resume: str, world_size: int, lease: RunLease, device: torch.device
) -> dict:
    run.check_is_directory()
    listing = run.catalog().scan()
    first, problem = run.first_config()
    notes: list[str] = []
    if listing.committed and resume == "restart":
        raise ConfigError(
            f"--resume=restart: {run.url} has committed checkpoints; drop --resume to continue "
            "it, or pass a new --run-dir"
        )
    if not listing.committed and (listing.unexplained or problem) and resume != "restart":
        found = _describe(listing) or problem
        raise ConfigError(
            f"{run.url} holds no committed checkpoint but {found}; nothing was changed. "
            "See `dtrain verify`; to train from step 0 beside what is there pass "
            "--resume=restart, or pass a new --run-dir"
        )
    if resume == "restart" or (first is None and not listing.committed):  # a new run, or a restart
        if resume not in ("latest", "never", "restart"):
            raise ConfigError(
                f"--resume={resume}: {run.url} holds no committed checkpoint to resume; drop --resume to start the run"
            )
        config = settings.resolve()
        notes.append(_admit(config, run.url, world_size, device, lease))
        run.write_text(CONFIG, config.to_json() + "\n")
        if resume == "restart":
            notes.append(
                f"starting {run.url} over from step 0 as asked (--resume=restart); "
                "the checkpoint directories there are left as they are"
            )
        return {"config": config.to_dict(), "changed": {}, "notes": [n for n in notes if n]}
    if resume == "never":
        raise ConfigError(
            f"run directory {run.url} already holds a run; pass a new --run-dir, or drop --resume=never to continue it"
        )
    if resume not in ("latest", "restart") and not listing.candidates(resume):
        steps = ", ".join(str(m.step) for m in listing.committed) or "none"
        what = "checkpoint tagged best" if resume == "best" else f"committed checkpoint at step {resume}"
        raise ConfigError(
            f"--resume={resume}: {run.url} holds no {what} (committed steps: {steps}); "
            "pick one of those, or drop --resume for the newest"
        )
    stored, _, note = run.stored_config()
    notes.append(note)
    config = settings.apply(copy.deepcopy(stored))
    if problem := refusal(stored, config, settings.preset):
        raise ConfigError(problem)
    notes.append(_admit(config, run.url, world_size, device, lease))
    return {"config": config.to_dict(), "changed": changed_keys(stored, config), "notes": [n for n in notes if n]}


def _admit(config: ExperimentConfig, run_url: str, world_size: int, device: torch.device, lease: RunLease) -> str:
    """The last checks before a start writes anything: the config works on this world size and
    run directory, the model fits this host, and this job holds the run directory (returns the
    lease's note)."""
    validate(config, world_size)
    check_tensorboard(config.metrics, run_url)
    check_fits(config.model, config.data.dim, world_size, device)
    return lease.acquire()


def start_device(settings: Settings, run_dir: str, requested: ExperimentConfig, resume: str = "latest") -> str:
    """The device a start trains on: as given, else the run's own (a resume keeps it), else the preset's.

    Every rank reads it: the process group that could share one read needs the
    device first. A run without a usable configuration is reported after the group
    exists; a storage failure stops every rank here (ranks must not disagree).
    """
    if "train.device" in settings.values or resume == "restart":
        return requested.train.device
    try:
        return RunDirectory(run_dir, Storage.from_config(requested.checkpoint)).stored_config()[0].train.device
    except ConfigError:
        return requested.train.device


def run_training(
    settings: Settings,
    run_dir: str,
    resume: str = "latest",
    stop_at_step: int | None = None,
    prog: str = "dtrain",
    clock: StartupClock | None = None,
    ft: FaultTolerance | None = None,
) -> Trainer:
    """Train (or continue) ``run_dir`` on this process's group, the CLI's and the API's one path.

    Raises a ``DtrainError`` (after an orderly teardown: every rank reaches the same
    verdict) and whatever else training raised. ``clock``'s marks, and the ones made
    here, go into the leg's start/resume event (dtrain/startup.py).
    """
    clock = clock or StartupClock()
    clock.mark("called")
    requested = settings.resolve()
    ctx = init_distributed(start_device(settings, run_dir, requested, resume))
    clock.mark("group")
    lease = None
    try:
        run = RunDirectory(run_dir, Storage.from_config(requested.checkpoint))
        ft = ft or FaultTolerance()
        if ctx.is_main:  # the replica groups of one job share its lease
            lease = RunLease(run, requested.checkpoint.lease_seconds, ft.job_id if ft.enable else None)
        plan = broadcast_from_main(
            ctx, plan_run(run, settings, resume, ctx.world_size, lease, ctx.device) if ctx.is_main else None
        )
        if "problem" in plan:
            raise KINDS[plan["kind"]](plan["problem"])
        config = ExperimentConfig.from_dict(plan["config"])
        ctx.watch_peers(config.train.heartbeat_timeout)
        clock.mark("planned")
        run = RunDirectory(run_dir, Storage.from_config(config.checkpoint))
        if ft.enable:
            from .replica_trainer import ReplicaTrainer  # imports torchft

            trainer = ReplicaTrainer(config, ctx, run, lease, ft)
        else:
            trainer = Trainer(config, ctx, run, lease)
        clock.mark("built")
        trainer.startup = clock.marks

        def announce(notes=plan["notes"]) -> None:
            for note in notes:
                print(f"{prog}: {note}", flush=True)
                run.event("notice", message=note)

        on_main(ctx, announce)
        manifest = None if resume == "restart" else trainer.restore("latest" if resume == "never" else resume)
        clock.mark("restored")
        say = print if ctx.is_main else (lambda *a, **k: None)
        if manifest is not None:
            say(
                f"{prog}: resuming from {manifest.directory} (step {manifest.step}, saved on "
                f"{manifest.world_size} ranks) on {ctx.world_size} ranks",
                flush=True,
            )
            if plan["changed"]:
                on_main(ctx, lambda: run.event("config_changed", step=trainer.step, changed=plan["changed"]))
        if stop_at_step is not None and trainer.step >= stop_at_step:
            say(
                f"{prog}: run {run.url} is at step {trainer.step}, past --stop-at-step {stop_at_step}; nothing to do",
                flush=True,
            )
        elif trainer.finished:
            say(
                f"{prog}: run {run.url} already finished at step {trainer.step} "
                f"({trainer.samples_seen} samples); nothing to do",
                flush=True,
            )
        else:
            trainer.fit(stop_at_step)
            if getattr(trainer, "left_alone", False):
                say(
                    f"{prog}: replica {ft.replica_id} left at step {trainer.step} on {trainer.stopped_by_signal}; "
                    "the other replica groups go on with the state (start this one again to rejoin)",
                    flush=True,
                )
            elif trainer.stopped_by_signal and not getattr(trainer, "writer", True):
                say(
                    f"{prog}: replica {ft.replica_id} stopped at step {trainer.step} on {trainer.stopped_by_signal} "
                    "with every replica group; the lowest one commits the checkpoint",
                    flush=True,
                )
            elif trainer.stopped_by_signal:
                say(
                    f"{prog}: stopped at step {trainer.step} on {trainer.stopped_by_signal}, checkpoint "
                    f"committed; start the same run again to continue (exit {EXIT_PREEMPTED})",
                    flush=True,
                )
            elif not trainer.finished:
                say(
                    f"{prog}: stopped at step {trainer.step} as asked, checkpoint committed; "
                    "start the same run again to continue",
                    flush=True,
                )
    except DtrainError:
        if lease is not None:
            lease.release()
        shutdown(ctx)
        raise
    except BaseException:
        ctx.stop_watching()  # a caller that goes on must not be judged by a peer's exit
        if ctx.owns_group and ctx.world_size == 1:  # nobody to wait for: leave the process usable
            if lease is not None:
                lease.release()
            dist.destroy_process_group()
        raise
    if lease is not None:  # replica groups: the writer of the job's last save lets the run go
        ended = trainer.finished or bool(trainer.stopped_by_signal)
        lease.release(job_over=ended and getattr(trainer, "writer", True))
    shutdown(ctx)
    return trainer


def _peer_gone(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (dist.DistError, RuntimeError)) and any(
        words in text
        for words in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Broken pipe",
            "Socket Timeout",
            "Timed out waiting",
        )
    )


def train(
    settings: Settings,
    run_dir: str,
    resume: str = "latest",
    prog: str = "dtrain",
    stop_at_step: int | None = None,
    ft: FaultTolerance | None = None,
) -> int:
    """The command line's wrapper: exit codes and one-line errors instead of exceptions."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        trainer = run_training(settings, run_dir, resume, stop_at_step, prog, CLOCK, ft)
    except DtrainError as error:
        if rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers were installed (start-up)
        print(
            f"{prog}: interrupted during start-up; nothing was written since the last commit",
            file=sys.stderr,
            flush=True,
        )
        exit_now(130)
    except BaseException as error:
        # Peers may be gone: no barrier, no teardown; report and leave at once.
        if _peer_gone(error):
            print(
                f"{prog}: rank {rank}: another rank of the job is gone ({' '.join(str(error).split())[:160]}); "
                "stopping this one (a torchrun restart or a new start resumes from the last commit)",
                file=sys.stderr,
                flush=True,
            )
        else:
            traceback.print_exc()
        exit_now(EXIT_CRASH)
    return EXIT_PREEMPTED if trainer.stopped_by_signal else EXIT_OK


def main(argv=None, prog: str = "python -m dtrain.train") -> int:
    parser = build_parser(prog, DESCRIPTION)
    group = parser.add_argument_group("fault_tolerance options (replica groups on torchft; docs/fault-tolerance.md)")
    for name, help in FaultTolerance.HELP.items():
        default = getattr(FaultTolerance, name)
        group.add_argument(
            f"--fault_tolerance.{name}",
            dest=f"fault_tolerance.{name}",
            default=None,
            metavar=type(default).__name__.upper(),
            help=f"{help} (default: {default})",
        )
    args, settings = parse_args(parser, argv)
    try:
        ft = FaultTolerance.from_args(args)
    except ConfigError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    code = train(settings, args.run_dir, args.resume, prog, args.stop_at_step, ft)
    record_exit_code(code)
    return code


def record_exit_code(code: int) -> None:
    """Rank 0 writes its exit code to $DTRAIN_EXIT_CODE_FILE, if set: torchrun itself exits 1
    for any failed worker, so a launch script reads the real code there (launch/local.sh)."""
    path = os.environ.get("DTRAIN_EXIT_CODE_FILE")
    if path and int(os.environ.get("RANK", "0")) == 0:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


def exit_now(code: int) -> None:
    """End the process without interpreter teardown: a gloo worker thread that frees
    tensors during Python's shutdown aborts it ("terminate called without an active
    exception"), even after barrier and destroy (docs/design.md, "Shutdown")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
