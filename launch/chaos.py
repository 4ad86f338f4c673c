"""Chaos harness: kill ranks of a real torchrun job at random moments, restart it on
another world size, and check the run at the end.

    python launch/chaos.py --run-dir runs/chaos --kills 20 --seed 0 [--async] [--s3]

Each round starts `torchrun --standalone --nproc_per_node=W -m dtrain.train` (W
random in 1..--max-world) on the same run directory, waits a random time (or,
sometimes, for a checkpoint directory that has no manifest yet: a save in
flight), and sends SIGTERM or SIGKILL to one random worker. SIGTERM is the
polite notice (the job saves and exits 75); SIGKILL loses the steps since the
last commit. After --kills rounds, a last round runs the job to its end. Then
`dtrain report` checks: no unloadable checkpoint, every sample of every epoch
exactly once, and steps lost only to SIGKILLs, each at most the save interval
(twice it with --async: a background save may still be in flight).

--async saves in the background; --s3 puts the run directory on an S3 server
(moto) that this script starts on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dtrain.checkpoint.catalog import CheckpointCatalog
from dtrain.report import check_run, format_report
from dtrain.rundir import RunDirectory

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
SAVE_INTERVAL = 5
JOB = [
    "--preset",
    "tiny",
    "--train.global_batch_size=24",
    "--data.train_samples=240",
    "--train.max_steps=0",
    "--train.log_interval=1",
    "--train.eval_interval=50",
    f"--checkpoint.interval_steps={SAVE_INTERVAL}",
    "--checkpoint.keep_last=3",
    "--data.record_indices=true",
]


def workers(agent: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def torn(catalog: CheckpointCatalog) -> set[str]:
    """Checkpoint directories without a manifest: saves in flight, or leftovers of crashes."""
    try:
        return set(catalog.scan().torn)
    except Exception:  # the run directory may not exist yet
        return set()


def start(run_dir: str, world: int, extra: list[str], log, env: dict) -> subprocess.Popen:
    command = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={world}",
        "-m",
        "dtrain.train",
        "--run-dir",
        run_dir,
        *JOB,
        *extra,
    ]
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def s3_server(bucket: str) -> dict:
    """A moto S3 server on loopback for this process's lifetime; the environment that reaches it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_address[1]}"
    env = {
        "AWS_ACCESS_KEY_ID": "chaos",
        "AWS_SECRET_ACCESS_KEY": "chaos",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(bucket)
    return env


def finish(agent: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return agent.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        return agent.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/chaos")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-world", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1000, help="plan while killing; the last round ends it sooner")
    parser.add_argument("--async", dest="async_save", action="store_true", help="background (async) saves")
    parser.add_argument("--s3", action="store_true", help="the run directory on a loopback S3 server")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    env = s3_server("chaos") if args.s3 else {}
    run_url = f"s3://chaos/{Path(args.run_dir).name}" if args.s3 else args.run_dir
    catalog = RunDirectory(run_url).catalog()
    poll = 0.05 if args.s3 else 0.005
    extra = ["--checkpoint.async_save=true"] if args.async_save else []
    bound = SAVE_INTERVAL * (2 if args.async_save else 1)
    kills = []
    with open(Path(args.run_dir) / "chaos.log", "a") as log:
        for round_ in range(args.kills):
            world = rng.randint(1, args.max_world)
            agent = start(run_url, world, [f"--train.num_epochs={args.epochs}", *extra], log, env)
            how = rng.choice([signal.SIGTERM, signal.SIGKILL])
            during_save = rng.random() < 0.3
            leftovers = torn(catalog)
            deadline = time.monotonic() + rng.uniform(*((8.0, 16.0) if args.s3 else (4.0, 10.0)))
            while time.monotonic() < deadline and agent.poll() is None:
                if during_save and torn(catalog) - leftovers and workers(agent):
                    break
                time.sleep(poll)
            victims = workers(agent)
            if agent.poll() is None and victims:
                in_flight = bool(torn(catalog) - leftovers)
                os.kill(rng.choice(victims), how)
                kills.append({"round": round_, "world_size": world, "signal": how.name, "save_in_flight": in_flight})
            code = finish(agent)
            print(f"round {round_}: {world} rank(s), {how.name}, exit {code}", flush=True)
        # The last round: a new world size, and a plan that ends two epochs from here.
        committed = catalog.scan().committed
        epoch = committed[-1].progress["epoch"] if committed else 0
        world = rng.randint(1, args.max_world)
        code = finish(start(run_url, world, [f"--train.num_epochs={epoch + 2}", *extra], log, env), timeout=600)
        print(f"final round: {world} rank(s), exit {code}", flush=True)
    report = check_run(run_url)
    lost_ok = all(
        leg["lost_steps"] == 0 or (leg["ended"] == "killed" and leg["lost_steps"] <= bound) for leg in report["legs"]
    )
    report.update(
        mode={"async": args.async_save, "s3": args.s3},
        kills=kills,
        kills_total=len(kills),
        kills_during_save=sum(k["save_in_flight"] for k in kills),
        lost_steps_within_interval=lost_ok,
        chaos_ok=report["ok"] and report["finished"] and lost_ok,
    )
    (Path(args.run_dir) / "chaos_report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(
        f"{len(kills)} kills ({sum(k['signal'] == 'SIGKILL' for k in kills)} SIGKILL, "
        f"{report['kills_during_save']} with a save in flight), final exit {code}, "
        f"lost steps within {bound} steps: {lost_ok}, lost to SIGTERM: "
        f"{sum(leg['lost_steps'] for leg in report['legs'] if leg['ended'].startswith('stopped'))}"
    )
    print("CHAOS OK" if report["chaos_ok"] else "CHAOS FAILED")
    return 0 if report["chaos_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
