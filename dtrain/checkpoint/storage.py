"""Storage is a URL: a plain path is local, anything with ``://`` goes through fsspec.

Shard I/O is DCP's own (``FileSystemWriter``/``Reader`` for local paths,
``FsspecWriter``/``Reader`` for URLs: s3fs for ``s3://``, credentials from the
usual AWS environment), with dtrain's checksums, read plan and trust boundary
added (dcp_io.py). Two things are added here, for every caller:

- bounded storage calls: a per-request timeout and a few retries, so a stalled
  endpoint ends the job with one line instead of hanging it;
- every storage failure becomes a ``StorageError`` whose message is one line
  naming the URL and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

import fsspec
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import ConfigError, StorageError
from .dcp_io import CheckedFileSystemReader, CheckedFileSystemWriter, CheckedFsspecReader, CheckedFsspecWriter


@dataclass(frozen=True)
class Storage:
    """How to reach a run's storage: the S3 endpoint, and the bounds on each call."""

    endpoint_url: str = ""
    timeout_s: float = 20.0  # per request (connect and read)
    retries: int = 3  # attempts per request on a retryable error

    @classmethod
    def from_config(cls, checkpoint_cfg) -> Storage:
        return cls(checkpoint_cfg.endpoint_url, checkpoint_cfg.storage_timeout, checkpoint_cfg.storage_retries)

    def options(self, url: str) -> dict:
        """Keyword arguments for fsspec: endpoint, timeouts and retries for S3."""
        if not url.startswith(("s3://", "s3a://")):
            return {}
        import s3fs

        # s3fs retries a request itself (a class setting, no constructor argument: one value per
        # process); botocore's own retries would multiply them, so botocore makes one attempt.
        s3fs.S3FileSystem.retries = max(self.retries, 1)
        options = {
            "config_kwargs": {
                "connect_timeout": self.timeout_s,
                "read_timeout": self.timeout_s,
                "retries": {"max_attempts": 1},
            }
        }
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        return options

    def filesystem(self, url: str):
        """``(fs, path)`` for a URL or a local path."""
        with guard("opening", url):
            try:
                return fsspec.core.url_to_fs(url, **self.options(url))
            except (ValueError, ImportError) as error:  # an unknown protocol, or its package missing
                raise ConfigError(
                    f"{url}: {' '.join(str(error).split())[:160]}; use a local path or "
                    "s3://bucket/prefix (pip install dtrain[s3])"
                ) from None

    def writer(self, url: str):
        """DCP's writer for ``url``; its ``written`` lists the files this rank wrote, with checksums."""
        if is_remote(url):
            # S3 streams have no fileno(); with sync_files DCP would fall back to a host-wide os.sync().
            return CheckedFsspecWriter(url, sync_files=False, overwrite=False, **self.options(url))
        return CheckedFileSystemWriter(url, sync_files=True, overwrite=False)

    def reader(self, url: str, checksums: dict | None = None):
        """DCP's reader for ``url``, checking what it reads against ``checksums`` (a manifest's files)."""
        if is_remote(url):
            return CheckedFsspecReader(url, checksums, **self.options(url))
        return CheckedFileSystemReader(url, checksums)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


# ---- one line for every storage failure ----------------------------------------------------
def _storage_exceptions() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, CheckpointException]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(kinds)


STORAGE_EXCEPTIONS = _storage_exceptions()

_ERRNO_FIX = {
    errno.ENOSPC: "no space left on device; free space or point --run-dir elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space or point --run-dir elsewhere",
    errno.EROFS: "read-only file system; point --run-dir at a writable location",
    errno.EACCES: "permission denied; check the directory's owner and mode",
    errno.EPERM: "operation not permitted; check the directory's owner and mode",
    errno.ENOTDIR: "a part of the path is a file, not a directory; pass a directory",
    errno.EISDIR: "is a directory where a file was expected",
}


def root_errors(error: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's ``CheckpointException``, or the error itself."""
    if isinstance(error, CheckpointException):
        return [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
    return [error]


def cause(error: BaseException) -> str:
    """The root of a storage failure, in one line, with the fix where one is known."""
    if isinstance(error, CheckpointException):  # DCP gathers every rank's failure
        roots = root_errors(error)
        return cause(roots[0]) if roots else "checkpoint failed"
    if isinstance(error, OSError) and error.errno in _ERRNO_FIX:
        return _ERRNO_FIX[error.errno]
    text = " ".join(str(error).split()) or type(error).__name__
    name = type(error).__name__
    if name == "NoCredentialsError":
        return "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
    if (
        "AWS Access Key Id" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
        or "signature we calculated" in text
    ):
        return "S3 refused the credentials; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(error, PermissionError) or "Forbidden" in text or "AccessDenied" in text:
        return (
            f"the storage refused access ({text[:80]}); check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY) and the bucket's permissions"
        )
    if (
        name in ("EndpointConnectionError", "ConnectionRefusedError", "ClientConnectorError", "ConnectionClosedError")
        or "Could not connect" in text
        or "Connection refused" in text
        or "Cannot connect" in text
    ):
        return (
            f"cannot connect to the storage endpoint ({text[:160]}); check --checkpoint.endpoint_url "
            "or AWS_ENDPOINT_URL"
        )
    if isinstance(error, TimeoutError) or "Timeout" in name or "timed out" in text.lower():
        return (
            f"storage did not answer in time (--checkpoint.storage_timeout, --checkpoint.storage_retries): {text[:160]}"
        )
    if name == "NoSuchBucket" or "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
        return "the bucket does not exist; create it or fix --run-dir"
    return f"{name}: {text[:240]}"


@contextlib.contextmanager
def guard(action: str, url: str):
    """Turn storage failures inside the block into a one-line ``StorageError``."""
    try:
        yield
    except StorageError:
        raise
    except STORAGE_EXCEPTIONS as error:
        why = cause(error)
        if not is_remote(url) and _nearly_full(url) and _ERRNO_FIX[errno.ENOSPC] not in why:
            # torch.save's writer reports a short write as "unexpected pos", not as ENOSPC
            why = f"{_ERRNO_FIX[errno.ENOSPC]} ({why[:120]})"
        raise StorageError(f"{action} {url} failed: {why}") from error


def _nearly_full(url: str) -> bool:
    """Whether the local file system holding ``url`` has under 1 MiB left."""
    path = url.removeprefix("file://")
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path or "/")
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def write_whole(fs, path: str, text: str) -> None:
    """A small file written whole or not at all: one PUT on object stores; locally a
    temporary name, fsync, rename, and fsync of the directory."""
    if "file" not in fs.protocol and "local" not in fs.protocol:
        fs.pipe_file(path, text.encode())
        return
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
