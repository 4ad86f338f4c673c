"""Block checksums of checkpoint files: computed as DCP writes, checked as DCP reads.

Each file's manifest entry holds a CRC32C per 1 MiB block, so any byte range a
load reads (a whole shard, or the items a resharded rank needs) is checkable
without reading anything else, and a save never reads its files back. CRC32C was
measured fastest here (benchmarks/checksums.py): detection of corruption is the
purpose, not a signature. Format 1-2 manifests hold one SHA-256 per file; they
are still checked, by reading the whole file.

Entry: ``{"size": bytes, "block": block bytes, "crc32c": 8 hex digits per block}``.
"""
from __future__ import annotations

import hashlib

import crc32c

BLOCK_BYTES = 1 << 20
_READ = 8 << 20


class CorruptCheckpointError(ValueError):
    """Bytes read from a checkpoint differ from its manifest's checksums."""


class BlockChecksum:
    """CRC32C of each ``block``-sized block of a byte stream fed in any pieces."""

    def __init__(self, block: int = BLOCK_BYTES):
        self.block = block
        self.size = 0
        self._crcs: list[int] = []
        self._crc = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            filled = self.size % self.block
            take = min(self.block - filled, len(view))
            self._crc = crc32c.crc32c(view[:take], self._crc)
            self.size += take
            view = view[take:]
            if filled + take == self.block:
                self._crcs.append(self._crc)
                self._crc = 0

    def entry(self) -> dict:
        crcs = self._crcs + ([self._crc] if self.size % self.block else [])
        return {"size": self.size, "block": self.block, "crc32c": "".join(f"{c:08x}" for c in crcs)}


def is_valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
        return False
    if "crc32c" in entry:
        block, hexes = entry.get("block"), entry["crc32c"]
        return (isinstance(block, int) and block > 0 and isinstance(hexes, str)
                and len(hexes) == 8 * -(-entry["size"] // block) and _is_hex(hexes))
    return isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64 and _is_hex(entry["sha256"])


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def has_blocks(entry: dict) -> bool:
    """Whether a partial read of this file can be checked (format 3 entries)."""
    return "crc32c" in entry


def covering(entry: dict, start: int, end: int) -> tuple[int, int]:
    """The whole blocks that hold ``[start, end)``: what a checked read must fetch."""
    block = entry["block"]
    return start - start % block, min(-(-end // block) * block, entry["size"])


def check_range(entry: dict, start: int, data, name: str) -> None:
    """Raise ``CorruptCheckpointError`` unless ``data``, read at block-aligned ``start``, matches."""
    block, view = entry["block"], memoryview(data).cast("B")
    for offset in range(0, len(view), block):
        index = (start + offset) // block
        expected = entry["crc32c"][8 * index : 8 * index + 8]
        if f"{crc32c.crc32c(view[offset : offset + block]):08x}" != expected:
            raise CorruptCheckpointError(
                f"{name}: CRC32C of bytes {start + offset}-{start + min(offset + block, len(view))} differs "
                "from the manifest (contents altered)")


def check_file(fs, path: str, entry: dict, name: str) -> str | None:
    """Read a whole file and say what is wrong with it against its entry, or None."""
    if has_blocks(entry):
        position = 0
        with fs.open(path, "rb") as f:
            while data := f.read(_READ - _READ % entry["block"]):
                try:
                    check_range(entry, position, data, name)
                except CorruptCheckpointError as error:
                    return str(error)
                position += len(data)
        return None if position == entry["size"] else f"{name}: {position} bytes, manifest says {entry['size']}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while data := f.read(_READ):
            digest.update(data)
    return None if digest.hexdigest() == entry["sha256"] else \
        f"{name}: SHA-256 differs from the manifest (contents altered)"
