"""Checksum functions for checkpoint bytes: GB/s on this machine, one core, side by side.

    python benchmarks/checksums.py [--mb 256]

Hashes ``--mb`` of random bytes in 4 MiB blocks (dtrain's largest checksum block)
with each function available: hashlib's SHA-256 and BLAKE2b, zlib's CRC32, the
``crc32c`` package (dtrain's choice), and xxHash and BLAKE3 where installed
(``pip install xxhash blake3``). Three rounds, interleaved; the median is shown.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import zlib


def functions() -> dict:
    import crc32c

    found = {
        "sha256 (hashlib)": lambda b: hashlib.sha256(b).digest(),
        "blake2b (hashlib)": lambda b: hashlib.blake2b(b).digest(),
        "crc32 (zlib)": zlib.crc32,
        "crc32c (crc32c)": crc32c.crc32c,
    }
    try:
        import xxhash

        found["xxh3_64 (xxhash)"] = xxhash.xxh3_64_intdigest
        found["xxh3_128 (xxhash)"] = xxhash.xxh3_128_intdigest
    except ImportError:
        pass
    try:
        import blake3

        found["blake3 (blake3)"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    data = memoryview(os.urandom(args.mb << 20))
    block = 4 << 20
    speeds: dict[str, list[float]] = {}
    for _ in range(3):
        for name, fn in functions().items():
            start = time.perf_counter()
            for offset in range(0, len(data), block):
                fn(data[offset : offset + block])
            speeds.setdefault(name, []).append(len(data) / (time.perf_counter() - start) / 1e9)
    print(f"| function | GB/s (median of 3, {args.mb} MB in 4 MiB blocks) |")
    print("|---|---|")
    for name, values in sorted(speeds.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"| {name} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
