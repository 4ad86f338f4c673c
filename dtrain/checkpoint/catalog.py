"""The checkpoints of a run as stored: listing, naming, committing, retention.

Storage-only and single-process: rank 0 calls it during training, and the
command-line tools call it with no process group at all.
"""
from __future__ import annotations

import os

from .manifest import AUTOMATIC_TAGS, MANIFEST, Manifest, parse_step_directory, step_directory
from .storage import filesystem, is_remote


class CheckpointCatalog:
    def __init__(self, url: str, endpoint_url: str = "", keep_last: int = 3, keep_every: int = 0):
        self.url = url.rstrip("/")
        self.endpoint_url = endpoint_url
        self.keep_last, self.keep_every = keep_last, keep_every
        self.fs, self.root = filesystem(self.url, endpoint_url)

    def directory(self, name: str) -> str:
        return f"{self.root}/{name}"

    def scan(self) -> tuple[list[Manifest], list[str]]:
        """Committed checkpoints (oldest first) and torn directory names, from storage."""
        self.fs.invalidate_cache()  # object stores list through a cache; others may have written
        if not self.fs.exists(self.root):
            return [], []
        committed, torn = [], []
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            order = parse_step_directory(name)
            if order is None:
                continue
            try:
                manifest = Manifest.from_json(self.fs.cat_file(f"{self.root}/{name}/{MANIFEST}").decode(), name)
                committed.append((order, manifest))
            except (FileNotFoundError, ValueError, TypeError):
                torn.append(name)  # no manifest, or one cut short: the commit never finished
        return [m for _, m in sorted(committed, key=lambda x: x[0])], sorted(torn)

    def new_directory(self, step: int) -> str:
        """A fresh directory name for ``step``; a torn leftover of the same name is removed first."""
        _, torn = self.scan()
        attempt = 0
        while True:
            name = step_directory(step, attempt)
            if name in torn:
                self.delete(name)
            if not self.fs.exists(f"{self.root}/{name}"):
                return name
            attempt += 1  # a committed checkpoint of this step exists (resumed from an older one)

    def write_manifest(self, name: str, text: str) -> None:
        path = f"{self.root}/{name}/{MANIFEST}"
        if is_remote(self.url):
            self.fs.pipe_file(path, text.encode())  # one PUT: the object appears whole or not at all
            return
        temporary = f"{path}.tmp"
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # ---- retention -------------------------------------------------------------------------
    def apply_retention(self) -> list[str]:
        """Delete what the rule does not keep, and torn leftovers; rank 0, after a commit.

        Kept: the newest ``keep_last`` committed, the newest ``best``, every step that is
        a multiple of ``keep_every``, and any checkpoint with a tag of the user's. No save is in flight here, so every directory
        without a manifest is a leftover of a crash.
        """
        committed, torn = self.scan()
        if not committed:
            return []
        keep = {committed[-1].directory}
        if self.keep_last:
            keep |= {m.directory for m in committed[-self.keep_last:]}
        else:
            keep |= {m.directory for m in committed}
        best = [m for m in committed if "best" in m.tags]
        if best:
            keep.add(best[-1].directory)
        keep |= {m.directory for m in committed if set(m.tags) - AUTOMATIC_TAGS}  # pinned by the user
        if self.keep_every:
            keep |= {m.directory for m in committed if m.step % self.keep_every == 0}
        doomed = [m.directory for m in committed if m.directory not in keep] + torn
        for name in doomed:
            self.delete(name)
        return doomed

    def delete(self, name: str) -> None:
        directory = f"{self.root}/{name}"
        try:  # the manifest first: an interrupted delete leaves a torn directory, never a broken commit
            self.fs.rm_file(f"{directory}/{MANIFEST}")
        except FileNotFoundError:
            pass
        self.fs.rm(directory, recursive=True)

    def candidates(self, which: str) -> list[Manifest]:
        """Committed checkpoints to try for ``which`` (latest, best or a step), best choice first."""
        committed, _ = self.scan()
        if which == "latest":
            return committed[::-1]
        if which == "best":
            return [m for m in committed if "best" in m.tags][::-1]
        return [m for m in committed if m.step == int(which)][::-1]

