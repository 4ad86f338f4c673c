"""Replica groups under hard failures, beside the torchrun restart path on the same schedule.

Two replica groups of one rank each (the machine's 2 cores), the job of benchmarks/goodput.py
(`small` preset, 32 points, 2 ranks' worth of global batch) under a real torchft lighthouse.
Every ``--every`` seconds replica 1's whole process tree is SIGKILLed (no notice: a crashed node)
and started again at once. Reported, median over the failures:

- seconds from the kill to the survivor's next committed step (it keeps its process);
- seconds from the relaunch to the returning group's heal, and to its first committed step;
- steps and samples lost (``dtrain report``: every sample exactly once);
- goodput = samples committed / (the uninterrupted replica job's samples/s x wall-clock);
- the per-step cost of torchft: one group of 2 ranks with and without --fault_tolerance.enable,
  interleaved, and the two-group job against the plain 2-rank job.

benchmarks/goodput.py's "interval only" mode (the workers die without saving, torchrun
restarts the job) runs on the same schedule for the side-by-side figure.

    python benchmarks/replica_failures.py [--budget 180] [--every 60] [--heartbeat-ms 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from replica_groups import group, kill_node, lighthouse  # noqa: E402

from dtrain.report import check_run, format_report  # noqa: E402
from dtrain.rundir import RunDirectory  # noqa: E402

JOB = [
    "--preset",
    "small",
    "--data.points=32",
    "--train.num_epochs=100",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=50",
    "--data.record_indices=true",
]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in RunDirectory(str(run_dir)).read_jsonl("metrics.jsonl") if r.get("kind") == "train"]


def steady_rate(lines: list[dict], batch: int) -> float:
    """Samples per second of wall-clock between consecutive committed steps (median gap)."""
    gaps = [b["time"] - a["time"] for a, b in zip(lines, lines[1:]) if b["step"] == a["step"] + 1]
    return batch / statistics.median(gaps)


def replica_job(args, failures: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="dtrain-replicas-"))
    job = [
        *JOB,
        "--run-dir",
        str(run_dir),
        "--fault_tolerance.group_size=2",
        f"--fault_tolerance.timeout={args.timeout}",
        *args.extra,
    ]
    kills, relaunches = [], []
    with lighthouse(join_timeout_ms=args.heartbeat_ms, heartbeat_timeout_ms=args.heartbeat_ms) as url:
        started = time.time()
        groups = [group(url, i, job, run_dir / f"r{i}.log") for i in (0, 1)]
        try:
            while time.time() - started < args.budget:
                time.sleep(min(args.every, args.budget - (time.time() - started)))
                if failures and time.time() - started < args.budget - 5:
                    kill_node(groups[1])
                    kills.append(time.time())
                    groups[1] = group(url, 1, job, run_dir / "r1.log")
                    relaunches.append(time.time())
            wall = time.time() - started
        finally:
            for process in groups:
                kill_node(process)
    lines, events = train_lines(run_dir), RunDirectory(str(run_dir)).events()
    batch = next(e["global_batch_size"] for e in events if e["event"] == "start")
    committed = max(r["step"] for r in lines) * batch
    to_commit, to_heal, heal_to_commit = [], [], []
    for kill, relaunch in zip(kills, relaunches):
        to_commit.append(min(r["time"] for r in lines if r["time"] > kill) - kill)
        heal = min(
            (e for e in events if e["event"] == "heal" and e["time"] > relaunch), key=lambda e: e["time"], default=None
        )
        if heal is not None:
            to_heal.append(heal["time"] - relaunch)
            heal_to_commit.append(min(r["time"] for r in lines if r["step"] > heal["step"]) - heal["time"])
    # Where the wall-clock went, for the goodput breakdown: the job's own start-up, and the
    # survivor's rate while it trained alone (between its first commit after a kill and the heal).
    alone = [r for kill, heal in zip(kills, to_heal) for r in lines if kill + 2 < r["time"] < kill + heal]
    report = check_run(RunDirectory(str(run_dir)))
    return {
        "run_dir": run_dir,
        "wall": wall,
        "committed": committed,
        "rate": steady_rate(lines, batch),
        "startup": lines[0]["time"] - started,
        "alone_rate": steady_rate(alone, batch) if len(alone) > 2 else None,
        "failures": len(kills),
        "to_commit": to_commit,
        "to_heal": to_heal,
        "heal_to_commit": heal_to_commit,
        "report": report,
        "text": format_report(report),
    }


def step_rate(args, replicas: bool) -> float:
    """Samples/s of one 2-rank group, with or without torchft (a lighthouse of one)."""
    run_dir = Path(tempfile.mkdtemp(prefix="dtrain-overhead-"))
    job = [*JOB, "--run-dir", str(run_dir), f"--train.max_steps={args.overhead_steps}"]
    if replicas:
        with lighthouse(join_timeout_ms=args.heartbeat_ms, heartbeat_timeout_ms=args.heartbeat_ms) as url:
            assert group(url, 0, job, run_dir / "r0.log", nproc=2).wait() == 0
    else:
        subprocess.run(
            [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "dtrain.train", *job],
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    lines = train_lines(run_dir)[5:]  # past the first steps' one-off costs
    return steady_rate(lines, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180, help="wall-clock seconds per failure run")
    parser.add_argument("--every", type=float, default=60, help="seconds between hard failures")
    parser.add_argument("--heartbeat-ms", type=int, default=1000, help="lighthouse heartbeat and join timeout")
    parser.add_argument("--timeout", type=float, default=10, help="--fault_tolerance.timeout")
    parser.add_argument("--overhead-steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead runs")
    parser.add_argument("--no-restart-baseline", action="store_true")
    parser.add_argument("extra", nargs="*", help="more dtrain options (after --)")
    args = parser.parse_args()

    with_ft, without_ft = [], []
    for _ in range(args.rounds):
        without_ft.append(step_rate(args, False))
        with_ft.append(step_rate(args, True))
    calm = replica_job(argparse.Namespace(**{**vars(args), "budget": args.every}), failures=False)
    failing = replica_job(args, failures=True)
    baseline = None
    if not args.no_restart_baseline:
        sys.path.insert(0, str(Path(__file__).parent))
        import goodput

        baseline = goodput.run_mode(
            False,
            argparse.Namespace(budget=args.budget, every=args.every, interval=50, extra=["--data.record_indices=true"]),
        )

    med = lambda xs: f"{statistics.median(xs):.2f}" if xs else "-"  # noqa: E731
    plain_w2, ft_w2 = statistics.median(without_ft), statistics.median(with_ft)
    print(
        f"small preset, 32 points, global batch 64; lighthouse heartbeat/join {args.heartbeat_ms} ms, "
        f"--fault_tolerance.timeout={args.timeout:g}; one SIGKILL every {args.every:g} s for {args.budget:g} s"
    )
    print(
        f"\nper-step cost of torchft, one group of 2 ranks, {args.rounds} interleaved rounds: "
        f"{plain_w2:.0f} samples/s without, {ft_w2:.0f} with ({ft_w2 / plain_w2:.3f}x)"
    )
    print(
        f"2 replica groups x 1 rank, uninterrupted: {calm['rate']:.0f} samples/s "
        f"({calm['rate'] / plain_w2:.3f}x the plain 2-rank FSDP job)"
    )
    goodput = failing["committed"] / (calm["rate"] * failing["wall"])
    print("\n| replica groups (2 x 1 rank) | median of the failures |\n|---|---|")
    print(f"| hard failures (SIGKILL of replica 1) | {failing['failures']} |")
    print(f"| kill -> survivor's next committed step (s) | {med(failing['to_commit'])} |")
    print(f"| relaunch -> returning group healed (s) | {med(failing['to_heal'])} |")
    print(f"| healed -> its first committed step (s) | {med(failing['heal_to_commit'])} |")
    print(f"| steps lost | {failing['report']['steps_lost']} |")
    print(f"| goodput (committed samples / uninterrupted rate x wall) | {goodput:.1%} |")
    # The seconds of full-rate training the failing run did not get, by cause (approximate: the
    # survivor's rate alone is taken from the steady part of its time alone).
    short = failing["wall"] - failing["committed"] / calm["rate"]
    stalls = sum(failing["to_commit"])
    alone = sum(failing["to_heal"]) * (1 - failing["alone_rate"] / calm["rate"]) if failing["alone_rate"] else 0.0
    print(
        f"\nseconds short of the uninterrupted job over {failing['wall']:.0f} s: {short:.1f}, of which the "
        f"job's start-up {failing['startup']:.1f}, the survivor's stalls after the kills {stalls:.1f}, its "
        f"{sum(failing['to_heal']):.1f} s alone at {failing['alone_rate'] or 0:.0f} samples/s (half the "
        f"groups) {alone:.1f}, the rest {short - failing['startup'] - stalls - alone:.1f}"
    )
    if baseline is not None:
        print(
            f"\ntorchrun restart path on the same schedule (goodput.py 'interval only', 2 ranks): "
            f"{baseline['useful']:.1%} useful, {baseline['lost']:.1f} steps lost per failure"
        )
    print("\n" + failing["text"])


if __name__ == "__main__":
    main()
