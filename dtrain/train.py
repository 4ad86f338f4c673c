"""``python -m dtrain.train`` / ``torchrun ... -m dtrain.train``: train or continue one run.

Pointed at a run directory that already holds a run, it continues from the
newest committed checkpoint, with the run's configuration (as of that
checkpoint) plus whatever the command line changes. Exit codes: 0 done (or
already finished, or stopped at --stop-at-step), 1 crashed, 2 bad configuration
or no usable checkpoint (nothing written), 75 stopped on a signal with a
committed checkpoint (start again to continue).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch.distributed as dist

from .checkpoint import CheckpointError, Manifest
from .checkpoint.catalog import CheckpointCatalog
from .config import ConfigError, ExperimentConfig, Settings, all_keys, build_parser, parse_args, validate
from .dist import broadcast_from_main, init_distributed, shutdown
from .preempt import EXIT_PREEMPTED
from .runlog import RunDirectory
from .trainer import Trainer

DESCRIPTION = """Train a cluster-prediction transformer on Gaussian mixtures with FSDP2.

Options are --preset, --config FILE, --run-dir, --resume, and any --SECTION.KEY=VALUE
below (precedence: preset < config file < command line). In a run directory that
already holds a run, training continues from its newest committed checkpoint with
the run's configuration, changed only by the options given.
Run under torchrun for several ranks: torchrun --nproc_per_node=N -m dtrain.train ..."""

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2
# Keys a checkpoint cannot follow: they change the shapes of the saved tensors.
SHAPE_KEYS = ("model.width", "model.layers", "model.heads", "model.mlp_ratio", "data.dim")


def stored_config(run_url: str) -> tuple[ExperimentConfig, Manifest | None]:
    """A run's configuration as of its newest committed checkpoint (so changes made on
    earlier resumes persist), or config.json before the first; and that manifest."""
    run = RunDirectory(run_url)
    if not run.exists("config.json"):
        raise ConfigError(f"{run_url} holds no dtrain run (no config.json); check the path")
    first = ExperimentConfig.from_dict(json.loads(run.read_text("config.json")), source="config.json")
    committed, _ = CheckpointCatalog(f"{run.url}/checkpoints", first.checkpoint.endpoint_url).scan()
    if committed and committed[-1].config:
        return ExperimentConfig.from_dict(committed[-1].config, source=committed[-1].directory), committed[-1]
    return first, committed[-1] if committed else None


def plan_run(run: RunDirectory, settings: Settings, resume: str, world_size: int) -> dict:
    """Rank 0: the config of this start and what it changes, or the problem (one line).

    Nothing is written unless the config is valid for this world size.
    """
    try:
        return _plan_run(run, settings, resume, world_size)
    except ConfigError as error:
        return {"problem": str(error)}


def _plan_run(run: RunDirectory, settings: Settings, resume: str, world_size: int) -> dict:
    if not run.exists("config.json"):
        if resume not in ("latest", "never"):
            return {"problem": f"--resume={resume}: {run.url} holds no run to resume; "
                               "drop --resume to start one there"}
        config = settings.resolve()
        validate(config, world_size)
        run.write_text("config.json", config.to_json() + "\n")
        return {"config": config.to_dict(), "changed": {}}
    if resume == "never":
        return {"problem": f"run directory {run.url} already holds a run; pass a new --run-dir, "
                           "or drop --resume=never to continue it"}
    stored, _ = stored_config(run.url)
    if settings.preset and settings.preset != stored.preset_name:
        return {"problem": f"--preset {settings.preset} differs from the run's preset "
                           f"{stored.preset_name}; omit --preset to continue the run, or pass a new --run-dir"}
    config = settings.apply(copy.deepcopy(stored))
    old, new = stored.to_dict(), config.to_dict()
    changed = {}
    for key in all_keys():
        section, name = key.split(".")
        if old[section][name] != new[section][name]:
            changed[key] = [old[section][name], new[section][name]]
    for key in SHAPE_KEYS:
        if key in changed:
            return {"problem": f"--{key}={changed[key][1]} differs from the run's {changed[key][0]}: "
                               "a checkpoint cannot change the model's shape; pass a new --run-dir"}
    validate(config, world_size)
    return {"config": new, "changed": changed}


def run_training(settings: Settings, run_dir: str, resume: str = "latest", stop_at_step: int | None = None,
                 prog: str = "dtrain") -> Trainer:
    """Train (or continue) ``run_dir`` on this process's group, the CLI's and the API's one path.

    Raises ConfigError / CheckpointError (after an orderly teardown: every rank
    reaches the same verdict) and whatever training raised.
    """
    ctx = init_distributed(settings.resolve().train.device)
    try:
        run = RunDirectory(run_dir)
        plan = broadcast_from_main(ctx, plan_run(run, settings, resume, ctx.world_size) if ctx.is_main else None)
        if "problem" in plan:
            raise ConfigError(plan["problem"])
        config = ExperimentConfig.from_dict(plan["config"])
        trainer = Trainer(config, ctx, run)
        manifest = trainer.restore("latest" if resume == "never" else resume)
        say = print if ctx.is_main else (lambda *a, **k: None)
        if manifest is not None:
            say(f"{prog}: resuming from {manifest.directory} (step {manifest.step}, saved on "
                f"{manifest.world_size} ranks) on {ctx.world_size} ranks", flush=True)
            if plan["changed"] and ctx.is_main:
                run.event("config_changed", step=trainer.step, changed=plan["changed"])
        if stop_at_step is not None and trainer.step >= stop_at_step:
            say(f"{prog}: run {run.url} is at step {trainer.step}, past --stop-at-step "
                f"{stop_at_step}; nothing to do", flush=True)
        elif trainer.finished:
            say(f"{prog}: run {run.url} already finished at step {trainer.step} "
                f"({trainer.samples_seen} samples); nothing to do", flush=True)
        else:
            trainer.fit(stop_at_step)
            if trainer.stopped_by_signal:
                say(f"{prog}: stopped at step {trainer.step} on {trainer.stopped_by_signal}, checkpoint "
                    f"committed; start the same run again to continue (exit {EXIT_PREEMPTED})", flush=True)
            elif not trainer.finished:
                say(f"{prog}: stopped at step {trainer.step} as asked, checkpoint committed; "
                    "start the same run again to continue", flush=True)
    except (ConfigError, CheckpointError):
        shutdown(ctx)
        raise
    except BaseException:
        if ctx.owns_group and ctx.world_size == 1:  # nobody to wait for: leave the process usable
            dist.destroy_process_group()
        raise
    shutdown(ctx)
    return trainer


def tag_checkpoint(run_dir: str, which: str, tag: str) -> str:
    """Commit a copy of checkpoint ``which`` tagged ``tag``; retention keeps tagged copies."""
    config, _ = stored_config(run_dir)
    ctx = init_distributed(config.train.device)
    try:
        trainer = Trainer(config, ctx, RunDirectory(run_dir))
        if trainer.restore(which) is None:
            raise CheckpointError(f"no committed checkpoint {which!r} in {run_dir} to tag")
        trainer.save([tag], blocking=True)
        trainer.checkpoints.close()
        return trainer.checkpoints.last_directory
    finally:
        shutdown(ctx)


def train(settings: Settings, run_dir: str, resume: str = "latest", prog: str = "dtrain",
          stop_at_step: int | None = None) -> int:
    """The command line's wrapper: exit codes and one-line errors instead of exceptions."""
    try:
        trainer = run_training(settings, run_dir, resume, stop_at_step, prog)
    except (ConfigError, CheckpointError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except BaseException:
        # Peers may be gone: no barrier, no teardown; report and leave at once.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CRASH)
    return EXIT_PREEMPTED if trainer.stopped_by_signal else EXIT_OK


def main(argv=None, prog: str = "python -m dtrain.train") -> int:
    parser = build_parser(prog, DESCRIPTION)
    args, settings = parse_args(parser, argv)
    return train(settings, args.run_dir, args.resume, prog, args.stop_at_step)


def exit_now(code: int) -> None:
    """End the process without interpreter teardown: a gloo worker thread that frees
    tensors during Python's shutdown aborts it ("terminate called without an active
    exception"), even after barrier and destroy (shared/DCP-NOTES.md: os._exit 0/15)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
