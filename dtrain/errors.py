"""The errors a user sees, each one line, and the exit code each one ends the job with.

0   done (or already finished, or stopped at --stop-at-step)
1   crashed (a bug, or a peer rank died): the only case with a traceback
2   bad configuration or no usable checkpoint; nothing was written
65  training diverged (non-finite loss or gradient); nothing non-finite was saved
74  storage failed (full, read-only, unreachable, refused, lease lost)
75  stopped on a signal with a committed checkpoint: start again to continue
"""

from __future__ import annotations

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_DIVERGED, EXIT_STORAGE, EXIT_PREEMPTED = 0, 1, 2, 65, 74, 75


class DtrainError(Exception):
    """An expected failure: the message is one line that names the problem and the fix."""

    exit_code = EXIT_CRASH


class ConfigError(DtrainError, ValueError):
    """A bad configuration value or command line."""

    exit_code = EXIT_CONFIG


class CheckpointError(DtrainError):
    """No usable checkpoint where one was required."""

    exit_code = EXIT_CONFIG


class StorageError(DtrainError):
    """Storage failed: full, read-only, unreachable, refused the credentials."""

    exit_code = EXIT_STORAGE


class LeaseLost(StorageError):
    """Another job took this run directory over; this one must not commit anything more."""


class TrainingDiverged(DtrainError):
    """The loss or the gradient norm stopped being finite."""

    exit_code = EXIT_DIVERGED


KINDS = {
    cls.__name__: cls for cls in (DtrainError, ConfigError, CheckpointError, StorageError, LeaseLost, TrainingDiverged)
}
