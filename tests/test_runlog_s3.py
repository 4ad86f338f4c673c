"""Run logs on object storage: every line written once, in parts; readable after a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import launch
from s3server import S3_REQUESTS

RUN = "s3://dtrain-test/runlog"
ARGS = [
    "--preset",
    "tiny",
    "--train.max_steps=1000",
    "--data.train_samples=1600",
    "--train.log_interval=1",
    "--train.eval_interval=500",
    "--checkpoint.interval_steps=200",
    "--data.record_indices=true",
    "--run-dir",
    RUN,
]


def cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "dtrain.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_a_thousand_logged_steps_on_s3_cost_each_line_once_and_survive_a_sigkill(tmp_path, s3_env):
    from dtrain.rundir import EVENTS, METRICS, RunDirectory

    run = RunDirectory(RUN)
    S3_REQUESTS.clear()
    first = subprocess.Popen(
        [sys.executable, "-m", "dtrain.train", *ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **s3_env},
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "checkpoint" and e["step"] == 200 for e in run.read_jsonl(EVENTS)):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    time.sleep(1.0)  # a few steps past the save: their lines are not shipped yet
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    training = list(S3_REQUESTS)  # the requests of training, without this test's reads
    killed = [r for r in run.read_jsonl(METRICS) if r["kind"] == "train"]
    assert killed and killed[-1]["step"] >= 200  # readable, up to the last shipped part

    S3_REQUESTS.clear()
    second = launch(ARGS, env=s3_env)  # resumes from step 200 and finishes
    assert second.returncode == 0, second.stderr[-3000:]
    training += S3_REQUESTS
    train = [r for r in run.read_jsonl(METRICS) if r["kind"] == "train"]
    assert [r["step"] for r in train if r["leg"] == train[-1]["leg"]] == list(range(201, 1001))

    # Log traffic: parts PUT once, never read back or appended to while training.
    logs = [r for r in training if "/runlog/metrics" in r.path or "/runlog/samples" in r.path]
    assert not [r for r in logs if r.method == "GET"], "a log was read during training"
    metrics_puts = [r for r in logs if r.method == "PUT" and "/runlog/metrics/" in r.path]
    stored = sum(len(json.dumps(r, sort_keys=True)) + 1 for r in run.read_jsonl(METRICS))
    assert sum(r.sent for r in metrics_puts) == stored  # every line sent exactly once
    assert len(metrics_puts) < 40  # parts at saves, stops and every 30 s: not one request per line

    report = json.loads(cli("report", RUN, "--json", env=s3_env).stdout)
    assert report["finished"] and report["ok"] and len(report["legs"]) == 2
    assert report["legs"][0]["ended"].startswith("killed") and report["legs"][1]["from_step"] == 200
    assert len(report["coverage"]) == 10  # every sample of every epoch once, from both legs' parts
    plot = cli("plot", RUN, "--out", str(tmp_path / "curves.png"), env=s3_env)
    assert plot.returncode == 0 and (tmp_path / "curves.png").stat().st_size > 10_000, plot.stderr
    from dtrain import ExperimentManager

    assert ExperimentManager.load(RUN).config.train.max_steps == 1000


def test_a_long_log_on_s3_stays_a_few_objects_and_a_merge_cut_short_reads_each_line_once(s3_env, monkeypatch):
    from dtrain import log_parts
    from dtrain.rundir import EVENTS, RunDirectory, parts_of

    monkeypatch.setattr(log_parts, "MERGE_AT", 4)
    run = RunDirectory("s3://dtrain-test/merged-log")
    S3_REQUESTS.clear()
    for i in range(150):  # events are shipped at once: 150 parts written
        run.event("tick", i=i)
    objects = run.list(parts_of(EVENTS))
    assert len(objects) <= 3 * (log_parts.MERGE_AT - 1) + 2, objects  # under 4 a level, 4 levels
    assert [e["i"] for e in run.read_jsonl(EVENTS)] == list(range(150))
    stored = sum(r.sent for r in S3_REQUESTS if r.method == "PUT" and "/events/part-" in r.path)
    rewritten = sum(r.sent for r in S3_REQUESTS if r.method == "PUT" and "/events/merged-" in r.path)
    assert rewritten <= 3 * stored  # each line rewritten once per level it went up

    # A writer killed after writing a merged object, before deleting what it holds.
    monkeypatch.setattr(run.fs, "rm", lambda paths, **kwargs: None)
    for i in range(150, 160):
        run.event("tick", i=i)
    assert len(run.list(parts_of(EVENTS))) > len(objects)  # merged and held objects side by side
    assert [e["i"] for e in RunDirectory(run.url).read_jsonl(EVENTS)] == list(range(160))
    monkeypatch.undo()
    monkeypatch.setattr(log_parts, "MERGE_AT", 4)
    for i in range(160, 170):  # the next merge deletes what the cut-short one left
        run.event("tick", i=i)
    assert len(run.list(parts_of(EVENTS))) <= 3 * (log_parts.MERGE_AT - 1) + 2
    assert [e["i"] for e in RunDirectory(run.url).read_jsonl(EVENTS)] == list(range(170))
