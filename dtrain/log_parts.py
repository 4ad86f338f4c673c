"""A log on an object store as immutable parts, kept to a bounded number by merging.

Each shipment of lines is one object, ``part-<time_ns>-<pid>.jsonl``, written once
(docs/run-directory.md, "Logs on object storage"). A month-long run would leave
thousands, and a reader pays one GET for each. So the writer merges:

- once ``MERGE_AT`` loose parts have piled up, it writes their lines, in order, as
  one ``merged-L1-<first>_to_<last>.jsonl`` (the keys of the first and last part it holds);
- once ``MERGE_AT`` merged objects of one level have piled up, they become one of the
  next level, and so on. A log of ``n`` parts is fewer than ``MERGE_AT`` objects per level,
  ``log(n) / log(MERGE_AT)`` levels (2 for a month of events at ``MERGE_AT = 32``), and each
  line is rewritten once per level.

The merged object is written before the objects it holds are deleted. A reader that
lists in between, or after a writer died in between, sees both: an object whose key
range lies inside another's is skipped, so every line is read exactly once.
"""

from __future__ import annotations

import os
import re
import time

MERGE_AT = 32
_PART = re.compile(r"part-(\d{20})-(\d+)\.jsonl")
_MERGED = re.compile(r"merged-L(\d+)-(\d{20})-(\d+)_to_(\d{20})-(\d+)\.jsonl")

Key = tuple[int, int]  # (time_ns, pid) of a part


def new_part_name() -> str:
    return f"part-{time.time_ns():020d}-{os.getpid()}.jsonl"


def key_range(name: str) -> tuple[Key, Key] | None:
    """The keys of the first and last part an object holds; None for a name that is no part."""
    if m := _PART.fullmatch(name):
        key = (int(m[1]), int(m[2]))
        return key, key
    if m := _MERGED.fullmatch(name):
        return (int(m[2]), int(m[3])), (int(m[4]), int(m[5]))
    return None


def level(name: str) -> int:
    """0 for a part; L for an object merged from ``MERGE_AT`` objects of level L - 1."""
    m = _MERGED.fullmatch(name)
    return int(m[1]) if m else 0


def visible(names: list[str]) -> list[str]:
    """The objects to read, in order: parts and merged objects not held by a larger one."""
    ranges = sorted(
        ((r, name) for name in names if (r := key_range(name))), key=lambda item: (item[0][0], _negated(item[0][1]))
    )
    shown, reach = [], None
    for (_, last), name in ranges:
        if reach is not None and last <= reach:
            continue  # inside an object listed before it: merged there, not deleted yet
        shown.append(name)
        reach = last
    return shown


def held(names: list[str], shown: list[str]) -> list[str]:
    """Objects left behind by a merge whose deletes did not all happen."""
    return [name for name in names if key_range(name) and name not in shown]


def to_merge(shown: list[str]) -> list[str]:
    """What the writer merges now: the newest objects, once ``MERGE_AT`` of them share a level
    (older objects never have a lower level); else nothing."""
    run = []
    for name in reversed(shown):
        if run and level(name) != level(run[0]):
            break
        run.append(name)
    return run[::-1] if len(run) >= MERGE_AT else []


def merged_name(group: list[str]) -> str:
    (first, _), (_, last) = key_range(group[0]), key_range(group[-1])
    return f"merged-L{level(group[0]) + 1}-{first[0]:020d}-{first[1]}_to_{last[0]:020d}-{last[1]}.jsonl"


def _negated(key: Key) -> Key:
    return (-key[0], -key[1])
