"""Goodput under preemption: save-on-signal against interval-only checkpointing, side by side.

The same 2-rank job (`small` preset) is preempted every T seconds: SIGTERM to the
torchrun agent, as a node's shutdown notice does; the agent passes it to the
workers and gives them 30 s. With save-on-signal (the default) the workers save at
the next step boundary and exit 75; with `--checkpoint.save_on_signal=false`
they die at once and fall back to the last interval checkpoint. Each is
restarted at once, until the time budget is spent (the last leg is preempted too).

Reports the useful-step fraction of wall-clock (surviving steps x mean steady step
time / wall), steps lost per preemption, and where the seconds of a preemption
go, phase by phase (median over the preemptions), from the marks each leg's
events record (dtrain/startup.py): signal -> agreed stop -> save committed ->
stopped -> exited -> agent started the worker -> imports -> process group ->
plan -> model built -> checkpoint verified and loaded -> first step; and the
seconds a leg spends beside its steps (interval saves, from their checkpoint events; the
rest is logging and the per-step stop agreement).

    python benchmarks/goodput.py [--budget 150] [--every 25] [--interval 50] [--modes both]
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
from dtrain.rundir import EVENTS, METRICS, RunDirectory

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
STOPPING = ["signal -> agreed stop", "agreed -> save committed", "committed -> stopped", "stopped -> exited"]
STARTING = [
    "launch -> worker started",
    "worker started -> imported",
    "imported -> process group",
    "process group -> planned",
    "planned -> model built",
    "built -> checkpoint loaded",
    "loaded -> first step done",
]
BESIDE = ["beside the steps, per minute", "of which interval saves (the loop blocked), per minute"]


def run_mode(save_on_signal: bool, args) -> dict:
    run_dir = tempfile.mkdtemp(prefix="dtrain-goodput-")
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dtrain.train",
        "--run-dir",
        run_dir,
        "--preset",
        "small",
        "--data.points=32",
        "--train.num_epochs=100",
        "--train.log_interval=1",
        "--train.eval_interval=0",
        f"--checkpoint.interval_steps={args.interval}",
        f"--checkpoint.save_on_signal={str(save_on_signal).lower()}",
        *args.extra,
    ]
    legs, spent = [], 0.0  # per launch: launched, signalled, exited (wall-clock)
    while spent < args.budget:
        started = time.time()
        agent = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        signalled = None
        try:
            agent.wait(timeout=min(args.every, args.budget - spent))
        except subprocess.TimeoutExpired:
            signalled = time.time()
            agent.send_signal(signal.SIGTERM)
            agent.wait()
        legs.append({"launched": started, "signalled": signalled, "exited": time.time()})
        spent += time.time() - started
    run = RunDirectory(run_dir)
    report = check_run(run)
    committed = run.catalog().scan().committed
    survived = committed[-1].step if committed else 0
    train = [r for r in run.read_jsonl(METRICS) if r["kind"] == "train"]
    events = run.read_jsonl(EVENTS)
    # A step's own time (its forward, backward and update), averaged over the steady steps: each
    # leg's first steps pay one-off costs, counted as start-up below.
    first_steps = {}
    for r in train:
        first_steps.setdefault(r["leg"], []).append(r["step"])
    steady = [r for r in train if r["step"] > min(first_steps[r["leg"]]) + 2]
    batch = next(e["global_batch_size"] for e in events if e["event"] in ("start", "resume"))
    step_time = statistics.mean(batch / r["samples_per_s"] for r in steady)
    lost = [leg["lost_steps"] for leg in report["legs"][:-1]]
    lost.append(max(report["legs"][-1]["last_step"] - survived, 0))
    phases = {name: [] for name in STOPPING + STARTING + BESIDE}
    begins = [e for e in events if e["event"] in ("start", "resume")]
    for begin in begins:
        launch = max((leg for leg in legs if leg["launched"] <= begin["time"]), key=lambda leg: leg["launched"])
        times = sorted(r["time"] for r in train if r["leg"] == begin["leg"])
        marks = begin.get("startup", {})
        starting = [
            launch["launched"],
            marks.get("process"),
            marks.get("imported"),
            marks.get("group"),
            marks.get("planned"),
            marks.get("built"),
            marks.get("restored"),
            times[0] if times else None,
        ]
        for name, a, b in zip(STARTING, starting, starting[1:]):
            if a is not None and b is not None:
                phases[name].append(b - a)
        if len(times) > 10:  # steady running: wall-clock of the steps against their step time
            beside = (times[-1] - times[0]) - (len(times) - 1) * step_time
            saving = sum(
                e["blocked_s"] for e in events if e["event"] == "checkpoint" and times[0] < e["time"] <= times[-1]
            )
            phases[BESIDE[0]].append(60 * beside / (times[-1] - times[0]))
            phases[BESIDE[1]].append(60 * saving / (times[-1] - times[0]))
        stop = next(
            (e for e in events if e["event"] == "stop" and e["time"] > begin["time"] and e["time"] <= launch["exited"]),
            None,
        )
        if stop is None or launch["signalled"] is None:
            continue
        agreed = stop.get("agreed")
        commit = max(
            (
                e["time"]
                for e in events
                if e["event"] == "checkpoint" and e["step"] == stop["step"] and e["time"] <= stop["time"]
            ),
            default=None,
        )
        if commit is not None and agreed is not None:
            commit = max(commit, agreed)  # the stop fell on an interval save's step: nothing more to save
        stopping = [launch["signalled"], agreed, commit, stop["time"], launch["exited"]]
        for name, a, b in zip(STOPPING, stopping, stopping[1:]):
            if a is not None and b is not None:
                phases[name].append(b - a)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall": spent,
        "preemptions": len(legs),
        "survived": survived,
        "step_time": step_time,
        "useful": survived * step_time / spent,
        "reported": report["goodput"],  # `dtrain report`'s figure for the same run (dtrain/goodput.py)
        "lost": statistics.mean(lost),
        "phases": {name: statistics.median(v) if v else None for name, v in phases.items()},
    }


FLOOR = """
import time, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
model = fully_shard(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
model(torch.ones(8, 64)).sum().backward()
dist.barrier()
if dist.get_rank() == 0:
    print(time.time(), flush=True)
dist.destroy_process_group()
"""


def restart_floor(runs: int = 3) -> float:
    """Seconds from launching torchrun to a first FSDP2 step of a two-layer model, without dtrain:
    what any restart costs on this machine (agent start, rendezvous, imports, group, FSDP's first use)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(FLOOR)
    seconds = []
    for _ in range(runs):
        started = time.time()
        done = subprocess.run(
            [TORCHRUN, "--standalone", "--nproc_per_node=2", f.name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"the restart-floor job failed:\n{done.stderr[-2000:]}")
        seconds.append(float(done.stdout.split()[-1]) - started)
    os.unlink(f.name)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150, help="wall-clock seconds per mode")
    parser.add_argument("--every", type=float, default=25, help="seconds between preemptions")
    parser.add_argument("--interval", type=int, default=50, help="checkpoint.interval_steps")
    parser.add_argument("--modes", choices=["both", "signal", "interval"], default="both")
    parser.add_argument("extra", nargs="*", help="more dtrain options for both modes (after --)")
    args = parser.parse_args()
    modes = {"save on signal": True, "interval only": False}
    if args.modes != "both":
        modes = {name: flag for name, flag in modes.items() if flag == (args.modes == "signal")}
    results = {name: run_mode(flag, args) for name, flag in modes.items()}
    floor = restart_floor()
    print(
        f"2 ranks, small preset, preempted every {args.every:g} s, {args.budget:g} s per mode, "
        f"checkpoint every {args.interval} steps {' '.join(args.extra)}"
    )
    print(
        "| mode | preemptions | steps kept | step (s) | useful fraction of wall-clock | steps lost per preemption "
        "| `dtrain report`: goodput, wall (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        reported = r["reported"]
        print(
            f"| {name} | {r['preemptions']} | {r['survived']} | {r['step_time']:.3f} | {r['useful']:.1%} | "
            f"{r['lost']:.1f} | {reported['goodput']:.1%}, {reported['wall_s']:.0f} of {r['wall']:.0f} |"
        )
    print()
    print("| phase (s, median) | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for phase in STOPPING + STARTING + BESIDE:
        cells = [f"{r['phases'][phase]:.2f}" if r["phases"][phase] is not None else "-" for r in results.values()]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    print(f"\nwithout dtrain, torchrun launch -> first FSDP2 step of a 2-layer model: {floor:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
