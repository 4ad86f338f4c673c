"""A save's bookkeeping at 8 ... 1,024 ranks, simulated in one process: time and bytes against N.

    python benchmarks/scale_sim.py [--ranks 8 32 128 512 1024] [--presets medium large]

What runs is the real code, on synthesised inputs: each rank's local save plan is
what FSDP2 (dim-0 shards) and dtrain's state give DCP for the preset's model (every
parameter and AdamW's two moments sharded, AdamW's step counts replicated, dtrain's
small states as bytes). Then, as rank 0 does it:

- DCP's global planning (``DefaultSavePlanner.create_global_plan``: dedup, metadata,
  the overlap check) and the storage layer's ``prepare_global_plan``;
- DCP's ``finish``: the ``.metadata`` pickle, written (its bytes), and read back as
  every rank reads it at load (the restricted unpickler, dtrain/checkpoint/dcp_io.py);
- dtrain's manifest: every rank's file entry (block checksums as the writer cuts them,
  tensor offsets), gathered to rank 0, built, written as JSON and parsed back;
- one rank's load planning against that metadata, resharded to N - 1 ranks.

Beside it, the store and storage traffic that is not in the save, modelled from
the code: the heartbeat (two TCPStore requests per rank per beat, dtrain/heartbeat.py)
and the lease (rank 0 only, dtrain/lease.py); and the bytes of the commit's gather.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain.checkpoint.dcp_io import SavePlanner, gc_paused, load_metadata  # noqa: E402
from dtrain.checkpoint.integrity import tensor_block  # noqa: E402
from dtrain.checkpoint.manifest import Manifest  # noqa: E402
from dtrain.config import ExperimentConfig  # noqa: E402
from dtrain.model import build_model  # noqa: E402

BYTES_STATES = ("progress", "sampler", "schedule")  # dtrain's small non-tensor states, one item each
HEADER = 1_000  # torch.save's archive around one item's bytes (records, pickle), about
MIN_MERGE = 4 << 10  # headers and small items share a block


def shapes(preset: str) -> dict[str, torch.Size]:
    config = ExperimentConfig.preset(preset)
    with torch.device("meta"):
        model = build_model(config.model, 2)
    return {name: p.shape for name, p in model.named_parameters()}


def local_plan(rank: int, world: int, params: dict[str, torch.Size]) -> SavePlan:
    """What DCP's planner makes on ``rank``: FSDP2 shards dim 0 in ``ceil(rows / world)`` blocks."""
    items = []
    for name, shape in params.items():
        rows = -(-shape[0] // world)
        start, stop = min(rank * rows, shape[0]), min((rank + 1) * rows, shape[0])
        for key in (f"model.{name}", f"optimizer.state.{name}.exp_avg", f"optimizer.state.{name}.exp_avg_sq"):
            if stop > start:
                chunk = ChunkStorageMetadata(
                    torch.Size([start, *[0] * (len(shape) - 1)]), torch.Size([stop - start, *shape[1:]])
                )
                items.append(_tensor_item(key, chunk, shape, WriteItemType.SHARD))
        step = ChunkStorageMetadata(torch.Size([]), torch.Size([]))
        items.append(_tensor_item(f"optimizer.state.{name}.step", step, torch.Size([]), WriteItemType.TENSOR))
    items += [WriteItem(MetadataIndex(key), WriteItemType.BYTE_IO) for key in BYTES_STATES]
    return SavePlan(items)


def _tensor_item(fqn, chunk, size, kind) -> WriteItem:
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=size)
    return WriteItem(MetadataIndex(fqn, chunk.offsets), kind, tensor_data=data)


def item_bytes(item: WriteItem) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return 200
    return math.prod(item.tensor_data.chunk.sizes) * 4


def write_results(plan: SavePlan, rank: int) -> tuple[list[WriteResult], dict]:
    """The storage layer's results for one rank's file, and dtrain's manifest entry for it."""
    results, offset, blocks, tensors = [], 0, [], []
    for item in plan.items:
        size = item_bytes(item) + HEADER
        results.append(WriteResult(item.index, size, _StorageInfo(f"__{rank}_0.distcp", offset, size)))
        if item.type != WriteItemType.BYTE_IO:
            data = item_bytes(item)
            block = tensor_block(data)
            blocks += [[HEADER, "0badcafe"]] + [[min(block, data - b), "0badcafe"] for b in range(0, data, block)]
            tensors.append([offset, offset + HEADER])
        else:
            blocks.append([size, "0badcafe"])
        offset += size
    merged = []  # the writer cuts small neighbours into one block up to MAX_BLOCK
    for length, crc in blocks:
        if merged and merged[-1][0] + length < MIN_MERGE and length < MIN_MERGE:
            merged[-1][0] += length
        else:
            merged.append([length, crc])
    return results, {f"__{rank}_0.distcp": {"size": offset, "crc32c": merged, "tensors": tensors}}


def timed(fn, dcp: bool = False):
    """Seconds of ``fn``; DCP's steps with the collector paused, as dtrain runs them."""
    gc.collect()
    start = time.perf_counter()
    with gc_paused() if dcp and not AS_BEFORE else contextlib.nullcontext():
        result = fn()
    return result, time.perf_counter() - start


AS_BEFORE = False


def simulate(preset: str, world: int) -> dict:
    params = shapes(preset)
    plans = [local_plan(rank, world, params) for rank in range(world)]
    planner_class = DefaultSavePlanner if AS_BEFORE else SavePlanner  # dtrain's: a linear overlap check
    planner = planner_class(flatten_state_dict=False, enable_plan_caching=False)
    writer = FileSystemWriter(tempfile.mkdtemp(prefix="dtrain-sim-"), sync_files=False)
    writer.set_up_storage_writer(True, 0)
    (global_plan, metadata), plan_s = timed(lambda: planner.create_global_plan(plans), dcp=True)
    global_plan, prepare_s = timed(lambda: writer.prepare_global_plan(global_plan))
    outcomes = [write_results(plan, rank) for rank, plan in enumerate(global_plan)]
    shares = [entry for _, entry in outcomes]
    share_bytes = [len(pickle.dumps(share)) for share in shares]
    _, finish_s = timed(lambda: writer.finish(metadata, [results for results, _ in outcomes]), dcp=True)
    metadata_bytes = (Path(writer.path) / ".metadata").read_bytes()
    loaded, metadata_read_s = timed(
        lambda: load_metadata(io.BytesIO(metadata_bytes)) if not AS_BEFORE else _unpaused_load(metadata_bytes)
    )

    files = {name: entry for share in shares for name, entry in share.items()}
    files[".metadata"] = {"size": len(metadata_bytes), "crc32c": [[len(metadata_bytes), "0badcafe"]]}
    manifest = Manifest(
        step=1,
        tags=[],
        progress={},
        world_size=world,
        global_batch_size=world,
        micro_batch_size=1,
        config_fingerprint="",
        files=files,
    )
    text, manifest_build_s = timed(manifest.to_json)
    _, manifest_parse_s = timed(lambda: Manifest.from_json(text))

    # One rank's load plan against the stored metadata, resharded to world - 1 ranks.
    target = max(world - 1, 1)
    state = {}
    for name, shape in params.items():
        rows = -(-shape[0] // target)
        part = torch.empty((max(min(rows, shape[0] - rows), 0), *shape[1:]), device="meta")
        for key in (f"model.{name}", f"optimizer.state.{name}.exp_avg", f"optimizer.state.{name}.exp_avg_sq"):
            state[key] = _Shard(part, (rows, *[0] * (len(shape) - 1)), shape)
    load_planner = DefaultLoadPlanner(flatten_state_dict=False)
    _, load_plan_s = timed(lambda: _load_plan(load_planner, state, loaded), dcp=True)
    return {
        "items": sum(len(p.items) for p in plans),
        "plan_s": plan_s + prepare_s,
        "finish_s": finish_s,
        "metadata_mb": len(metadata_bytes) / 1e6,
        "metadata_read_s": metadata_read_s,
        "manifest_mb": len(text) / 1e6,
        "manifest_s": manifest_build_s + manifest_parse_s,
        "load_plan_s": load_plan_s,
        "gather_mb": sum(share_bytes) / 1e6,
        "all_gather_mb": world * sum(share_bytes) / 1e6,
    }


def _unpaused_load(data: bytes):
    from dtrain.checkpoint.dcp_io import _MetadataUnpickler

    return _MetadataUnpickler(io.BytesIO(data)).load()


def store_request_seconds(requests: int = 5000) -> float:
    """Seconds per ``add`` to a TCPStore on loopback, one client: the heartbeat's request."""
    import datetime

    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=30))
    start = time.perf_counter()
    for i in range(requests):
        client.add(f"dtrain/heartbeat//{i % 64}", 1)
    return (time.perf_counter() - start) / requests


class _Shard:
    """Stands in for a DTensor shard in the load planner: its chunk is rows from ``offset``."""

    def __init__(self, local, offset, size):
        self.local, self.offset, self.size = local, torch.Size(offset), torch.Size(size)


def _load_plan(planner, state, metadata):
    """DCP's per-rank load planning: each wanted chunk against every stored chunk of its tensor."""
    from torch.distributed.checkpoint.planner_helpers import _create_read_items

    items = []
    for fqn, shard in state.items():
        stored = metadata.state_dict_metadata[fqn]
        chunk = ChunkStorageMetadata(shard.offset, shard.local.shape)
        items += _create_read_items(fqn, stored, _Chunked(shard.local, chunk))
    return items


class _Chunked:
    def __init__(self, local, chunk):
        self.local, self.chunk = local, chunk

    def __create_chunk_list__(self):
        return [self.chunk]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--presets", nargs="+", default=["medium", "large"])
    parser.add_argument("--beat-s", type=float, default=5.0, help="heartbeat interval (timeout / 10, at most 5 s)")
    parser.add_argument(
        "--as-before", action="store_true", help="DCP's own planner and the collector on throughout, as before #25"
    )
    args = parser.parse_args()
    global AS_BEFORE
    AS_BEFORE = args.as_before
    for preset in args.presets:
        print(
            f"\n{preset}: one save's bookkeeping on rank 0 (seconds, MB); growth per rank = "
            "(value at the last N / value at the first N) / (last N / first N)"
        )
        print(
            "| ranks | items | global plan s | finish s | .metadata MB | .metadata read s | manifest MB "
            "| manifest build+parse s | load plan (1 rank) s | commit gather MB (to rank 0) | before: all-gather MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = {}
        for world in args.ranks:
            r = rows[world] = simulate(preset, world)
            print(
                f"| {world} | {r['items']} | {r['plan_s']:.3f} | {r['finish_s']:.3f} | {r['metadata_mb']:.2f} "
                f"| {r['metadata_read_s']:.3f} | {r['manifest_mb']:.2f} | {r['manifest_s']:.3f} "
                f"| {r['load_plan_s']:.4f} | {r['gather_mb']:.2f} | {r['all_gather_mb']:.1f} |"
            )
        first, last = args.ranks[0], args.ranks[-1]
        scale = last / first
        growth = {k: rows[last][k] / max(rows[first][k], 1e-9) / scale for k in rows[first] if k != "items"}
        print(
            f"growth per rank, N={last} vs N={first} (1.0 = linear): "
            + ", ".join(f"{k} {v:.2f}" for k, v in growth.items())
        )
    service_s = store_request_seconds()
    print(
        f"\nHeartbeat: 2 TCPStore requests per rank per {args.beat_s:g} s beat, to one store that answered "
        f"one add in {service_s * 1e6:.0f} us here (one client, loopback): "
        + ", ".join(
            f"{n} ranks {2 * n / args.beat_s:.0f}/s = {200 * n / args.beat_s * service_s:.1f}% busy" for n in args.ranks
        )
        + "; lease: rank 0 alone, one read and one write per ttl / 3 and one read per commit, whatever N."
    )


if __name__ == "__main__":
    main()
