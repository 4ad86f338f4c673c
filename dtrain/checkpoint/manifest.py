"""The commit marker: ``manifest.json``, written by rank 0 after DCP's ``.metadata``.

A checkpoint directory without a manifest is torn (a crashed or unfinished save)
and is never loaded. The manifest lists every file of the checkpoint with its
size and SHA-256, so a truncated or altered file is found before a load trusts it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .storage import sha256_of

MANIFEST = "manifest.json"
# Tags the trainer sets; any other tag is the user's and pins the checkpoint against retention.
AUTOMATIC_TAGS = {"best", "final", "preempted"}
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})(?:_(\d+))?$")


def step_directory(step: int, attempt: int = 0) -> str:
    return f"step_{step:08d}" + (f"_{attempt}" if attempt else "")


def parse_step_directory(name: str) -> tuple[int, int] | None:
    """``(step, attempt)`` of a checkpoint directory name, or None for other names."""
    match = _STEP_DIR.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


@dataclass
class Manifest:
    step: int
    tags: list[str]
    progress: dict  # epoch, samples_in_epoch, samples_seen, step
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    config_fingerprint: str
    files: dict[str, dict]  # name -> {"size": int, "sha256": str}
    metrics: dict = field(default_factory=dict)
    save: dict = field(default_factory=dict)  # mode, blocked_s, total_s
    config: dict = field(default_factory=dict)  # the run's configuration at this step
    created: float = 0.0
    format: int = FORMAT
    directory: str = ""  # filled in when read; not stored

    def to_json(self) -> str:
        values = {k: v for k, v in self.__dict__.items() if k != "directory"}
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, directory: str = "") -> "Manifest":
        values = json.loads(text)
        if values.get("format") != FORMAT:
            raise ValueError(f"manifest format {values.get('format')!r} is not {FORMAT}")
        return cls(**values, directory=directory)


def checksum_files(fs, directory: str, names: list[str]) -> dict[str, dict]:
    return {name: {"size": fs.size(f"{directory}/{name}"), "sha256": sha256_of(fs, f"{directory}/{name}")}
            for name in names}


def data_files(fs, directory: str) -> list[str]:
    """The checkpoint's files (DCP's shards and .metadata), sorted, without the manifest."""
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False))
    return [n for n in names if n != MANIFEST]


def find_problems(fs, directory: str, manifest: Manifest, names: list[str] | None = None,
                  checksums: bool = True) -> list[str]:
    """What is wrong with the listed files (all by default), one line each; empty when sound."""
    present = {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(directory, detail=True)}
    problems = []
    for name in sorted(manifest.files) if names is None else names:
        expected = manifest.files[name]
        if name not in present:
            problems.append(f"{name}: missing")
        elif present[name] != expected["size"]:
            problems.append(f"{name}: size {present[name]} bytes, manifest says {expected['size']}")
        elif checksums and sha256_of(fs, f"{directory}/{name}") != expected["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the manifest (contents altered)")
    return problems
