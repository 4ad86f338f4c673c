"""Elastic jobs across nodes: two real torchrun agents on loopback (launch/elastic.sh) play two
nodes; one is lost and comes back (docs/elastic.md)."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TORCHRUN, read_jsonl
from dtrain.report import check_run
from test_preemption import JOB, ROOT, children, free_port, start, train_steps, wait_for


def node(run_dir, port: int, max_steps: int, log) -> subprocess.Popen:
    """One node: launch/elastic.sh, one worker. Output goes to a file: a pipe nobody reads while
    the job runs would fill and block it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "1:2", "NPROC": "1", "RESTARTS": "5",
           "RDZV_ENDPOINT": f"127.0.0.1:{port}", "JOB_ID": "elastic-test", "RUN_DIR": str(run_dir),
           "RDZV_CONF": "join_timeout=60,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3",
           "PATH": f"{Path(TORCHRUN).parent}:{os.environ['PATH']}"}
    return subprocess.Popen(["bash", str(ROOT / "launch/elastic.sh"), *JOB, f"--train.max_steps={max_steps}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def kill_node(script: subprocess.Popen) -> None:
    """SIGKILL of a whole node: the script, its agent and the workers (torchrun starts each worker
    in a session of its own, so the node's process group does not hold them)."""
    tree, frontier = [], [script.pid]
    while frontier:
        tree += frontier
        frontier = [child for pid in frontier for child in children(pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    script.wait()


def rendezvous_store(port: int) -> subprocess.Popen:
    """The rendezvous store in a process of its own (docs/elastic.md, "Where the store lives"): an
    agent that hosts it takes the whole job down when its node is lost."""
    script = ("import sys, time; from torch.distributed import TCPStore; "
              "store = TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False); "
              "print('ready', flush=True); time.sleep(3600)")
    store = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, text=True)
    assert store.stdout.readline().strip() == "ready"
    return store


def resumes(run_dir) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]


def finish(nodes: dict) -> None:
    for log, script in nodes.items():
        try:
            script.wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not finish:\n" + log.read_text()[-6000:]) from None
        assert script.returncode == 0, log.read_text()[-4000:]


def test_a_node_lost_then_back_shrinks_and_grows_the_job_without_losing_a_sample(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    store = rendezvous_store(port)
    logs = [tmp_path / f"node_{name}.log" for name in ("a", "b", "b_again")]
    nodes = {logs[0]: node(run_dir, port, 300, logs[0]), logs[1]: node(run_dir, port, 300, logs[1])}
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 25)
        kill_node(nodes.pop(logs[1]))
        wait_for(lambda: any(e["world_size"] == 1 for e in resumes(run_dir)))  # the survivor goes on alone
        steps_alone = len(train_steps(run_dir))
        wait_for(lambda: len(train_steps(run_dir)) >= steps_alone + 10)
        nodes[logs[2]] = node(run_dir, port, 300, logs[2])
        finish(nodes)
    finally:
        for script in nodes.values():
            if script.poll() is None:
                kill_node(script)
        store.kill()

    report = check_run(str(run_dir))
    assert [leg["world_size"] for leg in report["legs"]] == [2, 1, 2], report["legs"]
    assert report["legs"][0]["ended"] == "killed"
    assert report["legs"][1]["ended"].startswith("stopped") and report["legs"][1]["lost_steps"] == 0, report
    # 300 steps of 24 samples: 30 epochs of 240, every sample of each exactly once
    assert report["finished"] and report["ok"] and len(report["coverage"]) == 30, report


def test_workers_whose_agent_died_stop_with_a_checkpoint_instead_of_training_on(tmp_path):
    run_dir = tmp_path / "run"
    agent = start([*JOB, "--run-dir", str(run_dir), "--train.num_epochs=1000"],
                  ["--standalone", "--nproc_per_node=2"])
    wait_for(lambda: len(train_steps(run_dir)) >= 8)
    orphans = children(agent.pid)
    os.kill(agent.pid, signal.SIGKILL)  # the agent alone: its workers live in sessions of their own
    agent.wait()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and
                             "zombie" not in open(f"/proc/{pid}/status").read() for pid in orphans), 60)
    stop = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stop"][-1]
    assert stop["reason"] == "AGENT_LOST" and stop["step"] == train_steps(run_dir)[-1]
    assert (run_dir / f"checkpoints/step_{stop['step']:08d}/manifest.json").exists()


def test_a_stopped_rank_is_noticed_within_the_step_timeout_and_the_job_restarts_without_it(tmp_path):
    """SIGSTOP of one worker: the other would wait 600 s in its collective; with --train.step_timeout=3
    it exits, torchrun restarts the group (it waits 30 s for the stopped worker first, then SIGKILLs
    it: torch's, docs/elastic.md), and the job finishes from the last commit with every sample once."""
    run_dir, log = tmp_path / "run", tmp_path / "agent.log"
    agent = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                              "--monitor-interval=1", "-m", "dtrain.train", *JOB, "--run-dir", str(run_dir),
                              "--train.max_steps=60", "--train.step_timeout=3"],
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 8)
        stopped_at = time.monotonic()
        os.kill(children(agent.pid)[1], signal.SIGSTOP)
        wait_for(lambda: "no training step finished" in log.read_text(), 60)
        noticed_after = time.monotonic() - stopped_at
        assert agent.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if agent.poll() is None:
            kill_node(agent)
    assert noticed_after < 20, noticed_after  # 3 s and a step, not the collective's 600 s
    report = check_run(str(run_dir))
    assert [leg["ended"].split()[0] for leg in report["legs"]] == ["killed", "finished"], report["legs"]
    # 60 steps of 24 samples: 6 epochs of 240, every sample of each exactly once
    assert report["finished"] and report["ok"] and len(report["coverage"]) == 6, report
