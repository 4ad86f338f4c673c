"""Goodput under preemption: save-on-signal against interval-only checkpointing, side by side.

The same 2-rank job (`small` preset) is preempted every T seconds: SIGTERM to the
torchrun agent, as a node's shutdown notice does; the agent passes it to the
workers and gives them 30 s. With save-on-signal (the default) the workers save at
the next step boundary and exit 75; with `--checkpoint.save_on_signal=false`
they die at once and fall back to the last interval checkpoint. Each is
restarted at once, until the time budget is spent (the last leg is preempted too).

Reports the useful-step fraction of wall-clock (surviving steps x steady step
time / wall), steps lost per preemption, and time from restart to first step.

    python benchmarks/goodput.py [--budget 150] [--every 25] [--interval 50]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtrain.report import check_run
from dtrain.rundir import METRICS, RunDirectory

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def run_mode(save_on_signal: bool, args) -> dict:
    run_dir = tempfile.mkdtemp(prefix="dtrain-goodput-")
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "dtrain.train", "--run-dir", run_dir,
               "--preset", "small", "--data.points=32", "--train.num_epochs=100", "--train.log_interval=1",
               "--train.eval_interval=0", f"--checkpoint.interval_steps={args.interval}",
               f"--checkpoint.save_on_signal={str(save_on_signal).lower()}"]
    launches, spent = [], 0.0
    while spent < args.budget:
        started = time.time()
        agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            agent.wait(timeout=min(args.every, args.budget - spent))
        except subprocess.TimeoutExpired:
            agent.send_signal(signal.SIGTERM)
            agent.wait()
        launches.append(started)
        spent += time.time() - started
    run = RunDirectory(run_dir)
    report = check_run(run)
    committed = run.catalog().scan().committed
    survived = committed[-1].step if committed else 0
    train = [r for r in run.read_jsonl(METRICS) if r["kind"] == "train"]
    step_time = statistics.median(64 / r["samples_per_s"] for r in train)
    legs = report["legs"]
    lost = [leg["lost_steps"] for leg in legs[:-1]] + [max(legs[-1]["last_step"] - survived, 0)]
    firsts = []
    for leg in legs:
        launched = max(t for t in launches if t <= leg["started"])
        times = [r["time"] for r in train if r["leg"] == leg["leg"]]
        if times:
            firsts.append(min(times) - launched)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"wall": spent, "preemptions": len(launches), "survived": survived, "step_time": step_time,
            "useful": survived * step_time / spent, "lost": statistics.mean(lost),
            "first_step": statistics.median(firsts[1:] or firsts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150, help="wall-clock seconds per mode")
    parser.add_argument("--every", type=float, default=25, help="seconds between preemptions")
    parser.add_argument("--interval", type=int, default=50, help="checkpoint.interval_steps")
    args = parser.parse_args()
    results = {"save on signal": run_mode(True, args), "interval only": run_mode(False, args)}
    print(f"2 ranks, small preset, preempted every {args.every:g} s, {args.budget:g} s per mode, "
          f"checkpoint every {args.interval} steps")
    print("| mode | preemptions | steps kept | step (s) | useful fraction of wall-clock | steps lost per preemption | restart to first step (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['preemptions']} | {r['survived']} | {r['step_time']:.3f} | {r['useful']:.1%} | "
              f"{r['lost']:.1f} | {r['first_step']:.1f} |")


if __name__ == "__main__":
    main()
