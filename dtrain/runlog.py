"""The run directory's plain files: config.json, events.jsonl, metrics.jsonl.

The run directory is a URL (a plain path is local) opened through fsspec.
Only rank 0 writes these files.
"""
from __future__ import annotations

import json
import time

import fsspec


class RunDirectory:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_text(self, name: str, text: str) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(self.path(name), "w") as f:
            f.write(text)

    def read_text(self, name: str) -> str:
        with self.fs.open(self.path(name), "r") as f:
            return f.read()

    def append_jsonl(self, name: str, record: dict) -> None:
        self.fs.makedirs(self.fs._parent(self.path(name)), exist_ok=True)
        with self.fs.open(self.path(name), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_jsonl(self, name: str) -> list[dict]:
        if not self.exists(name):
            return []
        return [json.loads(line) for line in self.read_text(name).splitlines() if line.strip()]

    def event(self, kind: str, **fields) -> None:
        self.append_jsonl("events.jsonl", {"event": kind, "time": time.time(), **fields})
