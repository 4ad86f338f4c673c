"""The checkpoints of a run as stored: listing, naming, committing, quarantine, retention.

Storage-only and single-process: rank 0 calls it during training, and the
command-line tools call it with no process group at all.

Every ``step_*`` entry is in exactly one state:

- *committed*: a sound manifest; loadable.
- *damaged*: a manifest that cannot be read or does not describe a checkpoint.
- *rejected*: found unusable by a load (bad checksum, damaged manifest, unsafe
  metadata) and quarantined with a ``rejected.json`` marker. Never loaded,
  never counted by retention, never deleted automatically.
- *torn*: no manifest. A save that never committed (no ``.metadata``, or one
  the run's events never recorded as committed) is removed by retention. One
  with ``.metadata`` that the events say was committed lost its manifest: it is
  kept and reported, and never silently replaced.
- *foreign*: not something dtrain writes (a link, a file, a directory holding
  other files): never touched.

Retention and cleanup delete only files dtrain or DCP write, by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CheckpointError, ConfigError
from .dcp_io import UnsafeCheckpointError
from .manifest import (
    AUTOMATIC_TAGS,
    MANIFEST,
    METADATA,
    REJECTED,
    Manifest,
    ManifestError,
    find_problems,
    parse_step_directory,
    step_directory,
)
from .storage import Storage, guard, is_remote, write_whole

# What DCP and dtrain write into a checkpoint directory; anything else is not ours.
_OURS = re.compile(
    r"^(__\d+_\d+\.distcp|__\d+\.metadata|\.metadata(\.tmp)?|"
    r"(manifest|rejected)\.json(\.tmp\.\d+)?)$"
)


@dataclass
class Listing:
    committed: list[Manifest] = field(default_factory=list)  # commit order, oldest first
    damaged: dict[str, str] = field(default_factory=dict)  # directory -> why the manifest is no commit
    rejected: dict[str, str] = field(default_factory=dict)  # directory -> why it was quarantined
    torn: dict[str, bool] = field(default_factory=dict)  # directory -> holds DCP's .metadata
    foreign: dict[str, str] = field(default_factory=dict)  # entry -> why it is not dtrain's
    files: dict[str, set] = field(default_factory=dict)  # directory -> its file names
    ever_committed: set[str] | None = None  # directories the run's events record as committed

    @property
    def trained(self) -> list[Manifest]:
        """Commits made by training, in commit order: every commit but tagged copies."""
        return [m for m in self.committed if not m.copy_of]

    @property
    def names(self) -> list[str]:
        return sorted(
            [m.directory for m in self.committed] + list(self.damaged) + list(self.rejected) + list(self.torn),
            key=lambda name: parse_step_directory(name),
        )

    def removable(self, name: str) -> bool:
        """A torn save that provably never committed: nothing can have loaded it."""
        if name not in self.torn:
            return False
        return not self.torn[name] or (self.ever_committed is not None and name not in self.ever_committed)

    @property
    def unexplained(self) -> list[str]:
        """Directories that may hold a finished checkpoint but are not committed ones."""
        lost = {n for n in self.torn if not self.removable(n)}
        return sorted(set(self.damaged) | set(self.rejected) | lost)

    def candidates(self, which: str) -> list[Manifest]:
        """Committed checkpoints to try for ``which`` (latest, best or a step), best choice first.

        For ``latest``: the newest commit of training (tagged copies do not move the
        run), then the line it continues (its parents), then the rest by commit order,
        so a fallback stays on the current line of history.
        """
        newest_first = self.committed[::-1]
        if which == "best":
            return [m for m in newest_first if "best" in m.tags]
        if which != "latest":
            return [m for m in newest_first if m.step == int(which)]
        by_name = {m.directory: m for m in self.committed}
        trained = self.trained[::-1]
        line, current = [], trained[0] if trained else None
        while current is not None and current not in line:
            line.append(current)
            if current.format == 1:  # no parent recorded: the previous commit continues it
                index = self.committed.index(current)
                current = self.committed[index - 1] if index else None
            else:
                current = by_name.get(current.parent) if current.parent else None
        return line + [m for m in newest_first if m not in line]


def _version(info: dict) -> tuple | None:
    """What changes when a file is rewritten, from a listing's entry (local or object store);
    None where the store says nothing usable (then the manifest is read every time)."""
    marker = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return (info.get("size"), info.get("ino"), str(marker)) if marker is not None else None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointCatalog:
    def __init__(
        self,
        url: str,
        storage: Storage | None = None,
        keep_last: int = 3,
        keep_every: int = 0,
        commit_log: Callable[[], set[str] | None] | None = None,
    ):
        self.url = url.rstrip("/")
        self.storage = storage or Storage()
        self.keep_last, self.keep_every = keep_last, keep_every
        self.commit_log = commit_log  # directories the run's events record as committed (None: unknown)
        self.fs, self.root = self.storage.filesystem(self.url)
        # Parsed manifests by (directory, the listing's size and version of manifest.json). A
        # manifest is written once, so a save's three scans (a free name, the next sequence,
        # retention) read only the new one, not every kept checkpoint's again.
        self._parsed: dict[tuple, Manifest] = {}

    def directory(self, name: str) -> str:
        return f"{self.root}/{name}"

    def scan(self) -> Listing:
        """Every checkpoint directory of the run, by state (see the module's docstring)."""
        with guard("listing", self.url):
            self.fs.invalidate_cache()  # object stores list through a cache; others may have written
            listing = Listing()
            if not self.fs.exists(self.root):
                return listing
            if not self.fs.isdir(self.root):
                raise NotADirectoryError(20, "Not a directory", self.url)
            # One listing of the whole tree (one paged LIST on object stores), grouped by directory.
            entries: dict[str, dict] = {}
            for path, info in self.fs.find(self.root, maxdepth=2, withdirs=True, detail=True).items():
                parts = path[len(self.root) :].strip("/").split("/")
                if parse_step_directory(parts[0]) is None:
                    continue
                entry = entries.setdefault(parts[0], {"files": set(), "other": []})
                if len(parts) == 1:
                    entry["type"] = info.get("type")
                elif info.get("type") == "directory":
                    entry["other"].append(parts[1] + "/")
                else:
                    entry["files"].add(parts[1])
                    if parts[1] == MANIFEST:
                        entry["version"] = _version(info)
            known, self._parsed = self._parsed, {}  # keeps what this listing still holds
            for name, entry in entries.items():
                self._classify(name, entry, listing, known)
            if any(listing.torn.values()) and self.commit_log is not None:
                listing.ever_committed = self.commit_log()
        listing.committed.sort(key=lambda m: m.order)
        return listing

    def _classify(self, name: str, entry: dict, listing: Listing, known: dict[tuple, Manifest]) -> None:
        directory, files = self.directory(name), entry["files"]
        other = entry["other"] + sorted(f for f in files if not _OURS.match(f))
        if entry.get("type") not in (None, "directory"):
            listing.foreign[name] = "a file, not a directory"
        elif not is_remote(self.url) and os.path.islink(directory):
            listing.foreign[name] = "a symbolic link"
        elif other:
            listing.foreign[name] = f"holds files dtrain does not write ({', '.join(other[:3])})"
        elif REJECTED in files:
            listing.rejected[name] = self._rejection(directory)
        elif MANIFEST not in files:
            listing.torn[name] = METADATA in files
        else:
            try:
                listing.committed.append(self._manifest(name, entry.get("version"), known))
            except ManifestError as error:
                listing.damaged[name] = f"manifest.json is damaged: {error}"
            except OSError as error:
                listing.damaged[name] = f"manifest.json cannot be read: {error.strerror or error}"
        if name not in listing.foreign:
            listing.files[name] = files

    def _manifest(self, name: str, version: tuple | None, known: dict[tuple, Manifest]) -> Manifest:
        """``name``'s manifest: from ``known`` (the previous scan's) if unchanged since, else read."""
        manifest = known.get((name, version)) if version is not None else None
        if manifest is None:
            manifest = Manifest.from_json(self.fs.cat_file(f"{self.directory(name)}/{MANIFEST}"), name)
        if version is not None:
            self._parsed[name, version] = manifest
        return manifest

    def _rejection(self, directory: str) -> str:
        try:
            return "; ".join(json.loads(self.fs.cat_file(f"{directory}/{REJECTED}"))["problems"])
        except (ValueError, KeyError, TypeError, OSError):
            return "quarantined"

    def problems(self, manifest: Manifest, checksums: bool = True) -> list[str]:
        """What is wrong with a committed checkpoint, one line each, as every tool checks it: its
        files against the manifest, then DCP's .metadata read as a load reads it (a pickle that
        would run code is refused, never run)."""
        problems = find_problems(self.fs, self.directory(manifest.directory), manifest, checksums=checksums)
        if not problems:
            try:
                self.storage.reader(f"{self.url}/{manifest.directory}").read_metadata()
            except UnsafeCheckpointError as error:
                problems = [str(error)]
        return problems

    def choose(self, which: str = "latest", verify: bool = True, report=print) -> Manifest:
        """The newest sound committed checkpoint for ``which``; corrupt ones are reported and
        skipped (read-only: the tools that call this never quarantine anything)."""
        for manifest in self.scan().candidates(which):
            problems = self.problems(manifest, checksums=verify)
            if not problems:
                return manifest
            report(f"dtrain: skipping {manifest.directory}: {'; '.join(problems)}")
        raise CheckpointError(
            f"no sound committed checkpoint for {which!r} in {self.url}; see `dtrain inspect` for what is there"
        )

    def copy_tagged(self, which: str, tag: str) -> str:
        """Commit a copy of checkpoint ``which`` tagged ``tag``, which retention keeps; returns its name.

        A storage-side copy of the files (no process group, no model; on S3 no bytes
        pass through this process), checked by size against the source's manifest,
        then committed with its own manifest. The copy does not move the run:
        "latest" stays the newest checkpoint training committed.
        """
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", tag) or tag in AUTOMATIC_TAGS:
            automatic = ", ".join(sorted(AUTOMATIC_TAGS))
            raise ConfigError(f"tag {tag!r}: use letters, digits, '.', '_' or '-', and not {automatic}")
        source = self.choose(which)
        name = self.new_directory(source.step)
        origin, target = self.directory(source.directory), self.directory(name)
        local = not is_remote(self.url)
        with guard("copying checkpoint", f"{self.url}/{source.directory}"):
            if local:
                self.fs.makedirs(target, exist_ok=True)
            for file in sorted(source.files):
                self.fs.copy(f"{origin}/{file}", f"{target}/{file}")
                if local:  # durable before the manifest says it is there
                    _fsync(f"{target}/{file}")
            if local:
                _fsync(target)
            self.fs.invalidate_cache()
            copy = dataclasses.replace(
                source,
                tags=[tag],
                created=time.time(),
                sequence=self.next_sequence(),
                parent=source.directory,
                copy_of=source.directory,
                directory=name,
                save={"mode": "copy"},
            )
            if problems := find_problems(self.fs, target, copy, checksums=False):
                raise CheckpointError(f"copying {source.directory} to {name} failed: {'; '.join(problems)}")
        self.write_manifest(name, copy.to_json())
        return name

    def new_directory(self, step: int) -> str:
        """A fresh directory name for ``step``. An existing directory is never written into; a
        torn one without ``.metadata`` (a save that never finished) is removed and its name reused."""
        listing = self.scan()
        attempt = 0
        while True:
            name = step_directory(step, attempt)
            if listing.removable(name):
                self.delete(name, listing.files[name])
            with guard("listing", self.url):
                if not self.fs.exists(self.directory(name)):
                    return name
            attempt += 1  # a checkpoint of this step exists (a resumed older step, or kept aside)

    def next_sequence(self) -> int:
        return max([m.sequence for m in self.scan().committed] + [0]) + 1

    def write_manifest(self, name: str, text: str) -> None:
        self.write_file(f"{name}/{MANIFEST}", text)

    def write_file(self, relative: str, text: str) -> None:
        with guard("writing", f"{self.url}/{relative}"):
            write_whole(self.fs, self.directory(relative), text)

    def quarantine(self, name: str, problems: list[str]) -> None:
        """Mark a checkpoint unusable: it is never loaded or counted again, nor deleted."""
        self.write_file(f"{name}/{REJECTED}", json.dumps({"problems": problems, "time": time.time()}))

    # ---- retention -------------------------------------------------------------------------
    def apply_retention(self) -> list[str]:
        """Delete what the rule does not keep (``doomed``); the names deleted."""
        doomed = self.doomed()
        self.delete_all(doomed)
        return list(doomed)

    def delete_all(self, doomed: dict[str, set[str]]) -> None:
        for name, files in doomed.items():
            self.delete(name, files)

    def doomed(self) -> dict[str, set[str]]:
        """What retention deletes now, with each directory's files; rank 0, after a commit, with
        no save in flight.

        Kept: the newest ``keep_last`` commits (in commit order, so the line a resume
        started is kept over an abandoned newer one), the newest ``best``, every step
        that is a multiple of ``keep_every``, any checkpoint with a tag of the user's,
        and every directory that is not a committed checkpoint except torn saves
        without ``.metadata``, which nothing can load.
        """
        listing = self.scan()
        committed, trained = listing.committed, listing.trained
        if not committed:
            return {}
        keep = {committed[-1].directory}
        keep |= {m.directory for m in (trained[-self.keep_last :] if self.keep_last else committed)}
        best = [m for m in committed if "best" in m.tags]
        if best:
            keep.add(best[-1].directory)
        keep |= {m.directory for m in committed if set(m.tags) - AUTOMATIC_TAGS}  # pinned by the user
        if self.keep_every:
            keep |= {m.directory for m in committed if m.step % self.keep_every == 0}
        doomed = [m.directory for m in committed if m.directory not in keep]
        doomed += [name for name in listing.torn if listing.removable(name)]
        return {name: listing.files[name] for name in doomed}

    def delete(self, name: str, files: set[str]) -> None:
        """Delete a checkpoint's own files (the manifest first: an interrupted delete leaves a
        torn directory, never a broken commit), then the directory if nothing else is in it."""
        directory = self.directory(name)
        with guard("deleting", f"{self.url}/{name}"):
            for file in sorted(files, key=lambda f: f != MANIFEST):
                try:
                    self.fs.rm_file(f"{directory}/{file}")
                except FileNotFoundError:
                    pass
            if not is_remote(self.url):  # object stores have no directories to remove
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
