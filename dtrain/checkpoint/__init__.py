"""Sharded DCP checkpoints: commit protocol, retention, fallback, export."""
from .manager import CheckpointError, CheckpointManager
from .manifest import MANIFEST, Manifest
from .state import TrainingState

__all__ = ["CheckpointError", "CheckpointManager", "MANIFEST", "Manifest", "TrainingState"]
