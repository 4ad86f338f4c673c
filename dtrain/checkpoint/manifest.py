"""The commit marker: ``manifest.json``, written by rank 0 after DCP's ``.metadata``.

A checkpoint directory without a manifest is torn (a crashed or unfinished save)
and is never loaded. The manifest lists every file of the checkpoint with its
size and checksums (a CRC32C per block, integrity.py), so a truncated or altered
file is found by the load that reads it. A manifest that cannot be read, or that does not describe a DCP checkpoint
(no ``.metadata``, no shard), is *damaged*: never a commit.

Format 2 adds ``sequence`` (commit order: "latest" is the newest commit, not the
highest step, so a resumed older step starts a new line of history) and
``parent`` (the checkpoint this one continues). Format 1 manifests are still
read: their commit order is their step order. Format 3 replaces each file's
SHA-256 (formats 1-2, still read and checked whole) with block checksums computed
as DCP wrote the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .integrity import check_file, has_blocks, is_valid_entry

MANIFEST = "manifest.json"
REJECTED = "rejected.json"  # the quarantine marker of a checkpoint found unusable
METADATA = ".metadata"
# Tags the trainer sets; any other tag is the user's and pins the checkpoint against retention.
AUTOMATIC_TAGS = {"best", "final", "preempted"}
FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
_STEP_DIR = re.compile(r"^step_(\d{8,})(?:_(\d+))?$")


class ManifestError(ValueError):
    """A manifest that is not a commit: unreadable, or not describing its checkpoint."""


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
    files: dict[str, dict]  # name -> {"size", "crc32c", optional "tensors"} (format 3) or {"size", "sha256"}
    metrics: dict = field(default_factory=dict)
    save: dict = field(default_factory=dict)  # mode, blocked_s, total_s
    config: dict = field(default_factory=dict)  # the run's configuration at this step
    created: float = 0.0
    format: int = FORMAT
    sequence: int = 0  # commit order within the run (0: a format 1 manifest)
    parent: str | None = None  # directory this checkpoint continues; None for the first
    copy_of: str | None = None  # a tagged copy of that directory: never "latest", never counted by keep_last
    directory: str = ""  # filled in when read; not stored

    def to_json(self) -> str:
        values = {k: v for k, v in self.__dict__.items() if k != "directory"}
        # One line: a file has ~16 checksum blocks per tensor, and indenting would triple the size
        return json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def order(self) -> tuple[int, int, int]:
        """Commit order: format 2 by sequence; format 1 (sequence 0) by step and attempt."""
        step, attempt = parse_step_directory(self.directory) or (self.step, 0)
        return self.sequence, step, attempt

    @property
    def checked_as_read(self) -> bool:
        """Whether a load can check each byte as it reads it (block checksums, format 3)."""
        return all(has_blocks(entry) for entry in self.files.values())

    @classmethod
    def from_json(cls, text: str, directory: str = "") -> Manifest:
        """Parse and check a manifest; ``ManifestError`` names what is wrong with it."""
        try:
            values = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"not valid JSON ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ManifestError(f"a JSON {type(values).__name__}, not an object")
        if values.get("format") not in READABLE_FORMATS:
            raise ManifestError(f"format {values.get('format')!r} is not one of {READABLE_FORMATS}")
        known = set(cls.__dataclass_fields__) - {"directory"}
        values = {k: v for k, v in values.items() if k in known}
        for name, kind in (
            ("step", int),
            ("tags", list),
            ("progress", dict),
            ("world_size", int),
            ("global_batch_size", int),
            ("micro_batch_size", int),
            ("config_fingerprint", str),
            ("files", dict),
        ):
            if not isinstance(values.get(name), kind) or isinstance(values.get(name), bool):
                raise ManifestError(f"field {name!r} is missing or not a {kind.__name__}")
        for name, kind in (
            ("metrics", dict),
            ("save", dict),
            ("config", dict),
            ("sequence", int),
            ("created", (int, float)),
        ):
            if name in values and not isinstance(values[name], kind):
                raise ManifestError(f"field {name!r} has the wrong type")
        if values["step"] < 0 or values["world_size"] < 1 or values.get("sequence", 0) < 0:
            raise ManifestError("step, world_size or sequence out of range")
        if not all(isinstance(t, str) for t in values["tags"]):
            raise ManifestError("tags are not strings")
        for name in ("parent", "copy_of"):
            if values.get(name) is not None and not isinstance(values[name], str):
                raise ManifestError(f"field {name!r} is not a directory name")
        files = values["files"]
        for name, entry in files.items():
            if not is_valid_entry(entry):
                raise ManifestError(f"entry for {name!r} is not {{size, block, crc32c}} or {{size, sha256}}")
            if "/" in name or name in ("", ".", ".."):
                raise ManifestError(f"file name {name!r} is not a name inside the checkpoint")
        if METADATA not in files or not any(name.endswith(".distcp") for name in files):
            raise ManifestError("it does not list DCP's .metadata and shards")
        metrics = values.get("metrics", {})
        if any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
            raise ManifestError("its metrics are not finite")
        return cls(**values, directory=directory)


def data_files(fs, directory: str) -> list[str]:
    """The checkpoint's files (DCP's shards and .metadata), sorted, without dtrain's own."""
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False))
    return [n for n in names if n not in (MANIFEST, REJECTED)]


def find_problems(
    fs, directory: str, manifest: Manifest, names: list[str] | None = None, checksums: bool = True
) -> list[str]:
    """What is wrong with the listed files (all by default), one line each; empty when sound.

    Checking all files also checks that no shard in the directory is missing from
    the manifest: a manifest that does not describe its directory is not a commit.
    """
    present = {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(directory, detail=True)}
    problems = []
    if names is None:
        names = sorted(manifest.files)
        problems += unlisted_shards(present, manifest)
    for name in names:
        expected = manifest.files[name]
        if name not in present:
            problems.append(f"{name}: missing")
        elif present[name] != expected["size"]:
            problems.append(f"{name}: size {present[name]} bytes, manifest says {expected['size']}")
        elif checksums and (problem := check_file(fs, f"{directory}/{name}", expected, name)):
            problems.append(problem)
    return problems


def unlisted_shards(present, manifest: Manifest) -> list[str]:
    """Shards in the directory that the manifest does not list (it does not describe them)."""
    return [
        f"{name}: a shard the manifest does not list"
        for name in sorted(present)
        if name.endswith(".distcp") and name not in manifest.files
    ]
