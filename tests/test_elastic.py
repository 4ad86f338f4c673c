"""Elastic jobs across nodes: real torchrun agents on loopback (launch/elastic.sh) play three
nodes, which are lost and come back; and a hung rank (docs/elastic.md)."""

import os
import signal
import subprocess
import time

from conftest import TORCHRUN, paced, read_jsonl
from loopback_nodes import children, free_port, kill_node, kill_nodes, node, rendezvous_store, wait_for
from test_preemption import JOB, start, train_steps

from dtrain.report import check_run


def resumes(run_dir) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]


def finish(nodes: dict) -> None:
    for log, script in nodes.items():
        try:
            script.wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not finish:\n" + log.read_text()[-6000:]) from None
        assert script.returncode == 0, log.read_text()[-4000:]


def test_workers_whose_agent_died_stop_with_a_checkpoint_instead_of_training_on(tmp_path):
    run_dir = tmp_path / "run"
    agent = start([*JOB, "--run-dir", str(run_dir), "--train.num_epochs=1000"], ["--standalone", "--nproc_per_node=2"])
    wait_for(lambda: len(train_steps(run_dir)) >= 8)
    orphans = children(agent.pid)
    os.kill(agent.pid, signal.SIGKILL)  # the agent alone: its workers live in sessions of their own
    agent.wait()
    wait_for(
        lambda: (
            not any(
                os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read() for pid in orphans
            )
        ),
        60,
    )
    stop = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stop"][-1]
    assert stop["reason"] == "AGENT_LOST" and stop["step"] == train_steps(run_dir)[-1]
    assert (run_dir / f"checkpoints/step_{stop['step']:08d}/manifest.json").exists()


def test_three_nodes_lose_two_one_after_the_other_and_grow_back_without_losing_a_sample(tmp_path):
    """Each loss shrinks the job (3 -> 2 -> 1 nodes) and the survivors' leg ends in a stop that loses
    no step; each node that comes back grows it by one (1 -> 2 -> 3). A two-node job losing a node
    and getting it back is this path once: this run takes it twice each way. Steps are paced (10 a
    second) so that the job is still running when each node comes back."""
    run_dir, port = tmp_path / "run", free_port()
    store = rendezvous_store(port)
    args = [*JOB, "--train.max_steps=150"]
    log = {name: tmp_path / f"node_{name}.log" for name in ("a", "b", "c", "b_again", "c_again")}
    pace = paced(0.1)
    start_node = lambda name: node(run_dir, port, args, log[name], nnodes="1:3", env=pace)  # noqa: E731
    nodes = {name: start_node(name) for name in ("a", "b", "c")}
    try:
        for lost, world_size in (("c", 2), ("b", 1)):
            steps = len(train_steps(run_dir))
            wait_for(lambda: len(train_steps(run_dir)) >= steps + 10)
            kill_node(nodes.pop(lost))
            wait_for(lambda: any(e["world_size"] == world_size for e in resumes(run_dir)))
        for back in ("b_again", "c_again"):
            steps, legs = len(train_steps(run_dir)), len(resumes(run_dir))
            wait_for(lambda: len(train_steps(run_dir)) >= steps + 5)
            nodes[back] = start_node(back)
            wait_for(lambda: len(resumes(run_dir)) > legs)  # the job grew: checked below, leg by leg
        finish({log[name]: script for name, script in nodes.items()})
    finally:
        kill_nodes(nodes.values())
        store.kill()

    report = check_run(str(run_dir))
    sizes = [leg["world_size"] for leg in report["legs"]]
    assert sizes == [3, 2, 1, 2, 3], report["legs"]
    assert [leg["ended"] for leg in report["legs"][:2]] == ["killed", "killed"], report["legs"]
    assert all(leg["ended"].startswith("stopped") and leg["lost_steps"] == 0 for leg in report["legs"][2:-1])
    # 150 steps of 24 samples: 15 epochs of 240, every sample of each exactly once
    assert report["finished"] and report["ok"] and len(report["coverage"]) == 15, report


def test_a_stopped_rank_is_noticed_within_the_heartbeat_timeout_and_the_job_restarts_without_it(tmp_path):
    """SIGSTOP of one worker: the other would wait 600 s in its collective; with
    --train.heartbeat_timeout=3 it exits, whether it was in a step or a save (there is one every
    step here), torchrun restarts the group (it waits 30 s for the stopped worker first, then
    SIGKILLs it: torch's, docs/elastic.md), and the job finishes from the last commit with every
    sample once."""
    run_dir, log = tmp_path / "run", tmp_path / "agent.log"
    agent = subprocess.Popen(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            "-m",
            "dtrain.train",
            *JOB,
            "--run-dir",
            str(run_dir),
            "--train.max_steps=60",
            "--checkpoint.interval_steps=1",
            "--train.heartbeat_timeout=3",
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 8)
        stopped_at = time.monotonic()
        os.kill(children(agent.pid)[1], signal.SIGSTOP)
        wait_for(lambda: "rank 0: no heartbeat from rank 1" in log.read_text(), 60)
        noticed_after = time.monotonic() - stopped_at
        assert agent.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        kill_nodes([agent])
    assert noticed_after < 20, noticed_after  # 3 s and two beats, not the collective's 600 s
    report = check_run(str(run_dir))
    assert [leg["ended"].split()[0] for leg in report["legs"]] == ["killed", "finished"], report["legs"]
    # 60 steps of 24 samples: 6 epochs of 240, every sample of each exactly once
    assert report["finished"] and report["ok"] and len(report["coverage"]) == 6, report
