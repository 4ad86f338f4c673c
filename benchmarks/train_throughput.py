"""Training throughput (samples/s by wall-clock) of the real trainer against a plain FSDP2 loop.

Two measures. First, whole runs: for each world size, runs
``torchrun --standalone --nproc_per_node=W -m dtrain.train`` and ``benchmarks/plain_loop.py``
(the same model, data and AdamW, no checkpoints, logging or guards), alternating them for several
rounds so that machine noise hits all alike. dtrain's rate is taken from the wall-clock times of
its train lines, past the first quarter of the steps (start-up), so that logging, the step
boundary and everything between steps count; the plain loop's likewise. Reports the medians and
dtrain's ratio to the plain loop. Then, because this machine's speed drifts more between runs than
the difference being measured, dtrain's step and the plain step in turn in one process
(benchmarks/step_ab.py), the median of the per-round ratios.

    python benchmarks/train_throughput.py                        # CPU: tiny and small, W = 1, 2
    python benchmarks/train_throughput.py --device cuda --presets medium --world-sizes 1
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
PLAIN = Path(__file__).with_name("plain_loop.py")
AB = Path(__file__).with_name("step_ab.py")
BLOCK = {"tiny": 100, "small": 5}  # steps per block of the in-process comparison
STEPS = {"tiny": 800, "small": 120, "medium": 200, "large": 100}


def torchrun(world: int, *command: str) -> str:
    command_line = [TORCHRUN, "--standalone", f"--nproc_per_node={world}", *command]
    return subprocess.run(command_line, check=True, capture_output=True, text=True).stdout


def dtrain_rate(world: int, preset: str, steps: int, args) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        torchrun(
            world,
            "-m",
            "dtrain.train",
            "--preset",
            preset,
            "--run-dir",
            run_dir,
            f"--train.max_steps={steps}",
            f"--train.log_interval={steps // 4}",
            "--train.eval_interval=0",
            "--checkpoint.interval_steps=0",
            "--data.val_samples=16",
            f"--train.device={args.device}",
            *args.extra,
        )
        lines = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        train = [r for r in lines if r["kind"] == "train"]
        first, last = train[0], train[-1]
        return (last["samples_seen"] - first["samples_seen"]) / (last["time"] - first["time"])


def step_ratio(world: int, preset: str, args) -> dict:
    out = torchrun(world, str(AB), "--preset", preset, "--device", args.device, "--block", str(BLOCK.get(preset, 10)))
    return json.loads(out.strip().splitlines()[-1])


def plain_rate(world: int, preset: str, steps: int, args) -> float:
    out = torchrun(world, str(PLAIN), "--preset", preset, "--steps", str(steps), "--device", args.device)
    return json.loads(out.strip().splitlines()[-1])["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more trainer options, e.g. --train.precision=bf16")
    args = parser.parse_args()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    print(f"device {args.device}, {args.rounds} rounds, samples/s by wall-clock, medians")
    print("| preset | steps | world size | dtrain | plain FSDP2 loop | dtrain / plain | all rounds (dtrain / plain) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        steps = STEPS.get(preset, 100)
        for world in worlds:
            ours, plain = [], []
            for _ in range(args.rounds):
                ours.append(dtrain_rate(world, preset, steps, args))
                plain.append(plain_rate(world, preset, steps, args))
            rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(ours, plain))
            a, b = statistics.median(ours), statistics.median(plain)
            print(f"| {preset} | {steps} | {world} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {rounds} |", flush=True)
    print("\nIn one process, blocks of steps in turn (benchmarks/step_ab.py), dtrain / plain:")
    print("| preset | world size | median of rounds | rounds |")
    print("|---|---|---|---|")
    for preset in args.presets.split(","):
        for world in worlds:
            ab = step_ratio(world, preset, args)
            rounds = ", ".join(f"{r:.2f}" for r in ab["rounds"])
            print(f"| {preset} | {world} | {ab['ratio']:.3f}x | {rounds} |", flush=True)


if __name__ == "__main__":
    main()
