"""Training throughput (samples/s) of the real trainer under torchrun, world sizes side by side.

Runs ``torchrun --standalone --nproc_per_node=W -m dtrain.train`` for each world
size, alternating them for several rounds so that machine noise hits all alike,
and reports the median steady-state samples/s (the first logged window, which
holds start-up, is dropped) and the ratio to world size 1.

    python benchmarks/train_throughput.py                 # CPU: W = 1, 2, preset small
    python benchmarks/train_throughput.py --device cuda --preset medium --world-sizes 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def measure(world: int, args) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            TORCHRUN,
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "dtrain.train",
            "--preset",
            args.preset,
            "--run-dir",
            run_dir,
            f"--train.max_steps={args.steps}",
            f"--train.log_interval={args.steps // 4}",
            "--train.eval_interval=0",
            "--data.val_samples=16",
            f"--train.device={args.device}",
            *args.extra,
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
        lines = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        windows = [r["samples_per_s"] for r in lines if r["kind"] == "train"][1:]
        return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more trainer options, e.g. --train.precision=bf16")
    args = parser.parse_args()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    samples = {w: [] for w in worlds}
    for _ in range(args.rounds):
        for world in worlds:
            samples[world].append(measure(world, args))
    base = statistics.median(samples[worlds[0]])
    print(f"preset {args.preset}, device {args.device}, {args.steps} steps, {args.rounds} rounds")
    print(f"| world size | samples/s (median) | all rounds | vs W={worlds[0]} |")
    print("|---|---|---|---|")
    for world in worlds:
        median = statistics.median(samples[world])
        rounds = ", ".join(f"{s:.0f}" for s in samples[world])
        print(f"| {world} | {median:.0f} | {rounds} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
