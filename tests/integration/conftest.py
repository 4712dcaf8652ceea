"""Fixtures for the S3 tests: moto's S3 server on 127.0.0.1, spoken to over HTTP.

There is no in-process mocking of boto3: stores, pyarrow and the aws CLI all
reach the server through a real socket, so an outage is a real refused
connection (moto answers every request with `Connection: close`, so no pooled
connection outlives a stop). moto keeps its state in module-level backends of this process, so a
server restarted on the same port still holds the buckets and objects.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class MotoS3:
    """The running server; tests that simulate an outage stop and restart it on the same port."""

    port: int
    server: object

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
        # stop() ends serve_forever; closing the listening socket makes the outage a refused connection.
        inner = getattr(self.server, "_server", None)
        if inner is not None:
            inner.server_close()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def is_up(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Never read the developer's own AWS files, and never wait on the EC2 metadata service.
    "AWS_CONFIG_FILE": "/nonexistent/po-cluster-tests/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/po-cluster-tests/credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "PO_CLUSTER_STORE")


@pytest.fixture(scope="session")
def aws_env():
    """Dummy credentials for the whole session (moto accepts any), isolated from the real AWS setup."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        for name in AWS_UNSET:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def moto_s3(aws_env):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    moto = MotoS3(server.get_host_and_port()[1], server)
    yield moto
    if moto.is_up():
        moto.stop()


@pytest.fixture()
def bucket(moto_s3) -> str:
    """A fresh bucket per test: moto's state outlives tests, names keep them apart."""
    if not moto_s3.is_up():  # a test that failed mid-outage must not break the next ones
        moto_s3.start()
    name = f"po-test-{secrets.token_hex(4)}"
    moto_s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture()
def release_folder(release_template, tmp_path) -> Path:
    """A private copy, so that a test may change it."""
    return Path(shutil.copytree(release_template, tmp_path / "release"))
