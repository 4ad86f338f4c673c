"""dtrain's DCP reader reads just the rows a request needs, where the manifest says where a
stored tensor's bytes are, and gives exactly what DCP's own ``torch.load`` path gives."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dtrain.checkpoint.dcp_io import CheckedFileSystemReader, CheckedFileSystemWriter
from dtrain.checkpoint.integrity import CorruptCheckpointError, is_valid_entry, tensor_block

STATE = {
    "weight": torch.randn(300, 70),
    "bf16": torch.randn(40, 3, 5).to(torch.bfloat16),
    "steps": torch.arange(1000, dtype=torch.int64),
    "transposed": torch.randn(64, 48).t(),  # not contiguous: stored as rows all the same
    "conj": torch.randn(20, 6, dtype=torch.complex128).conj(),  # a flag beside the bytes, in torch.save
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


class _Collect:
    """The two calls of DCP's load planner that ``read_data`` makes."""

    def __init__(self):
        self.loaded = {}

    def resolve_tensor(self, request):
        return torch.empty(request.lengths, dtype=STATE[request.dest_index.fqn].dtype)

    def commit_tensor(self, request, tensor):
        self.loaded[request.dest_index.fqn, tuple(request.storage_offsets)] = tensor.clone()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("dcp")
    writer = CheckedFileSystemWriter(path)
    dcp.save(STATE, storage_writer=writer, no_dist=True)
    return path, writer.written


def read(path, checksums, requests):
    reader = CheckedFileSystemReader(path, checksums=checksums)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    planner = _Collect()
    items = [
        ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=MetadataIndex(fqn),
            dest_offsets=torch.Size([0] * len(o)),
            storage_index=MetadataIndex(fqn, torch.Size([0] * len(o))),
            storage_offsets=torch.Size(o),
            lengths=torch.Size(n),
        )
        for fqn, o, n in requests
    ]
    reader.read_data(LoadPlan(items), planner).wait()
    return planner.loaded


PARTS = [
    ("weight", (0, 0), (300, 70)),
    ("weight", (101, 0), (57, 70)),
    ("weight", (299, 10), (1, 20)),
    ("bf16", (7, 1, 2), (30, 2, 3)),
    ("steps", (999,), (1,)),
    ("transposed", (5, 3), (40, 60)),
    ("conj", (3, 1), (9, 4)),
    ("scalar", (), ()),
    ("empty", (0, 0), (0, 4)),
]


def test_row_reads_give_what_the_stored_tensors_hold(saved):
    path, written = saved
    entry = written["__0_0.distcp"]
    assert is_valid_entry(entry) and len(entry["tensors"]) == 6  # every tensor with bytes
    for checksums in (written, {name: {k: v for k, v in e.items() if k != "tensors"} for name, e in written.items()}):
        loaded = read(path, checksums, PARTS)
        for fqn, offsets, lengths in PARTS:
            want = STATE[fqn]
            for dim, (start, length) in enumerate(zip(offsets, lengths)):
                want = want.narrow(dim, start, length)
            assert torch.equal(loaded[fqn, offsets], want), fqn


def with_flipped_weight_byte(path, written, at: int, name: str):
    """A copy of the checkpoint with one byte of ``weight``'s stored values flipped, ``at``
    bytes into them."""
    stored = CheckedFileSystemReader(path).read_metadata().storage_data[MetadataIndex("weight", torch.Size([0, 0]))]
    damaged = path.parent / name
    damaged.mkdir(exist_ok=True)
    for file in path.iterdir():
        data = bytearray(file.read_bytes())
        if file.name == stored.relative_path:
            data[dict(map(tuple, written[file.name]["tensors"]))[stored.offset] + at] ^= 1
        (damaged / file.name).write_bytes(data)
    return damaged


def test_a_row_read_fetches_and_checks_only_blocks_near_its_rows(saved, monkeypatch):
    path, written = saved
    fetched = []
    original = CheckedFileSystemReader._fetch
    monkeypatch.setattr(
        CheckedFileSystemReader,
        "_fetch",
        staticmethod(lambda p, start, end: fetched.append(end - start) or original(p, start, end)),
    )
    loaded = read(path, written, [("weight", (101, 0), (57, 70))])
    row_bytes = 70 * 4
    assert torch.equal(loaded["weight", (101, 0)], STATE["weight"][101:158])
    assert 57 * row_bytes <= sum(fetched) <= 57 * row_bytes + 2 * tensor_block(300 * row_bytes)  # whole blocks

    damaged = with_flipped_weight_byte(path, written, 120 * row_bytes, "damaged")
    with pytest.raises(CorruptCheckpointError, match="CRC32C"):
        read(damaged, written, [("weight", (101, 0), (57, 70))])


def test_a_manifest_offset_that_does_not_fit_the_archive_is_refused(saved):
    path, written = saved
    for shift in (1, 64, -64):
        damaged = {name: dict(entry) for name, entry in written.items()}
        damaged["__0_0.distcp"]["tensors"] = [[item, data + shift] for item, data in written["__0_0.distcp"]["tensors"]]
        with pytest.raises(CorruptCheckpointError, match="does not fit its item"):
            read(path, damaged, [("weight", (101, 0), (57, 70))])


def test_a_gap_is_read_through_when_a_request_costs_more_than_its_bytes(saved, monkeypatch):
    path, written = saved
    wanted = [("weight", (0, 0), (10, 70)), ("weight", (200, 0), (10, 70))]  # 190 rows apart
    original = CheckedFileSystemReader._fetch
    for request_s, requests in ((1e-6, 2), (1e-3, 1)):  # 1 KB or 1 MB read through at 1 GB/s
        fetched = []
        monkeypatch.setattr(CheckedFileSystemReader, "request_s", request_s)
        monkeypatch.setattr(
            CheckedFileSystemReader,
            "_fetch",
            staticmethod(lambda p, start, end: fetched.append(end - start) or original(p, start, end)),
        )
        loaded = read(path, written, wanted)
        assert len(fetched) == requests, fetched
        assert torch.equal(loaded["weight", (200, 0)], STATE["weight"][200:210])

    # A byte flipped in the gap read through (rows 100-109, needed by no request) is still
    # caught: every block a request brings back is checked, used or not.
    damaged = with_flipped_weight_byte(path, written, 100 * 70 * 4, "damaged-gap")
    with pytest.raises(CorruptCheckpointError, match="CRC32C"):
        read(damaged, written, wanted)


def test_the_save_plan_check_finds_overlapping_chunks_of_a_wide_sharded_tensor():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata as Stored

    from dtrain.checkpoint.dcp_io import _chunk_problems

    def stored(rows):  # a 64 x 4096 matrix in dim-0 chunks, as FSDP2 stores it
        chunks = [ChunkStorageMetadata(torch.Size([a, 0]), torch.Size([b - a, 4096])) for a, b in rows]
        return Metadata({"w": Stored(TensorProperties(dtype=torch.float32), torch.Size([64, 4096]), chunks)})

    assert _chunk_problems(stored([(i, i + 1) for i in range(64)]), 64) == []
    assert _chunk_problems(stored([(0, 33), (32, 64)]), 2)[0] == "w: chunks overlap"
    assert _chunk_problems(stored([(0, 32), (33, 64)]), 2) == ["w: chunks do not fill the tensor"]
    assert "out of bounds" in _chunk_problems(stored([(0, 32), (32, 65)]), 2)[0]
