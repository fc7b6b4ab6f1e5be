"""A real S3-compatible server on 127.0.0.1 for tests: moto's standalone server in a subprocess.

Clients reach it exactly as they would reach AWS or MinIO (s3fs over HTTP, endpoint and keys
from the standard AWS environment variables), so nothing in the code under test is mocked.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(timeout_s: float = 60.0) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free port; yield its endpoint URL; stop it by PID."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """``s3://<bucket>`` on a fresh moto server, with the AWS environment pointing at it.

    The environment (not storage options) carries the endpoint, as it would in production; Dask
    worker processes started inside the fixture inherit it.
    """
    import boto3
    import s3fs

    with s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for name, value in zip(S3_ENV, (endpoint, "testing", "testing", "us-east-1")):
            mp.setenv(name, value)
        # s3fs reuses filesystem instances across calls with equal arguments; one made for an
        # earlier server (another test module) would still point at that server's port.
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="rapm-test")
        yield "s3://rapm-test"
    s3fs.S3FileSystem.clear_instance_cache()
