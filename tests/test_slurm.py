"""launch/slurm.sbatch on a real SLURM cluster on loopback (munged, slurmctld, slurmd).

One job's life, as a spot cluster gives it: the time-limit notice
(``--signal=B:USR1@90``, the limit shortened to 2 minutes), a requeue onto fewer CPUs, a
preemption-style SIGTERM to the step (``scancel --signal=TERM``), a requeue onto
more CPUs, and the end. Every stop saves with 0 steps lost; every requeue resumes from that
save on its own number of ranks; every sample of every epoch is seen exactly once.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import dtrain_tool, paced, read_jsonl
from slurm_cluster import Cluster, missing

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "SLURM available")
REPO = Path(__file__).resolve().parents[1]
# Steps paced to 10 a second (helpers/paced): leg 1 waits for its notice, leg 2 for the test's
# SIGTERM, asleep rather than training on the cores the other tests need.
PACE = paced(0.1)
STEPS = 600  # tiny preset: 2x what leg 1 can train before its notice (230 seen, 300 at most); 12 epochs of 800


def cpus(count):
    """``scontrol update`` fields that give a pending job ``count`` CPUs on its node."""
    return [f"CPUsPerTask={count}", f"MinCPUsNode={count}", f"NumCPUs={count}"]


def wait_for(what, condition, timeout, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    logs = "".join(p.read_text()[-1500:] for p in sorted(cluster.dir.glob("*.out")))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def test_a_job_out_of_time_shrunk_and_preempted_finishes_with_every_sample_once(tmp_path):
    run_dir = tmp_path / "run"
    with Cluster(tmp_path / "slurm", cpus=2) as cluster:
        cluster.env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", **PACE)
        submitted = cluster.run(
            "sbatch",
            "--cpus-per-task=2",
            "--time=10",
            "--signal=B:USR1@90",
            "--chdir",
            str(REPO),
            "--output",
            str(cluster.dir / "job.out"),
            str(REPO / "launch/slurm.sbatch"),
            "--preset",
            "tiny",
            f"--train.max_steps={STEPS}",
            "--data.train_samples=800",
            "--train.eval_interval=0",
            "--train.log_interval=10",
            "--checkpoint.interval_steps=0",
            "--data.record_indices=true",
        )
        job = submitted.stdout.split()[-1]
        state = lambda: cluster.job(job)  # noqa: E731

        def trained_steps():
            rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            return rows[-1]["step"] if rows else 0

        def legs_started():
            events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
            return sum(e["event"] in ("start", "resume") for e in events)

        def requeued(count):
            def check():
                s = state()
                return (
                    s if s["JobState"] == "PENDING" and s.get("Restarts", s.get("RestartCnt")) == str(count) else None
                )

            return check

        # Leg 1, 2 ranks: once it trains, its time limit becomes 2 minutes, so the notice (90 s
        # before the end) comes about 30 s after the start. (Submitting with --time=2 does the same,
        # but SLURM may send the notice up to 60 s early: before the first step.)
        wait_for("training to start", lambda: trained_steps() >= 50, 120, cluster)
        cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=2")
        wait_for("the first requeue", requeued(1), 150, cluster)
        cluster.run("scontrol", "update", f"JobId={job}", *cpus(1), "TimeLimit=10")
        # Leg 2, 1 rank: preempted once it has trained 50 steps.
        resumed_at = wait_for("the second start", lambda: legs_started() == 2 and trained_steps(), 150, cluster)
        wait_for("leg 2 to train", lambda: trained_steps() >= resumed_at + 50, 120, cluster)
        cluster.run("scancel", "--signal=TERM", job)
        wait_for("the second requeue", requeued(2), 90, cluster)
        cluster.run("scontrol", "update", f"JobId={job}", *cpus(2))
        # Leg 3, 2 ranks: runs to the end.
        final = wait_for(
            "the job to end",
            lambda: state() if state()["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None,
            300,
            cluster,
        )
        output = (cluster.dir / "job.out").read_text()

    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", output[-3000:]
    assert "SIGTERM (preemption)" not in output  # the step's SIGTERM never reached the batch shell
    assert output.count("checkpoint committed (exit 75); requeueing") == 2
    assert output.index("time-limit notice") < output.index("start 1:")  # leg 1 ended on the notice
    report = json.loads(dtrain_tool("report", str(run_dir), "--json").stdout)
    legs = report["legs"]
    assert [leg["world_size"] for leg in legs] == [2, 1, 2], legs
    assert [leg["ended"] for leg in legs[:2]] == ["stopped (SIGTERM)"] * 2
    assert report["finished"] and report["steps_lost"] == 0 and report["ok"], report
    assert [legs[i + 1]["from_step"] for i in range(2)] == [legs[i]["last_step"] for i in range(2)]
    assert len(report["coverage"]) == STEPS * 16 // 800
    events = read_jsonl(run_dir / "events.jsonl")
    stops = [e for e in events if e["event"] == "stop"]
    saves = {e["step"] for e in events if e["event"] == "checkpoint" and "preempted" in e["tags"]}
    assert len(stops) == 2 and {e["step"] for e in stops} <= saves


def test_replica_groups_under_slurm_heal_a_crashed_group_in_place(tmp_path):
    """launch/slurm-replicas.sbatch: the lighthouse and two replica groups as SLURM tasks. One
    group's processes are SIGKILLed: its task starts it again, it heals, the job completes."""
    pytest.importorskip("torchft")
    run_dir = tmp_path / "run"
    with Cluster(tmp_path / "slurm", cpus=2) as cluster:
        cluster.env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", RUST_LOG="warn", **PACE)
        submitted = cluster.run(
            "sbatch",
            "--ntasks=2",
            "--cpus-per-task=1",
            "--chdir",
            str(REPO),
            "--output",
            str(cluster.dir / "job.out"),
            str(REPO / "launch/slurm-replicas.sbatch"),
            "--preset",
            "tiny",
            # 400 paced steps, 40 s: the crashed group's restart through srun must find the
            # survivor still running (300 unpaced steps, about 8 s, once did not).
            "--data.train_samples=6400",
            "--train.global_batch_size=16",
            "--train.max_steps=0",
            "--train.num_epochs=1",
            "--train.eval_interval=0",
            "--train.log_interval=1",
            "--data.record_indices=true",
            "--fault_tolerance.timeout=3",
        )
        job = submitted.stdout.split()[-1]

        def step():
            rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
            return rows[-1]["step"] if rows else 0

        def joined(replica_id):  # written after its first quorum
            return any(e.get("replica_id") == replica_id for e in read_jsonl(run_dir / "events.jsonl"))

        wait_for("both groups to train", lambda: joined(1) and step() >= 20, 120, cluster)
        killed_at = time.time()
        # This job's group 1 only (its run directory is in the command line): other tests' replica
        # groups may be running beside it.
        group_1 = re.escape(f"--run-dir {run_dir} --fault_tolerance.enable=true --fault_tolerance.replica_id=1")
        subprocess.run(["pkill", "-KILL", "-f", group_1], check=True)
        final = wait_for(
            "the job to end",
            lambda: (
                cluster.job(job)
                if cluster.job(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                else None
            ),
            240,
            cluster,
        )
        output = (cluster.dir / "job.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", output[-3000:]
    assert "dtrain: replica group 1 exited" in output and "starting it again to heal" in output
    events = read_jsonl(run_dir / "events.jsonl")
    # Replica 1 heals after its crash. Replica 0 may heal too: a group that a loaded machine stalls
    # past the 3 s timeout is left out of a quorum, and finds itself behind when it comes back.
    assert 1 in {e["replica_id"] for e in events if e["event"] == "heal" and e["time"] > killed_at}
    assert sorted(e["replica_id"] for e in events if e["event"] == "end") == [0, 1]
    # Through the installed console script once (the other tests run the tools in-process).
    result = subprocess.run(["dtrain", "report", str(run_dir)], capture_output=True, text=True)
    assert "0 repeated, 0 missing: exactly once" in result.stdout and result.stdout.endswith("OK\n"), result.stdout
