"""Sharded DCP checkpoints of a run: what they hold, commit protocol, retention, fallback."""

from .manager import CheckpointError, CheckpointManager
from .manifest import MANIFEST, Manifest

__all__ = ["CheckpointError", "CheckpointManager", "MANIFEST", "Manifest"]
