"""The run directory: where a run's files are, and how they are read and written.

    RUN/config.json        the resolved configuration of the first start
    RUN/events.jsonl       starts, resumes, changes, checkpoints, stops (one JSON per line)
    RUN/metrics.jsonl      train and eval lines
    RUN/samples/           per-rank consumed sample indices (--data.record_indices)
    RUN/lease.json         which job holds the run (dtrain/lease.py)
    RUN/checkpoints/       DCP checkpoints (dtrain/checkpoint/catalog.py)

``RUN`` is a local path or an fsspec URL; every form a user may type names one
directory (``runs/a``, ``./runs/a/``, ``file:///abs/runs/a``). Only rank 0 writes
these files (each rank its own sample records). Small files are written whole or
not at all; a JSONL line cut short by a killed writer is skipped when read.

On object stores a log cannot be appended to (an append is a download and a
re-upload of the whole object, so a run's traffic would grow with the square of
its length). There each log is a directory of immutable parts written once:
``RUN/metrics/part-<time_ns>-<pid>.jsonl``. Lines wait in memory and are shipped
as one part every ``ship_seconds``, at every checkpoint save, and when training
stops; events are shipped at once (the checkpoint catalog relies on them). A
SIGKILL loses at most the unshipped lines, never a commit. Parts are merged as
they pile up, so a long run's log stays a few objects (log_parts.py). Readers
take both layouts: the whole file, then the parts in order.
"""

from __future__ import annotations

import json
import os
import time

from . import log_parts
from .checkpoint.catalog import CheckpointCatalog
from .checkpoint.manifest import Manifest
from .checkpoint.storage import Storage, guard, is_remote, write_whole
from .config import ConfigError, ExperimentConfig

CONFIG, EVENTS, METRICS, SAMPLES, CHECKPOINTS = "config.json", "events.jsonl", "metrics.jsonl", "samples", "checkpoints"
SHIP_SECONDS = 30.0  # on object stores, the longest a log line waits before it is written


def parts_of(name: str) -> str:
    """The directory of a log's parts on object stores: ``metrics.jsonl`` -> ``metrics``."""
    return name.removesuffix(".jsonl")


def normalize_run_url(url: str) -> str:
    """One spelling per directory: local paths absolute, URLs without a trailing slash."""
    text = str(url).strip()
    if not text:
        raise ConfigError("--run-dir is empty; pass the directory (or s3://bucket/prefix) of the run")
    if text.startswith("file://"):
        text = text[len("file://") :] or "/"
    if is_remote(text):
        scheme, _, rest = text.partition("://")
        if not rest.strip("/"):
            raise ConfigError(f"--run-dir={url!r} names no bucket or path; use e.g. {scheme}://bucket/runs/a")
        return f"{scheme}://{rest.rstrip('/')}"
    path = os.path.abspath(os.path.expanduser(text))
    if path == os.path.abspath(os.sep):
        raise ConfigError(f"--run-dir={url!r} is the file-system root; pass a directory below it, e.g. runs/a")
    return path


class RunDirectory:
    def __init__(self, url: str, storage: Storage | None = None):
        self.url = normalize_run_url(url)
        self.storage = storage or Storage()
        self.fs, self.root = self.storage.filesystem(self.url)
        self.ship_seconds = SHIP_SECONDS
        self._unshipped: dict[str, list[str]] = {}  # object stores: log -> lines not yet written
        self._first_unshipped: dict[str, float] = {}
        self._loose: dict[str, int] = {}  # object stores: log -> loose parts at its end (log_parts.py)
        self._shipped: dict[str, dict[str, str]] = {}  # log -> text of the parts shipped since its last merge

    @property
    def checkpoints_url(self) -> str:
        return f"{self.url}/{CHECKPOINTS}"

    def catalog(self, keep_last: int = 3, keep_every: int = 0) -> CheckpointCatalog:
        return CheckpointCatalog(
            self.checkpoints_url, self.storage, keep_last, keep_every, commit_log=self.committed_directories
        )

    def committed_directories(self) -> set[str] | None:
        """Checkpoint directories the events record as committed; None without an events log."""
        if not self.exists(EVENTS):
            return None
        return {
            e["directory"] for e in self.events() if e["event"] == "checkpoint" and isinstance(e.get("directory"), str)
        }

    def events(self) -> list[dict]:
        """The events log's well-formed records (an event name and a numeric time)."""
        return [
            e
            for e in self.read_jsonl(EVENTS)
            if isinstance(e.get("event"), str)
            and isinstance(e.get("time"), (int, float))
            and not isinstance(e.get("time"), bool)
        ]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        with guard("reading", self.url):
            return self.fs.exists(self.path(*parts))

    def check_holds_run(self) -> None:
        """For the tools that read a run: a path that holds none is a mistyped path, exit 2."""
        if not any(self.exists(name) for name in (EVENTS, CHECKPOINTS, CONFIG)):
            raise ConfigError(
                f"{self.url} holds no dtrain run (no {EVENTS}, {CHECKPOINTS}/ or {CONFIG}); check the path"
            )

    def check_is_directory(self) -> None:
        with guard("reading", self.url):
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise ConfigError(f"--run-dir={self.url} is a file, not a directory; pass a directory")

    def write_text(self, name: str, text: str) -> None:
        """Write a whole file atomically: one PUT on object stores, temporary + rename locally."""
        with guard("writing", f"{self.url}/{name}"):
            if not is_remote(self.url):  # object stores need no directories (s3fs would create a bucket)
                self.fs.makedirs(self.root, exist_ok=True)
            write_whole(self.fs, self.path(name), text)

    def read_text(self, name: str) -> str:
        with guard("reading", f"{self.url}/{name}"):
            return self.fs.cat_file(self.path(name)).decode(errors="replace")

    def delete(self, name: str) -> None:
        with guard("deleting", f"{self.url}/{name}"):
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

    def append_jsonl(self, name: str, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        if is_remote(self.url):
            self._unshipped.setdefault(name, []).append(line)
            first = self._first_unshipped.setdefault(name, time.monotonic())
            if name == EVENTS or time.monotonic() - first >= self.ship_seconds:
                self.ship(name)
            return
        with guard("writing", f"{self.url}/{name}"):
            self.fs.makedirs(self.fs._parent(self.path(name)), exist_ok=True)
            with self.fs.open(self.path(name), "a") as f:
                f.write(line)

    def ship(self, name: str | None = None) -> None:
        """Object stores: write the waiting lines of ``name`` (default: every log) as one new part."""
        for log in [name] if name else list(self._unshipped):
            lines = self._unshipped.get(log)
            if lines:
                part, text = log_parts.new_part_name(), "".join(lines)
                self.write_text(f"{parts_of(log)}/{part}", text)
                self._shipped.setdefault(log, {})[part] = text  # merged soon: no need to read it back
                del self._unshipped[log], self._first_unshipped[log]
                loose = self._loose[log] = self._loose.get(log, log_parts.MERGE_AT - 1) + 1
                if loose >= log_parts.MERGE_AT:  # known after a first listing: one LIST per MERGE_AT parts
                    self._merge(log)

    def _merge(self, log: str) -> None:
        """Keep a log's parts few (log_parts.py): merge, then delete what the merge holds."""
        directory = parts_of(log)
        names = self.list(directory)
        shown = log_parts.visible(names)
        done = log_parts.held(names, shown)  # a merge whose deletes were cut short
        known = self._shipped.pop(log, {})
        while group := log_parts.to_merge(shown):
            merged = log_parts.merged_name(group)
            texts = [known.get(n) or self.read_text(f"{directory}/{n}") for n in group]
            self.write_text(f"{directory}/{merged}", "".join(map(_lines, texts)))
            at = shown.index(group[0])
            shown[at : at + len(group)] = [merged]
            done += group
        if done:
            with guard("deleting", f"{self.url}/{directory}"):
                self.fs.rm([self.path(directory, name) for name in done])
        self._loose[log] = sum(log_parts.level(n) == 0 for n in shown)

    def logs(self, directory: str) -> list[str]:
        """The JSONL logs in a subdirectory (``samples``), whichever layout holds them."""
        names = {n if n.endswith(".jsonl") else f"{n}.jsonl" for n in self.list(directory)}
        return sorted(names)

    def read_jsonl(self, name: str) -> list[dict]:
        """The records of a JSONL log, whole file then parts; a line cut short (or otherwise
        unreadable) is skipped."""
        texts = [self.read_text(name)] if self.exists(name) else []
        parts = parts_of(name)
        texts += [self.read_text(f"{parts}/{part}") for part in log_parts.visible(self.list(parts))]
        records = []
        for line in "".join(map(_lines, texts)).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def list(self, name: str) -> list[str]:
        """Names of the files in a subdirectory (empty when it does not exist)."""
        self.fs.invalidate_cache(self.path(name))  # object stores list through a cache; others write
        if not self.exists(name):
            return []
        with guard("listing", f"{self.url}/{name}"):
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(name), detail=False))

    def event(self, kind: str, **fields) -> None:
        self.append_jsonl(EVENTS, {"event": kind, "time": time.time(), **fields})

    # ---- the stored configuration ------------------------------------------------------------
    def first_config(self) -> tuple[ExperimentConfig | None, str]:
        """``config.json`` as a config, or ``(None, why it cannot be used)``; ``(None, "")`` if absent."""
        if not self.exists(CONFIG):
            return None, ""
        text = self.read_text(CONFIG)
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError(f"a JSON {type(values).__name__}, not an object")
            return ExperimentConfig.from_dict(values, source=CONFIG), ""
        except (ValueError, ConfigError) as error:
            what = "empty" if not text.strip() else f"unreadable ({str(error).splitlines()[0][:120]})"
            return None, f"{CONFIG} is {what}"

    def stored_config(self) -> tuple[ExperimentConfig, Manifest | None, str]:
        """The run's configuration as of its newest committed checkpoint (so changes made on
        earlier resumes persist; tagged copies do not count), else ``config.json``; that
        manifest; and a note when ``config.json`` could not be used. ``ConfigError`` when
        neither is usable."""
        first, problem = self.first_config()
        listing = self.catalog().scan()
        committed = listing.trained or listing.committed
        newest = committed[-1] if committed else None
        if newest is not None and newest.config:
            try:
                config = ExperimentConfig.from_dict(newest.config, source=f"{newest.directory}/manifest.json")
            except ConfigError:
                config = None
            if config is not None:
                problem = problem or (f"{CONFIG} is missing" if first is None else "")
                note = f"{problem}; using the configuration recorded in {newest.directory}" if problem else ""
                return config, newest, note
        if first is not None:
            return first, newest, ""
        if problem:
            raise ConfigError(
                f"{self.url}/{problem} and no committed checkpoint records the configuration; "
                "restore it, or start a new run with a new --run-dir"
            )
        raise ConfigError(f"{self.url} holds no dtrain run (no {CONFIG}); check the path")


def _lines(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"
