"""Checkpoint I/O for a state of over 500 MB (model + AdamW), measured side by side in one run.

    python benchmarks/checkpoint_io.py [--layers 14] [--out /tmp/dtrain-ckpt-bench]

Reports: the disk's raw write bandwidth (the physical limit); sync DCP save and
load on 2 ranks against torch.save/torch.load of the same full state on one;
async save's blocking time against a sync save's, and how much slower training
steps run while the background save is in flight; load on 1, 2 and 3 ranks of
the checkpoint written by 2 (resharding against same-size). Everything is
written with fsync. Loads read what was just written, so they come mostly from
the page cache unless the script can drop it (it tries; root only).
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

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
ROUNDS = 3


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_write_bandwidth(directory: Path, size: int = 512 << 20) -> float:
    """MB/s of writing ``size`` bytes in 8 MiB blocks with one fsync at the end."""
    block = os.urandom(8 << 20)
    path = directory / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return size / elapsed / 1e6


# ---- the part that runs under torchrun ---------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from dtrain.config import ExperimentConfig
    from dtrain.dist import init_distributed, shutdown
    from dtrain.rundir import RunDirectory
    from dtrain.trainer import Trainer

    ctx = init_distributed("cpu")
    config = ExperimentConfig.preset("medium")
    config.model.layers = args.layers
    config.data.points, config.train.global_batch_size = 16, 12
    config.checkpoint.async_save = True
    run = RunDirectory(f"{args.out}/run")
    trainer = Trainer(config, ctx, run)
    results = {}

    def timed(fn):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    def record(name, value):
        results.setdefault(name, []).append(value)

    if args.worker == "load":
        reference = f"{args.out}/run/checkpoints"
        name = sorted(p.name for p in Path(reference).iterdir())[-1]
        for _ in range(ROUNDS):
            drop_page_cache()
            record(f"dcp_load_w{ctx.world_size}", timed(lambda: dcp.load(
                trainer.state(), storage_reader=run.storage.reader(f"{reference}/{name}"))))
    else:
        trainer.train_step()  # creates AdamW's state
        tensors = list(trainer.model.parameters()) + [
            v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # this rank's shards
        state_bytes = sum(t.numel() * t.element_size() for t in local)
        total = torch.tensor([state_bytes])
        dist.all_reduce(total)
        results["state_mb"] = [total.item() / 1e6]
        for _ in range(ROUNDS):  # sync DCP saves, each committed (manifest, checksums) too
            start = time.perf_counter()
            trainer.save([], blocking=True)
            record("dcp_sync_save_committed", time.perf_counter() - start)
            record("dcp_sync_save_blocked", trainer.checkpoints.last_blocked_s)
            trainer.step += 1
        # torch.save / torch.load of the same full state on rank 0 (gathered first, not timed).
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=options)
        if ctx.is_main:
            path = f"{args.out}/full.pt"
            for _ in range(ROUNDS):
                start = time.perf_counter()
                with open(path, "wb") as f:
                    torch.save({"model": model_sd, "optimizer": optim_sd}, f)
                    f.flush()
                    os.fsync(f.fileno())
                record("torch_save", time.perf_counter() - start)
                drop_page_cache()
                start = time.perf_counter()
                torch.load(path, weights_only=True)
                record("torch_load", time.perf_counter() - start)
        del model_sd, optim_sd
        # Steps alone, then steps while an async save is written in the background.
        for _ in range(5):
            record("step_alone", timed(trainer.train_step))
        for _ in range(ROUNDS):
            trainer.save([], blocking=False)
            record("dcp_async_save_blocked", trainer.checkpoints.last_blocked_s)
            while trainer.checkpoints._pending is not None:
                record("step_during_async_save", timed(trainer.train_step))
                trainer.checkpoints.poll()
            for _ in range(2):
                record("step_alone", timed(trainer.train_step))
    if ctx.is_main:
        with open(f"{args.out}/results.jsonl", "a") as f:
            f.write(json.dumps(results) + "\n")
    shutdown(ctx)


def launch(args, world: int, mode: str) -> None:
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={world}", __file__, "--worker", mode,
               "--out", args.out, "--layers", str(args.layers)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/dtrain-ckpt-bench")
    parser.add_argument("--layers", type=int, default=14, help="medium width 512; 14 layers ~ 530 MB of state")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)
    bandwidth = [disk_write_bandwidth(Path(args.out)) for _ in range(ROUNDS)]
    launch(args, 2, "save")
    for world in (2, 1, 3):
        launch(args, world, "load")
    merged = {"disk_write_mb_s": bandwidth}
    for line in Path(args.out, "results.jsonl").read_text().splitlines():
        merged.update(json.loads(line))
    med = {k: statistics.median(v) for k, v in merged.items()}
    mb = med["state_mb"]
    print(f"state: {mb:.0f} MB (model + AdamW), 2 ranks, gloo, {ROUNDS} rounds, medians; "
          f"page cache dropped before loads: {drop_page_cache()}")
    print("| measurement | seconds | MB/s | vs reference |")
    print("|---|---|---|---|")
    print(f"| raw disk write, 512 MB + fsync | {512e6 / 1e6 / med['disk_write_mb_s']:.2f} | {med['disk_write_mb_s']:.0f} | physical limit |")
    rows = [("torch.save full state (rank 0, fsync)", "torch_save", "torch_save"),
            ("DCP sync save, 2 ranks (blocked)", "dcp_sync_save_blocked", "torch_save"),
            ("DCP sync save + commit (checksums, manifest)", "dcp_sync_save_committed", "torch_save"),
            ("DCP async save, blocked", "dcp_async_save_blocked", "dcp_sync_save_blocked"),
            ("torch.load full state (rank 0)", "torch_load", "torch_load"),
            ("DCP load, 2 ranks (same world size)", "dcp_load_w2", "torch_load"),
            ("DCP load, 1 rank (reshard 2 -> 1)", "dcp_load_w1", "dcp_load_w2"),
            ("DCP load, 3 ranks (reshard 2 -> 3)", "dcp_load_w3", "dcp_load_w2")]
    for label, key, reference in rows:
        ratio = med[key] / med[reference]
        print(f"| {label} | {med[key]:.3f} | {mb / med[key]:.0f} | {ratio:.2f}x {reference} |")
    slow = med["step_during_async_save"] / med["step_alone"]
    print(f"| training step alone | {med['step_alone']:.3f} | | |")
    print(f"| training step during an async save | {med['step_during_async_save']:.3f} | | {slow:.2f}x step alone |")


if __name__ == "__main__":
    main()
