"""The step that does not wait (docs/how-it-works.md, "A step that does not wait"): no read of a
tensor's value on the host and one small collective of dtrain's own per step; a non-finite step
skipped on the device and stopped at the next host read, nothing non-finite saved."""

import json
import os
import subprocess
import sys

from conftest import HELPERS, read_jsonl, torchrun_script


def test_a_step_reads_nothing_on_the_host_makes_one_small_collective_and_skips_a_non_finite_update(tmp_path):
    run_dir, counts = tmp_path / "run", tmp_path / "counts.json"
    args = [
        *("--preset", "tiny", "--run-dir", str(run_dir), "--train.max_steps=40", "--train.log_interval=100"),
        *("--train.eval_interval=0", "--checkpoint.interval_steps=4", "--checkpoint.keep_last=0"),
    ]
    env = {"DTRAIN_TEST_COUNTS": str(counts), "DTRAIN_TEST_NAN_AT": "10"}
    result = torchrun_script("loop_probe.py", args, nproc=2, env=env)
    assert result.returncode != 0 and "exitcode  : 65" in result.stderr, result.stderr[-3000:]
    # The step after step 9 was not finite: skipped on the device, read on the host after step 11.
    assert "the step after step 9 is not finite; that step was not applied" in result.stderr
    probe = json.loads(counts.read_text())
    assert probe["weights_finite"]  # a NaN gradient applied by AdamW would have made them NaN
    steps = {int(step): count for step, count in probe["steps"].items()}
    assert sorted(steps) == list(range(1, 12))
    for step, count in steps.items():
        if step not in (4, 8, 11):  # saves read the sums first; step 11's boundary found step 10's
            assert count == {"syncs": 0, "collectives": 1}, (step, count)
    saves = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    assert saves == [4, 8]
    assert read_jsonl(run_dir / "events.jsonl")[-1]["event"] == "diverged"


def test_examples_made_ahead_train_exactly_as_examples_made_on_time(tmp_path):
    """A GPU's prefetch thread, forced on here: the same weights, AdamW state and sampler position
    after every step as making each batch on time (the sampler counts only what a step takes)."""
    result = subprocess.run(
        [sys.executable, str(HELPERS / "prefetch_equal.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(HELPERS.parent.parent)},
    )
    assert result.returncode == 0 and result.stdout.strip() == "equal", result.stdout + result.stderr[-2000:]
