"""Checkpoint storage is a URL: a plain path is local, anything with ``://`` goes through fsspec.

Shard I/O is DCP's own: ``FileSystemWriter``/``Reader`` for local paths,
``FsspecWriter``/``Reader`` for URLs (s3fs for ``s3://``, with the endpoint and
credentials from the usual AWS environment variables, or from ``endpoint_url``).
"""
from __future__ import annotations

import hashlib

import fsspec
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

CHUNK = 8 << 20


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def storage_options(url: str, endpoint_url: str = "") -> dict:
    """Keyword arguments for fsspec: an explicit S3 endpoint, if one is configured."""
    if endpoint_url and url.startswith(("s3://", "s3a://")):
        return {"endpoint_url": endpoint_url}
    return {}


def filesystem(url: str, endpoint_url: str = ""):
    """``(fs, path)`` for a URL or a local path."""
    return fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url))


def writer(url: str, endpoint_url: str = ""):
    if is_remote(url):
        # S3 streams have no fileno(); with sync_files DCP would fall back to a host-wide os.sync().
        return FsspecWriter(url, sync_files=False, overwrite=False, **storage_options(url, endpoint_url))
    return FileSystemWriter(url, sync_files=True, overwrite=False)


def reader(url: str, endpoint_url: str = ""):
    if is_remote(url):
        return FsspecReader(url, **storage_options(url, endpoint_url))
    return FileSystemReader(url)


def sha256_of(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
