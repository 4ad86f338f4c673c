"""``python -m dtrain.train`` / ``torchrun ... -m dtrain.train``: train one run.

Exit codes: 0 done, 1 crashed, 2 bad configuration (nothing written).
"""
from __future__ import annotations

import os
import sys
import traceback

from .config import ConfigError, ExperimentConfig, build_parser, parse_args, validate
from .dist import broadcast_from_main, init_distributed, shutdown
from .runlog import RunDirectory
from .trainer import Trainer

DESCRIPTION = """Train a cluster-prediction transformer on Gaussian mixtures with FSDP2.

Options are --preset, --config FILE, --run-dir, and any --SECTION.KEY=VALUE below
(precedence: preset < config file < command line).
Run under torchrun for several ranks: torchrun --nproc_per_node=N -m dtrain.train ..."""

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2


def prepare_run_directory(run: RunDirectory, config: ExperimentConfig) -> str | None:
    """Write config.json for a new run; return why the directory can't be used, if so."""
    if run.exists("config.json"):
        return (f"run directory {run.url} already holds a run (config.json); "
                "pass a new --run-dir to start another")
    run.write_text("config.json", config.to_json() + "\n")
    return None


def train(config: ExperimentConfig, run_dir: str, prog: str = "dtrain") -> int:
    """Train ``config`` into ``run_dir`` on this process's group; returns an exit code."""
    ctx = init_distributed(config.train.device)
    try:
        validate(config, ctx.world_size)
        run = RunDirectory(run_dir)
        problem = prepare_run_directory(run, config) if ctx.is_main else None
        problem = broadcast_from_main(ctx, problem)
        if problem:
            raise ConfigError(problem)
        Trainer(config, ctx, run).fit()
    except ConfigError as error:  # every rank reaches the same verdict, so all can stop in order
        if ctx.is_main:
            print(f"{prog}: error: {error}", file=sys.stderr)
        shutdown(ctx)
        return EXIT_CONFIG
    except BaseException:
        # Peers may be gone: no barrier, no teardown; report and leave at once.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CRASH)
    shutdown(ctx)
    return EXIT_OK


def main(argv=None, prog: str = "python -m dtrain.train") -> int:
    parser = build_parser(prog, DESCRIPTION)
    args, config = parse_args(parser, argv)
    try:
        return train(config, args.run_dir, prog)
    except ConfigError as error:  # raised before a process group exists
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
