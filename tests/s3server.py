"""A real S3-protocol server (moto's server mode) on loopback, for the tests that need one.

``S3_REQUESTS`` records every request the server answers (method, path, bytes in
and out), so tests count requests and bytes where a real S3 bill would.
"""

import logging
import os
from dataclasses import dataclass

import pytest


@dataclass
class Request:
    method: str
    path: str  # /bucket/key
    sent: int  # request body bytes
    received: int  # response body bytes


S3_REQUESTS: list[Request] = []


class _Recorder:
    """WSGI middleware in front of moto: one ``Request`` per answered request."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        chunks = list(body)
        if hasattr(body, "close"):
            body.close()
        S3_REQUESTS.append(
            Request(
                environ["REQUEST_METHOD"],
                environ.get("PATH_INFO", ""),
                int(environ.get("CONTENT_LENGTH") or 0),
                sum(len(c) for c in chunks),
            )
        )
        return chunks


def start_server():
    """A moto server on a free loopback port that records its requests in ``S3_REQUESTS``;
    returns the server and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    server._server.app = _Recorder(server._server.app)  # werkzeug reads server.app per request
    return server, f"http://127.0.0.1:{server._server.server_address[1]}"


@pytest.fixture(scope="session")
def s3_env():
    """Start the server and a bucket; yield the environment that points s3fs (and botocore) at it."""
    server, endpoint = start_server()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("dtrain-test")
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
