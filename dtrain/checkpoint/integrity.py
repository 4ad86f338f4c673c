"""Block checksums of checkpoint files: computed as DCP writes, checked as DCP reads.

Each file's manifest entry holds a CRC32C per block. A block ends wherever DCP
asks the stream for its position (at the start and end of every stored item),
around each tensor's bytes, and at most every 4 MiB, so any set of items or
rows a load reads (a whole shard, or what a resharded rank needs) is checkable without reading
anything else, and a save never reads its files back. Where a block ends only
decides what a check covers, never whether it is right. CRC32C was measured
fastest here (benchmarks/checksums.py): detection of corruption is the purpose,
not a signature. Format 1-2 manifests hold one SHA-256 per file; they are still
checked, by reading the whole file.

Entry: ``{"size": bytes, "crc32c": [[block length, 8 hex digits], ...]}``, and
optionally ``"tensors": [[item offset, offset of its raw bytes], ...]`` (dcp_io.py):
where each stored tensor's row-major bytes start inside its ``torch.save`` archive,
so a resharded load can read just the rows it needs. The tensor bytes are cut into
blocks of about 1/16 of a tensor (16 KiB to 4 MiB), so such a read checks little
more than it uses.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re

import crc32c

MAX_BLOCK = 4 << 20
MIN_TENSOR_BLOCK = 16 << 10
TENSOR_BLOCKS = 16  # blocks per tensor (within the limits): a row range reads < 2/16 more
_READ = 8 << 20


class CorruptCheckpointError(ValueError):
    """Bytes read from a checkpoint differ from its manifest's checksums."""


class BlockChecksum:
    """CRC32C of a byte stream fed in any pieces, one per block; ``cut`` ends a block."""

    def __init__(self, max_block: int = MAX_BLOCK):
        self.max_block = max_block
        self.size = 0
        self._blocks: list[list] = []
        self._crc = self._filled = 0

    def update(self, data, max_block: int | None = None) -> None:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        max_block = max_block or self.max_block
        if self._filled + len(view) < max_block:  # most writes: a header, a name, a small item
            self._crc = crc32c.crc32c(view, self._crc)
            self._filled += len(view)
            self.size += len(view)
            return
        view = memoryview(view)
        if self._filled >= max_block:
            self.cut()
        while view:
            take = min(max_block - self._filled, len(view))
            self._crc = crc32c.crc32c(view[:take], self._crc)
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled >= max_block:
                self.cut()

    def cut(self) -> None:
        if self._filled:
            self._blocks.append([self._filled, f"{self._crc:08x}"])
            self._crc = self._filled = 0

    def entry(self) -> dict:
        self.cut()
        return {"size": self.size, "crc32c": list(self._blocks)}


def tensor_block(size: int) -> int:
    """Block length for ``size`` bytes of one tensor's data."""
    return min(max(-(-size // TENSOR_BLOCKS), MIN_TENSOR_BLOCK), MAX_BLOCK)


def is_valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
        return False
    if "tensors" in entry and not _are_offsets(entry["tensors"], entry["size"]):
        return False
    if "crc32c" in entry:
        blocks = entry["crc32c"]
        return (
            isinstance(blocks, list)
            and all(
                isinstance(b, list)
                and len(b) == 2
                and isinstance(b[0], int)
                and b[0] > 0
                and isinstance(b[1], str)
                and _CRC_HEX.fullmatch(b[1])
                for b in blocks
            )
            and sum(b[0] for b in blocks) == entry["size"]
        )
    return isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64 and _is_hex(entry["sha256"])


def _are_offsets(pairs, size: int) -> bool:
    return isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) and 0 <= p[0] < p[1] <= size
        for p in pairs
    )


_CRC_HEX = re.compile("[0-9a-f]{8}")


def _is_hex(text: str) -> bool:
    return re.fullmatch("[0-9a-f]*", text) is not None


def has_blocks(entry: dict) -> bool:
    """Whether reads of parts of this file can be checked (format 3 entries)."""
    return "crc32c" in entry


class Blocks:
    """A file's block checksums, for checking the ranges a load reads."""

    def __init__(self, name: str, entry: dict):
        self.name, self.size = name, entry["size"]
        self.starts = [0, *itertools.accumulate(length for length, _ in entry["crc32c"])]
        self.crcs = [crc for _, crc in entry["crc32c"]]

    def covering(self, start: int, end: int) -> tuple[int, int]:
        """The whole blocks that hold ``[start, end)``: what a checked read must fetch."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_left(self.starts, end)
        return self.starts[max(first, 0)], self.starts[min(last, len(self.starts) - 1)]

    def is_boundary(self, offset: int) -> bool:
        index = bisect.bisect_left(self.starts, offset)
        return index < len(self.starts) and self.starts[index] == offset

    def check(self, start: int, data) -> None:
        """Raise ``CorruptCheckpointError`` unless ``data``, read from block boundary ``start``, matches."""
        view = memoryview(data).cast("B")
        if start + len(view) > self.size or (len(view) == 0 and start != self.size):
            raise CorruptCheckpointError(f"{self.name}: read {len(view)} bytes at {start}, past its {self.size} bytes")
        index = bisect.bisect_left(self.starts, start)
        if self.starts[index] != start:
            raise ValueError(f"{self.name}: {start} is not a block boundary")
        position = start
        while position < start + len(view):
            end = self.starts[index + 1]
            if end > start + len(view):
                raise CorruptCheckpointError(
                    f"{self.name}: ends at byte {start + len(view)}, inside a block "
                    f"the manifest says ends at {end} (truncated)"
                )
            if f"{crc32c.crc32c(view[position - start : end - start]):08x}" != self.crcs[index]:
                raise CorruptCheckpointError(
                    f"{self.name}: CRC32C of bytes {position}-{end} differs from the manifest (contents altered)"
                )
            position, index = end, index + 1


def check_file(fs, path: str, entry: dict, name: str) -> str | None:
    """Read a whole file and say what is wrong with it against its entry, or None."""
    with fs.open(path, "rb") as f:
        if has_blocks(entry):
            position = 0
            for length, crc in entry["crc32c"]:
                data = f.read(length)
                if len(data) < length:
                    return f"{name}: ends at byte {position + len(data)}, manifest says {entry['size']} (truncated)"
                if f"{crc32c.crc32c(data):08x}" != crc:
                    return (
                        f"{name}: CRC32C of bytes {position}-{position + length} differs from the manifest "
                        "(contents altered)"
                    )
                position += length
            return f"{name}: longer than the manifest's {entry['size']} bytes" if f.read(1) else None
        digest = hashlib.sha256()
        while data := f.read(_READ):
            digest.update(data)
    return (
        None
        if digest.hexdigest() == entry["sha256"]
        else f"{name}: SHA-256 differs from the manifest (contents altered)"
    )
