"""Elastic recovery on loopback: from a node's loss to the first step on fewer nodes, and from its
return to the first step on more, phase by phase, median of several runs.

Two nodes (`launch/elastic.sh`, one worker each, `tiny` preset; the rendezvous store
in a process of its own, tests/loopback_nodes.py). Each run trains on both nodes,
SIGKILLs node B (its agent and worker), lets node A go on alone, then starts B
again, waits for the job to run on both nodes, then freezes B (SIGSTOP of its agent and
worker: a node that hangs rather than dies) and ends when A goes on alone. The phases come from the
marks in the run's events (dtrain/startup.py), the agent's own log line for the
failed worker, and this script's clock:

  loss:   kill -> A's agent saw its worker fail -> A's new worker started
          (rendezvous, spawn) -> imported -> process group -> checkpoint loaded
          (plan, model, verify, load) -> first step done
  return: B started -> A's worker asked to stop (B's agent starts and joins, A's
          agent sees it waiting) -> A's checkpoint committed and the stop logged ->
          new worker started (exit, rendezvous on two nodes, spawn) -> imported ->
          process group -> checkpoint loaded -> first step done
  hang:   freeze -> A's worker exited (no heartbeat from B for --heartbeat seconds,
          dtrain/heartbeat.py, whatever A was doing) -> new worker started (B dropped
          from the rendezvous by its keep-alive) -> imported -> process group ->
          checkpoint loaded -> first step done

    python benchmarks/elastic.py [--runs 3] [--steps 30] [--heartbeat 5]
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loopback_nodes import free_port, kill_node, kill_nodes, node, rendezvous_store, wait_for  # noqa: E402

from dtrain.rundir import EVENTS, METRICS, RunDirectory  # noqa: E402

JOB = [
    "--preset",
    "tiny",
    "--train.global_batch_size=24",
    "--data.train_samples=240",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=10",
    "--train.max_steps=100000",
]
STARTING = ["new worker started", "imported", "process group", "checkpoint loaded", "first step done"]
LOSS = ["agent saw its worker fail", *STARTING]
RETURN = ["A's worker asked to stop", "checkpoint committed, stopped", *STARTING]
HANG = ["A's worker exited", *STARTING]
# torchrun's own log line for a failed worker: "E1203 12:55:40.412000 3173 ... failed (exitcode: 1)"
FAILED_LINE = re.compile(r"^E(\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .*failed \(exitcode")


def failed_worker_times(log: Path) -> list[float]:
    year = datetime.date.today().year
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if m := FAILED_LINE.match(line):
            month, day, hour, minute, second = m.groups()
            stamp = datetime.datetime(year, int(month), int(day), int(hour), int(minute))
            times.append(stamp.timestamp() + float(second))  # torchrun logs local time
    return times


def one_run(steps: int, heartbeat: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dtrain-elastic-"))
    run = RunDirectory(str(work / "run"))
    port = free_port()
    store = rendezvous_store(port)
    logs = {name: work / f"{name}.log" for name in ("a", "b", "b_again")}
    job = [*JOB, f"--train.heartbeat_timeout={heartbeat:g}"]
    nodes = {name: node(work / "run", port, job, logs[name], job_id="elastic-bench") for name in ("a", "b")}

    def train():
        return [r for r in run.read_jsonl(METRICS) if r.get("kind") == "train"] if run.exists(METRICS) else []

    def leg_on(world_size: int, after: float):
        legs = [
            e
            for e in run.read_jsonl(EVENTS)
            if e["event"] in ("start", "resume") and e["world_size"] == world_size and e["time"] > after
        ]
        return legs[-1] if legs else None

    def first_step(leg) -> float | None:
        times = [r["time"] for r in train() if r["leg"] == leg["leg"]]
        return min(times) if times else None

    def on_both() -> bool:  # A may start alone and grow when B joins a moment later
        legs = [e for e in run.read_jsonl(EVENTS) if e["event"] in ("start", "resume")] if run.exists(EVENTS) else []
        return bool(legs) and legs[-1]["world_size"] == 2 and sum(r["leg"] == legs[-1]["leg"] for r in train()) >= steps

    try:
        wait_for(on_both, 180)
        killed = time.time()
        kill_node(nodes.pop("b"))
        wait_for(lambda: leg_on(1, killed) is not None and first_step(leg_on(1, killed)) is not None, 180)
        alone = leg_on(1, killed)
        done = len(train())
        wait_for(lambda: len(train()) >= done + steps, 180)
        returned = time.time()
        nodes["b_again"] = node(work / "run", port, job, logs["b_again"], job_id="elastic-bench")
        wait_for(lambda: leg_on(2, returned) is not None and first_step(leg_on(2, returned)) is not None, 180)
        again = leg_on(2, returned)
        wait_for(on_both, 180)
        frozen = time.time()
        kill_node(nodes["b_again"], signal.SIGSTOP)
        wait_for(lambda: leg_on(1, frozen) is not None and first_step(leg_on(1, frozen)) is not None, 180)
        alone_again = leg_on(1, frozen)
    finally:
        kill_nodes(nodes.values())
        store.kill()
    events = run.read_jsonl(EVENTS)
    failed = min(t for t in failed_worker_times(logs["a"]) if t >= killed)
    gave_up = min(t for t in failed_worker_times(logs["a"]) if t >= frozen)
    stop = next(e for e in events if e["event"] == "stop" and e["time"] > returned)
    commit = max(e["time"] for e in events if e["event"] == "checkpoint" and e["step"] == stop["step"])
    asked = stop.get("requested") or stop["agreed"]  # rank 0 is on A, which its agent signals

    def starting(leg):
        m = leg["startup"]
        return [m["process"], m["imported"], m["group"], m["restored"], first_step(leg)]

    def phases(names, marks):
        return {name: b - a for name, a, b in zip(names, marks, marks[1:])} | {"total": marks[-1] - marks[0]}

    result = {
        "loss": phases(LOSS, [killed, failed, *starting(alone)]),
        "return": phases(RETURN, [returned, asked, max(commit, stop["time"]), *starting(again)]),
        "hang": phases(HANG, [frozen, gave_up, *starting(alone_again)]),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="steps before the loss and before the return")
    parser.add_argument("--heartbeat", type=float, default=5, help="--train.heartbeat_timeout (seconds)")
    args = parser.parse_args()
    runs = [one_run(args.steps, args.heartbeat) for _ in range(args.runs)]
    print(f"2 nodes on loopback (launch/elastic.sh, 1 worker each, tiny preset), median of {args.runs} runs, seconds")
    for case, names, title in (
        ("loss", LOSS, "node B lost -> first step on A alone"),
        ("return", RETURN, "node B back -> first step on both"),
        ("hang", HANG, f"node B frozen -> first step on A alone (--train.heartbeat_timeout={args.heartbeat:g})"),
    ):
        print(f"\n| {title} | median | runs |\n|---|---|---|")
        for name in [*names, "total"]:
            values = [r[case][name] for r in runs]
            print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
