"""How dtrain's checkpoints pass through DCP's storage layer: every byte once, checked.

DCP's ``FileSystemWriter``/``Reader`` (local) and ``FsspecWriter``/``Reader``
(object storage) do the I/O, in DCP's own format, so plain PyTorch tools read
the result. dtrain adds three things (docs/design.md, "Checkpoint I/O"):

- **Checksums in the write.** Every file DCP writes goes through a CRC32C per
  block (integrity.py); the writer hands them to the manifest, so a save reads
  nothing back. It also notes where each tensor's raw bytes sit inside its
  ``torch.save`` archive (``"tensors"`` in the manifest entry).
- **Few, large, checked reads.** DCP 2.13's ``read_data`` reads item by item (one
  request per tensor on object storage, plus read-ahead). Here a rank sorts the
  items it needs per file, merges neighbours (and gaps cheaper to read through than
  to skip, by a latency and bandwidth cost model) into spans of up to 64 MiB, fetches
  each span in one request (a few in parallel on object storage), checks every
  block against the manifest, then hands the items to DCP's planner exactly as
  DCP does. Where the manifest gives a tensor's offset, a rank reads just the
  rows it needs (a resharded load). Bad bytes raise ``CorruptCheckpointError``:
  the load falls back.
- **Loading runs no code.** ``.metadata`` is unpickled by an unpickler that admits
  only DCP's metadata types, and small non-tensor values are read with
  ``torch.load(weights_only=True)`` (docs/design.md, "Trust boundary").
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import io
import math
import os
import pickle
import sys
import threading
import warnings
from collections import ChainMap, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    _check_box_bounds,
    _check_box_overlap,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem, WriteItem, WriteItemType
from torch.futures import Future

from .integrity import BlockChecksum, Blocks, CorruptCheckpointError, has_blocks, tensor_block

SPAN_BYTES = 64 << 20  # the most one read request fetches, unless one item is larger
METADATA = ".metadata"


# ---- writing: checksums as the bytes go out ------------------------------------------------
_ZIP_RECORD = b"PK\x03\x04"  # a zip local header; torch.save writes each one in a single 30-byte write
_ALIGNMENT = 64  # torch.save's default storage alignment, from the start of the archive


class _ChecksummingStream:
    """A write stream that feeds every byte written to a ``BlockChecksum``, and notes where
    each tensor storage that ``torch.save`` writes lands (``tensor_data``)."""

    def __init__(self, raw):
        self.raw = raw
        self.checksum = BlockChecksum()
        self.position = raw.tell()
        # item offset -> [(zip record name, offset, length)] of the storages written in that item
        self.tensor_data: dict[int, list[tuple[str, int, int]]] = {}
        self._item = self.position
        self._header: tuple[int, int] | None = None  # name and extra-field lengths of a record begun
        self._storage: tuple[str, int] | None = None  # name and data offset of a storage record begun

    def write(self, data) -> int:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        at = self.position
        written = self.raw.write(data)
        view = view if written is None or written == len(view) else view[:written]
        if self._storage is not None and self._storage[1] == at:
            # A storage's bytes (torch.save writes them in one call): blocks of their own,
            # small enough that a read of some rows checks little else.
            self.checksum.cut()
            self.checksum.update(view, tensor_block(len(view)))
            self.checksum.cut()
            self.tensor_data.setdefault(self._item, []).append((self._storage[0], at, len(view)))
            self._storage = None
        else:
            self.checksum.update(view)
            self._follow_zip(view, at)
        self.position = at + len(view)
        return len(view)

    def _follow_zip(self, view: memoryview, at: int) -> None:
        """torch.save writes a record as a header, its name, its extra field, its data: a
        record named ``.../data/N`` holds a storage, and its data starts right after."""
        if self._header is not None:
            name_length, extra_length = self._header
            self._header = None
            name = bytes(view) if len(view) == name_length else b""
            if b"/data/" in name:
                self._storage = (name.decode("utf-8", "replace"), at + name_length + extra_length)
        elif len(view) == 30 and view[:4] == _ZIP_RECORD:
            self._header = (int.from_bytes(view[26:28], "little"), int.from_bytes(view[28:30], "little"))

    def tell(self) -> int:
        # DCP asks for the position where each stored item starts and ends: a block boundary,
        # so a load that reads some items checks exactly those bytes.
        self.checksum.cut()
        self._item, self._header, self._storage = self.position, None, None
        return self.raw.tell()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name):  # flush, close, fileno: the raw stream's
        return getattr(self.raw, name)


class _ChecksummedFiles:
    """DCP's file-system object, with each file written recorded as a manifest entry."""

    def __init__(self, inner):
        self.inner = inner
        self.entries: dict[str, dict] = {}
        self.tensor_data: dict[str, dict[int, list]] = {}  # file -> its streams' ``tensor_data``

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with self.inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            checksummed = _ChecksummingStream(stream)
            yield checksummed
            name = os.path.basename(os.fspath(path))
            self.entries[name] = checksummed.checksum.entry()
            self.tensor_data[name] = checksummed.tensor_data

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name
        self.inner.rename(path, new_path)
        entry = self.entries.pop(os.path.basename(os.fspath(path)), None)
        if entry is not None:
            self.entries[os.path.basename(os.fspath(new_path))] = entry


class _RowMajorPlanner:
    """A save planner whose tensors are contiguous, so each stored storage is the tensor's
    rows in order (DCP keeps a dense tensor's strides; FSDP2's shards are contiguous already)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def resolve_data(self, item: WriteItem):
        data = self.inner.resolve_data(item)
        if not isinstance(data, torch.Tensor):
            return data
        # torch.save keeps a conjugate or negative view's flag beside the bytes: resolve it
        return data.resolve_conj().resolve_neg().contiguous()


class SavePlanner(DefaultSavePlanner):
    """DCP's save planner, with its global plan's overlap check linear in ranks.

    DCP 2.13 checks that no two stored chunks of a tensor overlap by sweeping the tensor's
    largest dimension. FSDP2 splits dimension 0, so for a matrix wider than tall every chunk
    spans the whole sweep and is compared with every other: quadratic in ranks (15 of a
    first save's 21 s of planning at 1,024 ranks of ``large``, benchmarks/scale_sim.py). Here
    the sweep runs along the dimension the chunks are split on; the checks are DCP's own.
    """

    def _create_global_plan(self, all_plans):
        plans = self._dedup_save_plans(all_plans)
        global_plan, metadata = create_default_global_save_plan(plans)
        if self.flatten_state_dict:
            mappings = dict(ChainMap(*(plan.planner_data for plan in global_plan)))
            metadata = dataclasses.replace(metadata, planner_data=mappings)
        if problems := _chunk_problems(metadata, len(global_plan)):
            raise ValueError(f"Failed to validate global plan: {'; '.join(problems)[:500]}")
        return global_plan, metadata


def _chunk_problems(metadata, ranks: int) -> list[str]:
    """Chunks out of their tensor's bounds, overlapping, or not covering it (DCP's checks)."""
    problems = []
    for fqn, stored in metadata.state_dict_metadata.items():
        if not isinstance(stored, TensorStorageMetadata) or len(stored.size) == 0:
            continue
        chunks = stored.chunks
        problems += [f"{fqn}: chunk {c} out of bounds" for c in chunks if not _check_box_bounds(stored.size, c)]
        dims = range(len(stored.size))
        split = max(dims, key=lambda d: len({c.offsets[d] for c in chunks}))  # where the chunks differ
        active: list[tuple[int, int]] = []  # (end along split, chunk index), sorted
        for i in sorted(range(len(chunks)), key=lambda i: tuple(chunks[i].offsets[d] for d in (split, *dims))):
            start = chunks[i].offsets[split]
            del active[: bisect.bisect_right(active, (start, sys.maxsize))]
            problems += [f"{fqn}: chunks overlap" for _, j in active if _check_box_overlap(chunks[i], chunks[j])]
            bisect.insort(active, (start + chunks[i].sizes[split], i))
        if ranks > 1 and sum(math.prod(c.sizes) for c in chunks) != math.prod(stored.size):
            problems.append(f"{fqn}: chunks do not fill the tensor")
    return problems


class _ChecksummedWrites:
    """A DCP writer whose ``written`` gives this rank's files as manifest entries."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fs = _ChecksummedFiles(self.fs)

    in_background = False  # set for an async save: DCP's own thread then plans, writes and finishes

    def set_up_storage_writer(self, *args, **kwargs):
        if self.in_background and threading.current_thread() is not threading.main_thread():
            _yield_to_training()  # that thread (one per save) uses what the steps leave idle
        return super().set_up_storage_writer(*args, **kwargs)

    def write_data(self, plan, planner):
        # Items that every rank reads on any load (objects, unsharded tensors such as AdamW's
        # step counts) go first, so a rank reads them from one region in one request rather
        # than from one place per parameter across another rank's file.
        items = sorted(plan.items, key=lambda item: not _every_rank_reads(item))
        future = super().write_data(dataclasses.replace(plan, items=items), _RowMajorPlanner(planner))
        self._record_tensor_offsets(items, future.wait())  # DCP's file writers finish before returning
        return future

    def _record_tensor_offsets(self, items: list[WriteItem], results) -> None:
        """Each stored tensor whose archive holds its rows as one storage of exactly its
        bytes gets ``[item offset, offset of those bytes]`` in its file's entry."""
        by_index = {item.index: item for item in items}
        found: dict[str, list[list[int]]] = {}
        for result in results:
            item, stored = by_index.get(result.index), result.storage_data
            if item is None or item.type == WriteItemType.BYTE_IO or stored.transform_descriptors:
                continue
            storages = self.fs.tensor_data.get(stored.relative_path, {}).get(stored.offset, [])
            if len(storages) != 1:
                continue
            name, start, length = storages[0]
            size = math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
            if (
                name.endswith("/data/0")
                and length == size > 0
                and start + size <= stored.offset + stored.length
                and (start - stored.offset) % _ALIGNMENT == 0
                and sys.byteorder == "little"
            ):
                found.setdefault(stored.relative_path, []).append([stored.offset, start])
        for name, offsets in found.items():
            self.fs.entries[name]["tensors"] = sorted(offsets)

    def finish(self, metadata, results) -> None:
        with gc_paused():  # rank 0 pickles every rank's storage entries into .metadata
            super().finish(metadata, results)

    @property
    def written(self) -> dict[str, dict]:
        return dict(self.fs.entries)


def _yield_to_training() -> None:
    """This thread runs only when a core would otherwise be idle (Linux's SCHED_IDLE). An
    unprivileged thread cannot go back, so only a thread that ends with its save is lowered."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: write at normal priority
        pass


def _every_rank_reads(item: WriteItem) -> bool:
    return item.type == WriteItemType.BYTE_IO or list(item.tensor_data.chunk.sizes) == list(item.tensor_data.size)


class CheckedFileSystemWriter(_ChecksummedWrites, FileSystemWriter):
    pass


class CheckedFsspecWriter(_ChecksummedWrites, FsspecWriter):
    pass


# ---- reading: few requests, each byte once, checked ---------------------------------------
class UnsafeCheckpointError(ValueError):
    """A checkpoint's .metadata is damaged or asks to run code; it is never loaded."""


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes by name, torch.Size, dtypes and layouts: nothing else,
    and no dotted names (which would reach any attribute of an allowed module)."""

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in _METADATA_CLASSES:
                return super().find_class(module, name)
            value = getattr(torch, name, None) if module == "torch" else None
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata (it could run code)")


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off while DCP builds or reads its plans and metadata. Those are
    object graphs of every rank's items (a million at 1,024 ranks of ``large``), and each
    collection pass walks everything alive, so with it on the time grows faster than the
    graph: reading 27 MB of .metadata took 2.1 s, 0.5 s paused (benchmarks/scale_sim.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_metadata(stream):
    from torch.distributed.checkpoint.metadata import Metadata

    with gc_paused():
        metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


@dataclass
class _Span:
    """One read request: ``[start, end)`` of ``file``, and the items it holds."""

    file: str
    start: int
    end: int
    items: list[tuple[int, int, list[ReadItem]]] = field(default_factory=list)  # offset, length, requests


class _CheckedReads:
    """``read_metadata`` and ``read_data`` for DCP's readers, checked against ``checksums``
    (the manifest's file entries; None reads unchecked)."""

    read_threads = 1
    # The cost model of a read: a request costs ``request_s`` before its first byte, then
    # bytes stream at ``stream_bytes_per_s``. A gap between two needed ranges is read through
    # when streaming it is cheaper than a request: gaps under latency x bandwidth.
    request_s = 0.0001  # local disk: a read call and a seek
    stream_bytes_per_s = 1e9
    _metadata = None

    def __init__(self, path, checksums: dict | None = None, **options):
        super().__init__(path, **options)
        self.checksums = checksums
        self._blocks_of: dict[str, Blocks | None] = {}
        self._starts_of: dict[str, dict[int, int]] = {}

    def read_metadata(self, *args, **kwargs):
        """The restricted unpickler instead of ``pickle.load``, on checked bytes. The result
        is kept, so a caller can read (and vet) the metadata before ``dcp.load`` without a
        second read: DCP logs a failed metadata read with a traceback on the root logger."""
        from torch.distributed.checkpoint.metadata import StorageMeta

        if self._metadata is None or kwargs.get("rank") is not None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                data = stream.read()
            if blocks := self._blocks(METADATA):
                blocks.check(0, data)
                if len(data) != blocks.size:
                    raise CorruptCheckpointError(f"{METADATA}: {len(data)} bytes, manifest says {blocks.size}")
            try:
                metadata = load_metadata(io.BytesIO(data))
            except (
                pickle.UnpicklingError,
                EOFError,
                AttributeError,
                ImportError,
                IndexError,
                TypeError,
                ValueError,
            ) as error:
                raise UnsafeCheckpointError(f".metadata: {error}") from None
            if kwargs.get("rank") is not None:
                return metadata
            self._metadata = metadata
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def set_up_storage_reader(self, metadata, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, *args, **kwargs)
        self._stored_tensors = metadata.state_dict_metadata  # chunk shapes and dtypes, for row reads

    def read_data(self, plan, planner) -> Future:
        wanted: dict[tuple[str, int, int], list[tuple[ReadItem, _Rows | None]]] = {}
        for request in plan.items:
            stored = self.storage_data[request.storage_index]
            rows = self._rows(request, stored)
            where = (rows.start, rows.length) if rows else (stored.offset, stored.length)
            wanted.setdefault((stored.relative_path, *where), []).append((request, rows))
        for span, data in self._fetched(self._spans(wanted)):
            with memoryview(data) as view:
                for offset, length, requests in span.items:
                    _deliver(view[offset - span.start : offset - span.start + length], requests, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _rows(self, request: ReadItem, stored) -> _Rows | None:
        """The bytes of just the rows ``request`` needs, where the manifest says where the stored
        tensor's bytes start (``"tensors"``); None reads the whole item with ``torch.load``."""
        starts = self._tensor_starts(stored.relative_path)
        data_start = starts.get(stored.offset)
        if data_start is None or request.type == LoadItemType.BYTE_IO or sys.byteorder != "little":
            return None
        tensor = self._stored_tensors[request.storage_index.fqn]
        sizes = _chunk(tensor, request.storage_index).sizes
        row = math.prod(sizes[1:]) * tensor.properties.dtype.itemsize
        first, count = (request.storage_offsets[0], request.lengths[0]) if sizes else (0, 1)
        end = data_start + (sizes[0] if sizes else 1) * row
        blocks = self._blocks(stored.relative_path)
        # The writer cut blocks around exactly these bytes, at an aligned offset of the archive:
        # an offset that does not fit is a damaged manifest, not a place to read values from.
        if (
            end > stored.offset + stored.length
            or (data_start - stored.offset) % _ALIGNMENT
            or not blocks
            or not blocks.is_boundary(data_start)
            or not blocks.is_boundary(end)
        ):
            raise CorruptCheckpointError(
                f"{stored.relative_path}: the manifest's offset of "
                f"{request.storage_index.fqn}'s bytes does not fit its item"
            )
        if count * row == 0:
            return None
        shape = (count, *sizes[1:]) if sizes else ()
        return _Rows(data_start + first * row, count * row, tensor.properties.dtype, shape)

    def _tensor_starts(self, file: str) -> dict[int, int]:
        """Item offset -> where its tensor's raw bytes start, as the manifest lists them."""
        if file not in self._starts_of:
            entry = (self.checksums or {}).get(file) or {}
            self._starts_of[file] = dict(map(tuple, entry.get("tensors", [])))
        return self._starts_of[file]

    def _blocks(self, file: str) -> Blocks | None:
        """The checksums to check ``file`` against, or None when reads are unchecked."""
        if self.checksums is None:
            return None
        if file not in self._blocks_of:
            entry = self.checksums.get(file)
            if entry is None:
                raise CorruptCheckpointError(f"{file}: not listed in the manifest")
            self._blocks_of[file] = Blocks(file, entry) if has_blocks(entry) else None  # SHA-256: checked before
        return self._blocks_of[file]

    def _spans(self, wanted: dict) -> list[_Span]:
        """Requests in offset order per file; neighbours, and gaps cheaper to read than to skip
        (the cost model above), merged up to ``SPAN_BYTES``. A checked read covers whole blocks."""
        read_through = self.request_s * self.stream_bytes_per_s
        spans: list[_Span] = []
        for file, offset, length in sorted(wanted):
            blocks = self._blocks(file)
            start, end = blocks.covering(offset, offset + length) if blocks else (offset, offset + length)
            last = spans[-1] if spans else None
            if (
                last is None
                or last.file != file
                or start > last.end + read_through
                or (max(end, last.end) - last.start > SPAN_BYTES and last.items)
            ):
                last = _Span(file, start, end)
                spans.append(last)
            last.end = max(last.end, end)
            last.items.append((offset, length, wanted[file, offset, length]))
        return spans

    def _fetched(self, spans: list[_Span]):
        """``(span, bytes)`` in order, with up to ``read_threads`` requests in flight."""
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="dtrain-read") as pool:
            in_flight: deque = deque()
            for span in spans:
                in_flight.append((span, pool.submit(self._fetch_checked, span)))
                if len(in_flight) > self.read_threads:
                    done, future = in_flight.popleft()
                    yield done, future.result()
            while in_flight:
                done, future = in_flight.popleft()
                yield done, future.result()

    def _fetch_checked(self, span: _Span) -> bytes:
        data = self._fetch(self.fs.concat_path(self.path, span.file), span.start, span.end)
        if len(data) != span.end - span.start:
            raise CorruptCheckpointError(f"{span.file}: ends before byte {span.end} (truncated)")
        if blocks := self._blocks(span.file):
            blocks.check(span.start, data)
        return data


@dataclass(frozen=True)
class _Rows:
    """``length`` raw bytes at ``start``: rows of a stored tensor, of ``shape`` together."""

    start: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def tensor(self, data) -> torch.Tensor:
        with warnings.catch_warnings():  # the buffer is read-only: the tensor is only copied from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(data, dtype=torch.uint8)
        if raw.data_ptr() % _ALIGNMENT:  # kernels may assume aligned elements (complex128: 16 bytes)
            raw = raw.clone()
        return raw.view(self.dtype).view(self.shape)


def _chunk(tensor, index):
    """The stored chunk ``index`` names (its ``index`` field is a hint DCP sets)."""
    hint = index.index
    if hint is not None and hint < len(tensor.chunks) and tensor.chunks[hint].offsets == index.offset:
        return tensor.chunks[hint]
    return next(chunk for chunk in tensor.chunks if chunk.offsets == index.offset)


def _deliver(data: memoryview, requests: list[tuple[ReadItem, _Rows | None]], planner) -> None:
    """Hand one stored item, or the rows read of it, to DCP's planner, as DCP's own
    ``read_data`` does."""
    if requests[0][0].type == LoadItemType.BYTE_IO:
        for request, _ in requests:
            planner.load_bytes(request, io.BytesIO(data))
        return
    rows = requests[0][1]
    stored = rows.tensor(data) if rows else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for request, _ in requests:
        if rows:  # just the rows were read: narrow the other dimensions
            offsets = [0, *request.storage_offsets[1:]][: stored.dim()]
            lengths = [*stored.shape[:1], *request.lengths[1:]]
        else:
            offsets, lengths = request.storage_offsets, request.lengths
        part = narrow_tensor_by_index(stored, offsets, lengths)
        target = planner.resolve_tensor(request).detach()
        if target.size() != part.size():
            raise CorruptCheckpointError(
                f"{request.storage_index.fqn}: stored {tuple(part.size())}, expected {tuple(target.size())}"
            )
        target.copy_(part)
        planner.commit_tensor(request, target)


class CheckedFileSystemReader(_CheckedReads, FileSystemReader):
    @staticmethod
    def _fetch(path, start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


class CheckedFsspecReader(_CheckedReads, FsspecReader):
    # Object stores answer parallel ranged GETs faster than one at a time. A GET waits tens of
    # ms for its first byte, then streams at about 90 MB/s (S3, one connection): gaps under
    # ~2.7 MB are read through (benchmarks/README.md, "Checkpoint I/O").
    read_threads = 8
    request_s = 0.03
    stream_bytes_per_s = 90e6

    def _fetch(self, path, start: int, end: int) -> bytes:
        return self.fs.fs.cat_file(os.fspath(path), start=start, end=end)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but small non-tensor values are read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
