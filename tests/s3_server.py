"""A real S3 API server (moto's server mode) on 127.0.0.1 for the storage-exchange tests: the code
under test talks HTTP to it through s3fs, exactly as to a bucket; nothing in fsspec is mocked."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def s3_server(monkeypatch, bucket: str | None = "codistill-test"):
    """Start the server, point the AWS_* environment at it (inherited by subprocesses), create
    `bucket`; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()  # a cached filesystem would still point at an earlier server
    # The server runs in this process, and moto keeps its buckets and auth mode per process, not per
    # server: start from a clean state.
    _set_auth(float("inf"))
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()
    try:
        if bucket:
            S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()
        _set_auth(float("inf"))


def refuse_unknown_credentials() -> None:
    """From now on the server checks credentials (moto's IAM mode): ours are unknown to it."""
    _set_auth(0)


def _set_auth(free_requests: float) -> None:
    """What moto's /moto-api/reset-auth does, for the server in this process."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = free_requests
    ActionAuthenticatorMixin.request_count = 0
