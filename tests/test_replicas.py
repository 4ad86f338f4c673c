"""Replica groups on torchft (docs/fault-tolerance.md): a real lighthouse and real torchrun groups.

The survivors of a lost group keep their processes and commit again within seconds; a group that
comes back heals from a live peer; every sample of every epoch is trained exactly once."""

import http.server
import io
import math
import os
import pickle
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import dtrain_tool, launch, paced, read_jsonl
from loopback_nodes import children, kill_nodes
from replica_groups import committed_step, group, kill_node, lighthouse, wait_for

pytest.importorskip("torchft")
from dtrain.replicas import PeerStateTransport  # noqa: E402

ARGS = [
    "--preset",
    "tiny",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--data.record_indices=true",
    "--data.train_samples=4800",
    "--train.global_batch_size=16",
    "--train.max_steps=0",
    "--train.num_epochs=1",
    "--checkpoint.interval_steps=40",
    "--fault_tolerance.group_size=3",
    "--fault_tolerance.timeout=3",
]
# Groups step at most 10 times a second: a survivor waiting for a peer's restart waits asleep, and
# a run's length in steps is room in seconds, whatever else the machine runs (helpers/paced).
PACE = paced(0.1)


def report(run_dir):
    result = dtrain_tool("report", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def replica_events(run_dir, replica_id, kind=None):
    return [
        e
        for e in read_jsonl(run_dir / "events.jsonl")
        if e.get("replica_id") == replica_id and (kind is None or e["event"] == kind)
    ]


def finish(processes, timeout=240):
    for process in processes:
        assert process.wait(timeout=timeout) == 0


def test_survivor_keeps_training_and_a_returning_group_heals(tmp_path, nproc=1):
    """Replica 1 starts late, before any checkpoint, and heals at its start from a fresh state that
    has already evaluated step 0; later it is SIGKILLed, comes back and heals again. The survivor
    never restarts, and the losses are a plain run's."""
    run_dir = tmp_path / "run"
    # 500 paced steps, 50 s: room for two start-ups of replica 1 (one took 12 s on a loaded
    # machine), and no checkpoint before the end, so both heals come from step 0.
    longer = ["--data.train_samples=8000", "--checkpoint.interval_steps=4000"]
    args = [*ARGS, "--run-dir", str(run_dir), *longer]
    with lighthouse() as url:
        r0 = group(url, 0, args, tmp_path / "r0.log", nproc, env=PACE)
        r1 = None
        try:
            wait_for(lambda: committed_step(run_dir) >= 5)
            r1 = group(url, 1, args, tmp_path / "r1.log", nproc, env=PACE)
            wait_for(lambda: replica_events(run_dir, 1))
            wait_for(lambda: committed_step(run_dir) >= 15)
            workers = children(r0.pid)
            kill_node(r1)  # the whole tree: script, torchrun agent, workers
            killed_at = committed_step(run_dir)
            wait_for(lambda: committed_step(run_dir) >= killed_at + 3, timeout=60)
            assert children(r0.pid) == workers  # the survivor was never restarted
            r1 = group(url, 1, args, tmp_path / "r1.log", nproc, env=PACE)
            finish([r0, r1])
        finally:
            kill_nodes([r for r in (r0, r1) if r is not None])
    first, heal = replica_events(run_dir, 1, "heal")
    assert first["from_step"] == 0 and first["step"] >= 5
    assert heal["from_step"] == 0 and heal["step"] > killed_at
    assert len(replica_events(run_dir, 0, "start")) == 1 and not replica_events(run_dir, 0, "heal")
    ends = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "end"]
    assert len(ends) == 2 and ends[0]["weights_digest"] == ends[1]["weights_digest"]
    assert ends[0]["step"] == 500
    assert_exactly_once(run_dir, samples=8000)
    # The same losses as one process without torchft, up to float order (sums in another order:
    # at most 3.5e-7 of the loss in every run measured). One sample more or fewer in a batch of 16,
    # a wrong scale, or a step on stale weights (a healed group's first forward once used the
    # weights its step-0 evaluation had gathered: 3% here) moves a step's loss by percents.
    plain = tmp_path / "plain"
    assert launch([*ARGS[:-2], "--run-dir", str(plain), *longer]).returncode == 0
    expected = {r["step"]: r["loss"] for r in read_jsonl(plain / "metrics.jsonl") if r["kind"] == "train"}
    got = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert got.keys() == expected.keys()
    drift, step = max((abs(got[s] - expected[s]) / abs(expected[s]), s) for s in got)
    assert drift <= 1e-5, f"step {step}: loss {got[step]} against {expected[step]} without torchft"


def assert_exactly_once(run_dir, samples=4800):
    """``dtrain report`` finds every sample of epoch 0 once (the whole epoch unless samples is None)."""
    text = report(run_dir)
    assert text.endswith("OK\n") and " 0 repeated, 0 missing: exactly once" in text, text
    assert samples is None or f"epoch 0: {samples} samples" in text, text


def test_two_groups_of_two_ranks_survive_a_kill_then_sigterm_to_all_saves_once_and_any_shape_resumes(tmp_path):
    """2 groups x 2 ranks (FSDP2 inside each): SIGKILL of one group, which comes back and heals;
    then SIGTERM to both; then the job starts again as 1 group of 1 rank from the checkpoint."""
    run_dir = tmp_path / "run"
    # 500 paced steps, 50 s: room for replica 1's restart on a loaded machine.
    args = [*ARGS, "--run-dir", str(run_dir), "--data.train_samples=8000"]
    with lighthouse() as url:
        r0 = group(url, 0, args, tmp_path / "r0.log", 2, env=PACE)
        r1 = group(url, 1, args, tmp_path / "r1.log", 2, env=PACE)
        try:
            wait_for(lambda: replica_events(run_dir, 1))
            wait_for(lambda: committed_step(run_dir) >= 10)
            workers = children(r0.pid)
            kill_node(r1)
            at = committed_step(run_dir)
            wait_for(lambda: committed_step(run_dir) >= at + 3, timeout=60)
            assert children(r0.pid) == workers
            r1, restarted = group(url, 1, args, tmp_path / "r1.log", 2, env=PACE), time.time()
            # Its heal after the restart (a group that came up late also healed at its first start).
            healed = lambda: [e for e in replica_events(run_dir, 1, "heal") if e["time"] > restarted]  # noqa: E731
            wait_for(healed, timeout=120)
            wait_for(lambda: committed_step(run_dir) >= healed()[0]["step"] + 3)
            for process in (r0, r1):
                kill_node(process, signal.SIGTERM)
            for process in (r0, r1):
                process.wait(timeout=60)
        finally:
            kill_nodes([r0, r1])
    # Groups signalled in the same step stop together and the writer saves; a group signalled
    # first leaves alone, and the last one saves: either way the newest checkpoint is the end.
    stops = [replica_events(run_dir, i, "stop")[-1] for i in (0, 1)]
    assert all(stop["reason"] == "SIGTERM" for stop in stops)
    ends = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stop"]
    if ends[0]["step"] == ends[1]["step"]:  # stopped together: the same weights
        assert ends[0]["weights_digest"] == ends[1]["weights_digest"]
    saves = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    last = max(e["step"] for e in saves)
    assert last == max(stop["step"] for stop in stops)
    with lighthouse() as url:  # the next start: one group of one rank
        assert group(url, 0, [*args, "--fault_tolerance.group_size=1"], tmp_path / "again.log").wait(240) == 0
    assert f"resuming from step_{last:08d}" in (tmp_path / "again.log").read_text()
    assert_exactly_once(run_dir, samples=8000)


def test_three_groups_lose_a_killed_one_and_a_frozen_one_that_heal_sigterm_to_one_and_the_lighthouse(tmp_path):
    """Three groups: one is SIGKILLed, one frozen (SIGSTOP); both come back and heal. SIGTERM to
    one group: it leaves without a save and the others train on. The lighthouse is lost: every
    group stops in one line, nothing torn."""
    run_dir = tmp_path / "run"
    # A woken group's quorum call timed out while it was frozen: it needs a retry.
    args = [
        *ARGS,
        "--run-dir",
        str(run_dir),
        "--data.train_samples=96000",  # never reached: the lighthouse is lost first
        "--fault_tolerance.quorum_timeout=3",
        "--fault_tolerance.quorum_retries=2",
    ]
    logs = [tmp_path / f"r{i}.log" for i in range(3)]
    with lighthouse() as url:
        groups = [group(url, i, args, logs[i], env=PACE) for i in range(3)]
        try:
            wait_for(lambda: all(replica_events(run_dir, i) for i in (1, 2)))
            wait_for(lambda: committed_step(run_dir) >= 10)
            workers = children(groups[0].pid)
            kill_node(groups[1])
            at = committed_step(run_dir)
            wait_for(lambda: committed_step(run_dir) >= at + 3, timeout=60)
            kill_node(groups[2], signal.SIGSTOP)  # frozen: dropped within the timeout
            at = committed_step(run_dir)
            wait_for(lambda: committed_step(run_dir) >= at + 3, timeout=60)
            groups[1], restarted = group(url, 1, args, logs[1], env=PACE), time.time()
            wait_for(lambda: [e for e in replica_events(run_dir, 1, "heal") if e["time"] > restarted], timeout=60)
            kill_node(groups[2], signal.SIGCONT)  # it finds itself behind and heals too
            woken = time.time()
            wait_for(lambda: [e for e in replica_events(run_dir, 2, "heal") if e["time"] > woken], timeout=60)
            assert children(groups[0].pid) == workers
            kill_node(groups[2], signal.SIGTERM)  # a spot reclaim of one group: it leaves, without a save
            assert groups[2].wait(timeout=60) == 75
            (left,) = replica_events(run_dir, 2, "stop")
            wait_for(lambda: committed_step(run_dir) >= left["step"] + 3, timeout=60)
            assert not [
                e
                for e in read_jsonl(run_dir / "events.jsonl")  # nobody saved for it
                if e["event"] == "checkpoint" and e["step"] % 40
            ]
        except BaseException:
            kill_nodes(groups)
            raise
    # The lighthouse is gone: every group stops in one line, nothing torn.
    for i, process in enumerate(groups[:2]):
        assert process.wait(timeout=60) == 1
        lines = logs[i].read_text().splitlines()  # ours, then torchrun's own report of a failed worker
        assert any(line.startswith("python -m dtrain.train: error: the torchft lighthouse at") for line in lines)
    assert_exactly_once(run_dir, samples=None)
    assert replica_events(run_dir, 1, "heal") and replica_events(run_dir, 2, "heal")


def test_a_writer_killed_mid_save_and_a_source_killed_mid_heal_lose_nothing(tmp_path):
    """Replica 0 dies writing step 40: replica 1 writes the next checkpoint, the torn one never
    counts. Replica 1 dies serving replica 0's heal: replica 0 goes on alone from the newest
    checkpoint, and the steps replica 1 took past it are rolled back."""
    run_dir = tmp_path / "run"
    # 600 paced steps, 60 s: room for both restarts (their heals were over 26 s in on a loaded machine).
    args = [*ARGS, "--run-dir", str(run_dir), "--data.train_samples=9600"]
    faults = Path(__file__).parent / "helpers/replica_faults.py"
    (tmp_path / "ready").mkdir()
    together = {**PACE, "DTRAIN_TEST_START_TOGETHER": f"2:{tmp_path / 'ready'}"}
    with lighthouse(join_timeout_ms=2000) as url:
        r0 = group(
            url, 0, args, tmp_path / "r0.log", script=faults, env={**together, "DTRAIN_TEST_KILL_IN": "step_00000040"}
        )
        r1 = group(url, 1, args, tmp_path / "r1.log", script=faults, env={**together, "DTRAIN_TEST_DIE_SERVING": "80"})
        try:
            assert r0.wait(timeout=120) != 0
            assert not (run_dir / "checkpoints/step_00000040/manifest.json").exists()
            wait_for(lambda: (run_dir / "checkpoints/step_00000080/manifest.json").exists())
            r0 = group(url, 0, args, tmp_path / "r0.log", env=PACE)
            assert r1.wait(timeout=120) != 0  # asked for the state, it died
            wait_for(lambda: replica_events(run_dir, 0, "resume"), timeout=60)
            r1 = group(url, 1, args, tmp_path / "r1.log", env=PACE)
            finish([r0, r1])
        finally:
            kill_nodes([r0, r1])
    (resumed,) = replica_events(run_dir, 0, "resume")
    assert resumed["step"] >= 80
    # Replica 1 came back: it healed from replica 0, or, started while replica 0 still stood at the
    # checkpoint it had just resumed from (a slow machine: CI), it resumed from that one too.
    assert [e for e in replica_events(run_dir, 1) if e["event"] in ("heal", "resume") and e["time"] > resumed["time"]]
    ends = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "end"]
    assert len(ends) == 2 and ends[0]["weights_digest"] == ends[1]["weights_digest"]
    assert_exactly_once(run_dir, samples=9600)


def test_a_group_overtaken_before_its_first_quorum_stops_instead_of_training_the_steps_again(tmp_path):
    """Replica 1 resumes (from no checkpoint) and stalls before its first quorum while replica 0
    trains the whole run alone and leaves. Nobody is there to heal replica 1: training on from its
    older state would redo the run. It stops in one line; started again, it finds the run done."""
    run_dir = tmp_path / "run"
    args = [*ARGS, "--run-dir", str(run_dir), "--data.train_samples=1600"]
    ready = tmp_path / "ready"
    ready.mkdir()
    faults = Path(__file__).parent / "helpers/replica_faults.py"
    with lighthouse() as url:
        late = group(url, 1, args, tmp_path / "r1.log", script=faults, env={"DTRAIN_TEST_START_TOGETHER": f"2:{ready}"})
        try:
            wait_for(lambda: any(ready.iterdir()))  # restored, and held before its first quorum
            finish([group(url, 0, args, tmp_path / "r0.log")])
            (ready / "go").touch()
            assert late.wait(timeout=120) == 1
        finally:
            kill_nodes([late])
        log = (tmp_path / "r1.log").read_text()
        assert "resumed from no checkpoint, but the run finished meanwhile (step_00000100)" in log, log[-2000:]
        assert group(url, 1, args, tmp_path / "again.log").wait(timeout=120) == 0
    assert "already finished at step 100" in (tmp_path / "again.log").read_text()
    assert [e["event"] for e in replica_events(run_dir, 1)] == []  # it never trained
    assert_exactly_once(run_dir, samples=1600)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_the_heal_transport_serves_state_on_the_job_address_and_never_runs_code_it_receives(tmp_path):
    transport = PeerStateTransport("127.0.0.1", timedelta(seconds=5))
    try:
        assert transport.metadata().startswith("http://127.0.0.1:")
        state = {"model": {"w": torch.arange(6.0)}, "progress": {"step": 7, "best": {"val_mse": math.inf}}}
        transport.send_checkpoint([1], 7, state, None)
        got = transport.recv_checkpoint(0, transport.metadata(), 7, None)
        assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["progress"]["step"] == 7
        transport.disallow_checkpoint()
    finally:
        transport.shutdown()
    # A hostile peer (or anything that reaches the port) answers with a pickle that runs a command.
    _Payload.marker = tmp_path / "ran"
    hostile = io.BytesIO()
    torch.save({"user": _Payload()}, hostile)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(hostile.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(pickle.UnpicklingError):
            transport.recv_checkpoint(0, f"http://127.0.0.1:{server.server_address[1]}/state/", 7, None)
    finally:
        server.shutdown()
    assert not _Payload.marker.exists()


def test_replica_options_are_checked_in_one_line(tmp_path):
    result = launch(
        ["--preset", "tiny", "--run-dir", str(tmp_path / "a"), "--fault_tolerance.enable=true"],
        env={"TORCHFT_LIGHTHOUSE": ""},
    )
    assert result.returncode == 2 and "needs TORCHFT_LIGHTHOUSE=http://HOST:PORT" in result.stderr
    result = launch(
        [
            "--preset",
            "tiny",
            "--run-dir",
            str(tmp_path / "a"),
            "--fault_tolerance.enable=true",
            "--fault_tolerance.replica_id=2",
            "--fault_tolerance.group_size=2",
        ],
        env={"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:1"},
    )
    assert result.returncode == 2 and "replica_id=2 is outside 0..1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
