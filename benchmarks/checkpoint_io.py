"""Checkpoint I/O for a state of over 500 MB (model + AdamW): seconds, bytes and requests,
side by side in one run, on local disk and on a loopback S3 server.

    python benchmarks/checkpoint_io.py [--layers 14] [--out /tmp/dtrain-ckpt-bench] [--skip-s3]

Local disk, 2 ranks: the disk's raw write bandwidth (the physical limit); dtrain's
sync save (DCP + checksums + manifest) against torch.save of the same full state
on one process; thread- and process-based async saves (DCP's
``AsyncCheckpointerType``): how long each blocks, and how much slower training
steps run while it writes; loads on 2, 1 and 3 ranks of the checkpoint written
by 2. Bytes and calls are counted at the file layer from each rank's
``/proc/self/io`` (``rchar``/``wchar``, ``syscr``/``syscw``: every read and write
system call, including DCP's small planning messages over gloo), summed over
ranks. On S3 (moto's server on loopback, ``tests/s3server.py``), one save and the
same three loads, with every request counted by the server.

Loads read what was just written, so they come mostly from the page cache
unless the script can drop it (it tries; root only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
ROUNDS = 3
BUCKET = "dtrain-bench"


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_write(path: Path, size: int) -> None:
    """The disk's own speed: ``size`` bytes in 8 MiB blocks, one fsync at the end."""
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        for _ in range(-(-size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def memory_mb() -> float:
    """Proportional set size (shared pages split among their users) of this process and every
    process it started (DCP's process-based save runs a daemon), in MB."""
    pids, total = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / 1e6


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {name: int(fields[name]) for name in ("rchar", "wchar", "syscr", "syscw")}


# ---- the part that runs under torchrun ---------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from dtrain.config import ExperimentConfig
    from dtrain.dist import init_distributed, shutdown
    from dtrain.rundir import RunDirectory
    from dtrain.trainer import Trainer

    ctx = init_distributed("cpu")
    config = ExperimentConfig.preset("medium")
    config.model.layers = args.layers
    config.data.points, config.train.global_batch_size = 16, 12
    config.checkpoint.async_save = True
    config.checkpoint.keep_last = 2
    run = RunDirectory(args.url)
    trainer = Trainer(config, ctx, run)
    results: dict[str, list] = {}

    def record(name, value):
        results.setdefault(name, []).append(value)

    def measured(name, fn):
        """Seconds of ``fn`` on every rank, and the file-layer I/O of all ranks together."""
        dist.barrier()
        before, start = io_counters(), time.perf_counter()
        fn()
        dist.barrier()
        seconds = time.perf_counter() - start
        after = io_counters()
        delta = torch.tensor([after[k] - before[k] for k in ("rchar", "wchar", "syscr", "syscw")])
        dist.all_reduce(delta)
        record(name, seconds)
        record(f"{name}:io", dict(zip(("read", "written", "reads", "writes"), delta.tolist())))
        return seconds

    if args.worker == "load":
        catalog = run.catalog()
        manifest = catalog.scan().committed[-1]
        url = f"{catalog.url}/{manifest.directory}"
        results["checkpoint_bytes"] = [sum(f["size"] for f in manifest.files.values())]
        for _ in range(args.rounds):
            drop_page_cache()
            measured(
                f"load_w{ctx.world_size}",
                lambda: dcp.load(trainer.state(), storage_reader=run.storage.reader(url, manifest.files)),
            )
    else:
        trainer.train_step()  # creates AdamW's state
        tensors = list(trainer.model.parameters()) + [
            v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # this rank's shards
        total = torch.tensor([sum(t.numel() * t.element_size() for t in local)])
        dist.all_reduce(total)
        results["state_mb"] = [total.item() / 1e6]
        if args.url.startswith("s3://"):
            for _ in range(args.rounds):
                measured("sync_save_committed", lambda: trainer.save([], blocking=True))
                trainer.step += 1
            results["checkpoint_bytes"] = [sum(f["size"] for f in run.catalog().scan().committed[-1].files.values())]
            return finish(ctx, results, shutdown)
        # Side by side, round after round (a burst of writes slows the next on this VM's disk):
        # the raw disk (every rank writes its share of the bytes at once, fsynced), torch.save of
        # the same full state on rank 0 (gathered first, not timed), and dtrain's sync save.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=options)
        share = total.item() // ctx.world_size
        path = f"{args.out}/full.pt"

        def raw() -> None:
            scratch = Path(args.out, f"raw{ctx.rank}.bin")
            measured("raw_write", lambda: raw_write(scratch, share))
            scratch.unlink()

        def raw_one_writer() -> None:  # the same bytes from one process, as torch.save writes them
            dist.barrier()
            if ctx.is_main:
                start = time.perf_counter()
                raw_write(Path(args.out, "raw.bin"), share * ctx.world_size)
                record("raw_write_one", time.perf_counter() - start)
                Path(args.out, "raw.bin").unlink()

        def torch_save() -> None:
            dist.barrier()
            if ctx.is_main:
                start = time.perf_counter()
                with open(path, "wb") as f:
                    torch.save({"model": model_sd, "optimizer": optim_sd}, f)
                    f.flush()
                    os.fsync(f.fileno())
                record("torch_save", time.perf_counter() - start)

        def sync_save() -> None:
            measured("sync_save_committed", lambda: trainer.save([], blocking=True))
            trainer.step += 1
            trainer.checkpoints._finish_deleting()  # retention's deletes overlap training, not the next timing

        sync_save()  # the first save plans; later saves reuse the plan (DCP's plan caching)
        results["sync_save_committed"].clear()
        order = [raw, raw_one_writer, torch_save, sync_save]
        for round_ in range(len(order)):  # each goes first once, so none always follows a burst
            for run_one in order[round_:] + order[:round_]:
                run_one()
        results["checkpoint_bytes"] = [sum(f["size"] for f in run.catalog().scan().committed[-1].files.values())]
        if ctx.is_main:
            for _ in range(args.rounds):
                drop_page_cache()
                start = time.perf_counter()
                torch.load(path, weights_only=True)
                record("torch_load", time.perf_counter() - start)
            os.unlink(path)
        del model_sd, optim_sd
        # Steps alone, then steps while an async save (thread or process) writes in the background.
        group = dist.new_group(backend="gloo")
        for _ in range(4):
            record("step_alone", measured("step", trainer.train_step))
        baseline = memory_mb()  # memory a save adds, over all its rounds (buffers kept included)
        for round_ in range(args.rounds + 1):  # dtrain's own: the copy overlaps fwd/bwd, then written
            dist.barrier()
            start = time.perf_counter()
            trainer.save([], blocking=False)
            blocked = time.perf_counter() - start
            steps, peak = [], memory_mb()
            while trainer.checkpoints.saving:
                steps.append(measured("step", trainer.train_step))  # the first waits for the copy
                peak = max(peak, memory_mb())
                trainer.checkpoints.poll()
            trainer.step += 1
            record("memory_dtrain", peak - baseline)
            if round_:
                record("async_dtrain_blocked", blocked)
                record("async_dtrain_first_step", steps[0] if steps else 0.0)
                record("async_dtrain_total", time.perf_counter() - start)
                results.setdefault("step_during_dtrain", []).extend(steps)
            for _ in range(2):
                record("step_alone", measured("step", trainer.train_step))
        for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
            baseline = memory_mb()
            for round_ in range(args.rounds + 1):  # round 0 warms up (the process kind starts its daemon)
                writer = FileSystemWriter(f"{args.out}/async/{kind.value}_{round_}", overwrite=False)
                dist.barrier()
                start = time.perf_counter()
                future = dcp.async_save(
                    trainer.state(), storage_writer=writer, process_group=group, async_checkpointer_type=kind
                )
                blocked = time.perf_counter() - start
                steps, peak = [], memory_mb()
                while True:
                    done = torch.tensor([int(future.done())])
                    dist.all_reduce(done, op=dist.ReduceOp.MIN)
                    if done.item():
                        break
                    steps.append(measured("step", trainer.train_step))
                    peak = max(peak, memory_mb())
                future.result()
                record(f"memory_{kind.value}", peak - baseline)
                written = time.perf_counter() - start
                if round_:
                    record(f"async_{kind.value}_blocked", blocked)
                    record(f"async_{kind.value}_total", written)
                    results.setdefault(f"step_during_{kind.value}", []).extend(steps)
                for _ in range(2):
                    record("step_alone", measured("step", trainer.train_step))
    finish(ctx, results, shutdown)


def finish(ctx, results, shutdown) -> None:
    if ctx.is_main:
        with open(os.environ["BENCH_RESULTS"], "a") as f:
            f.write(json.dumps(results) + "\n")
    shutdown(ctx)


def launch(args, world: int, mode: str, url: str, rounds: int, env: dict | None = None) -> None:
    command = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={world}",
        __file__,
        "--worker",
        mode,
        "--out",
        args.out,
        "--layers",
        str(args.layers),
        "--url",
        url,
        "--rounds",
        str(rounds),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def read_results(path: Path) -> dict:
    merged: dict[str, list] = {}
    for line in path.read_text().splitlines():
        for key, values in json.loads(line).items():
            merged.setdefault(key, []).extend(values)
    return merged


def local_run(args) -> None:
    results = Path(args.out, "local.jsonl")
    env = {"BENCH_RESULTS": str(results)}
    url = f"{args.out}/run"
    launch(args, 2, "save", url, ROUNDS, env)
    for world in (2, 1, 3):
        launch(args, world, "load", url, ROUNDS, env)
    raw = read_results(results)
    med = {k: statistics.median(v) for k, v in raw.items() if not k.endswith(":io")}
    size = raw["checkpoint_bytes"][0]
    mb = med["state_mb"]
    print(
        f"\nLocal disk. State: {mb:.0f} MB (model + AdamW); checkpoint files {size / 1e6:.0f} MB; "
        f"2 ranks, gloo, {ROUNDS} rounds, medians; page cache dropped before loads: {drop_page_cache()}"
    )
    print("| measurement | seconds | MB/s | vs reference | bytes read | bytes written | read / write calls |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("raw disk write, every rank its share at once, fsync", "raw_write", "raw_write"),
        ("raw disk write, one process all of it, fsync", "raw_write_one", "raw_write"),
        ("torch.save full state (rank 0, fsync)", "torch_save", "torch_save"),
        ("dtrain sync save + commit (DCP, checksums, manifest)", "sync_save_committed", "torch_save"),
        (
            "dtrain async save: blocked (copy starts, runs beside fwd/bwd)",
            "async_dtrain_blocked",
            "sync_save_committed",
        ),
        ("dtrain async save: first step after it (waits for the copy)", "async_dtrain_first_step", "step_alone"),
        ("dtrain async save: until committed", "async_dtrain_total", "sync_save_committed"),
        ("DCP async save, thread: blocked", "async_thread_blocked", "sync_save_committed"),
        ("DCP async save, thread: until written", "async_thread_total", "sync_save_committed"),
        ("DCP async save, process: blocked", "async_process_blocked", "sync_save_committed"),
        ("DCP async save, process: until written", "async_process_total", "sync_save_committed"),
        ("torch.load full state (rank 0)", "torch_load", "torch_load"),
        ("dtrain load, 2 ranks (same world size)", "load_w2", "torch_load"),
        ("dtrain load, 1 rank (reshard 2 -> 1)", "load_w1", "load_w2"),
        ("dtrain load, 3 ranks (reshard 2 -> 3)", "load_w3", "load_w2"),
    ]
    for label, key, reference in rows:
        io = raw.get(f"{key}:io")
        counted = (
            f"{statistics.median(d['read'] for d in io) / size:.3f}x | "
            f"{statistics.median(d['written'] for d in io) / size:.3f}x | "
            f"{statistics.median(d['reads'] for d in io):.0f} / {statistics.median(d['writes'] for d in io):.0f}"
            if io
            else " | | "
        )
        print(
            f"| {label} | {med[key]:.3f} | {mb / med[key]:.0f} | {med[key] / med[reference]:.2f}x {reference} "
            f"| {counted} |"
        )
    for kind in ("dtrain", "thread", "process"):
        steps = raw.get(f"step_during_{kind}", [])
        if steps:
            slow = statistics.median(steps) / med["step_alone"]
            print(
                f"| training step during a {kind} async save ({len(steps)} steps) | {statistics.median(steps):.3f} "
                f"| | {slow:.2f}x step alone ({med['step_alone']:.3f} s) | | | |"
            )
    print(
        "| memory a background save adds on rank 0, most seen (MB, PSS with its daemon; this rank's state: "
        f"{mb / 2:.0f} MB) | "
        + ", ".join(f"{kind} {max(raw.get(f'memory_{kind}', [0])):.0f}" for kind in ("dtrain", "thread", "process"))
        + " | | | | | |"
    )
    notice_table(size / 1e6 / 2 / med["sync_save_committed"])  # 2 ranks wrote the checkpoint at once


def notice_table(rank_mb_per_s: float) -> None:
    """Seconds to a committed save against the state a rank holds, on this disk (as measured:
    every rank of the node writing at once) and on S3 (a rank's file is one multipart upload,
    its parts sent one after another: one stream, modelled at dcp_io's 90 MB/s)."""
    from dtrain.checkpoint.dcp_io import CheckedFsspecReader as s3

    print("\nA save against the notice: seconds from the call to the commit (rank 0's bookkeeping not included)")
    print(
        f"| state per rank | local disk ({rank_mb_per_s:.0f} MB/s a rank, measured) | 30 s notice | 120 s notice "
        f"| S3 ({s3.stream_bytes_per_s / 1e6:.0f} MB/s a rank, modelled) | 30 s notice | 120 s notice |"
    )
    print("|---|---|---|---|---|---|---|")
    for gb in (0.25, 1, 4, 16, 64):
        local, remote = gb * 1e3 / rank_mb_per_s, gb * 1e9 / s3.stream_bytes_per_s
        marks = [("fits" if t <= limit else "no") for t in (local, remote) for limit in (30, 120)]
        print(f"| {gb:g} GB | {local:.1f} | {marks[0]} | {marks[1]} | {remote:.1f} | {marks[2]} | {marks[3]} |")


def s3_run(args) -> None:
    import s3fs
    import s3server

    server, endpoint = s3server.start_server()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "BENCH_RESULTS": str(Path(args.out, "s3.jsonl")),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS")})
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
    url = f"s3://{BUCKET}/run"
    rows = []
    for label, world, mode in (
        ("save (1 save, committed)", 2, "save"),
        ("load, 2 ranks (same size)", 2, "load"),
        ("load, 1 rank (2 -> 1)", 1, "load"),
        ("load, 3 ranks (2 -> 3)", 3, "load"),
    ):
        s3server.S3_REQUESTS.clear()
        start = time.perf_counter()
        launch(args, world, mode, url, 1, env)
        seconds = time.perf_counter() - start
        mine = [r for r in s3server.S3_REQUESTS if "/run/checkpoints/" in r.path]
        shards = [r for r in mine if r.path.endswith(".distcp")]
        rows.append((label, seconds, mine, shards))
    server.stop()
    size = read_results(Path(env["BENCH_RESULTS"]))["checkpoint_bytes"][0]
    print(
        f"\nS3 (moto on loopback). Checkpoint files {size / 1e6:.0f} MB; requests under checkpoints/, "
        "counted by the server; seconds include starting torchrun and the model"
    )
    from dtrain.checkpoint.dcp_io import CheckedFsspecReader as model

    print(
        "| operation | seconds (whole launch) | requests (GET / PUT / other) | shard bytes GET | "
        f"shard bytes PUT | shard GETs | modelled S3 read s ({model.request_s * 1e3:.0f} ms a request, "
        f"{model.stream_bytes_per_s / 1e6:.0f} MB/s a stream, {model.read_threads} streams a rank) |"
    )
    print("|---|---|---|---|---|---|---|")
    for (label, seconds, mine, shards), world in zip(rows, (2, 2, 1, 3)):
        gets = sum(r.method == "GET" for r in mine)
        puts = sum(r.method in ("PUT", "POST") for r in mine)
        shard_gets = sum(r.method == "GET" for r in shards)
        shard_bytes = sum(r.received for r in shards if r.method == "GET")
        streams = model.read_threads * world  # the ranks read their shares at once
        modelled = -(-shard_gets // streams) * model.request_s + shard_bytes / (streams * model.stream_bytes_per_s)
        print(
            f"| {label} | {seconds:.1f} | {gets} / {puts} / {len(mine) - gets - puts} | "
            f"{shard_bytes / size:.3f}x | "
            f"{sum(r.sent for r in shards if r.method in ('PUT', 'POST')) / size:.3f}x | "
            f"{shard_gets} | {f'{modelled:.2f}' if shard_gets else ''} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/dtrain-ckpt-bench")
    parser.add_argument("--layers", type=int, default=14, help="medium width 512; 14 layers ~ 530 MB of state")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)
    local_run(args)
    if not args.skip_s3:
        s3_run(args)


if __name__ == "__main__":
    main()
