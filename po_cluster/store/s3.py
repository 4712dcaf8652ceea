"""The S3 side of locations: one boto3 client per settings, boto3's errors as one-line
StoreErrors, the transfer settings, and a pyarrow filesystem reaching the same endpoint."""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from po_cluster.store.settings import ObjectMissing, StoreConfig, StoreError

MISSING_CODES = ("NoSuchKey", "404", "NotFound")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix")."""
    if not uri.startswith("s3://"):
        raise StoreError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {uri}")
    return bucket, prefix.strip("/")


def _boto_session(settings: StoreConfig):  # -> boto3.session.Session
    import boto3  # lazy: local locations need no AWS SDK at import time
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    except ProfileNotFound as error:
        raise StoreError(f"AWS profile not found: {error}") from None


def _new_client(settings: StoreConfig, session: Any) -> Any:
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": settings.max_attempts},
                    connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                    s3={"addressing_style": settings.addressing_style}, user_agent_extra="po-cluster")
    with s3_errors("cannot create an S3 client", settings.endpoint_url or "(default endpoint)"):
        # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the profile's endpoint.
        return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client(settings: StoreConfig | None = None) -> Any:
    """The process's one boto3 S3 client for these settings (boto3 clients are thread-safe).

    The AWS_* environment is part of the key: a client keeps the endpoint and credentials it was
    made with, so a changed environment (another endpoint, rotated keys) gets a client of its own."""
    settings = settings or StoreConfig()
    key = (settings, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _clients_lock:
        if key not in _clients:
            if len(_clients) >= 16:
                _clients.pop(next(iter(_clients)))  # the oldest: a bound, not a cache policy
            _clients[key] = _new_client(settings, _boto_session(settings))
        return _clients[key]


def transfer_config(settings: StoreConfig):  # -> boto3.s3.transfer.TransferConfig
    from boto3.s3.transfer import TransferConfig

    # "classic": the pure-Python transfer manager, whatever the instance type (CRT ignores some settings).
    return TransferConfig(multipart_threshold=settings.multipart_threshold,
                          multipart_chunksize=settings.multipart_chunksize,
                          max_concurrency=settings.max_concurrency, preferred_transfer_client="classic")


def error_code(error: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    found = re.search(r"\((\w+)\)", str(error))  # S3UploadFailedError keeps the code only in its text
    return found.group(1) if found else ""


_CODE_REASONS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied", "403": "access denied", "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the AWS credentials were rejected (unknown access key)",
    "SignatureDoesNotMatch": "the AWS credentials were rejected (wrong secret key)",
    "ExpiredToken": "the AWS credentials have expired", "InvalidToken": "the AWS session token is invalid",
    "PreconditionFailed": "it already exists", "412": "it already exists",
}


@contextmanager
def s3_errors(what: str, endpoint: str, missing: str | None = None) -> Iterator[None]:
    """Turn whatever boto3 raises into a one-line StoreError; ObjectMissing(missing) for an absent key."""
    from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
    from botocore import exceptions as bx

    try:
        yield
    except StoreError:
        raise
    except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as error:
        raise StoreError(f"{what}: no usable AWS credentials ({error}); set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role") from None
    except (bx.ConnectionError, bx.HTTPClientError) as error:
        raise StoreError(f"{what}: cannot reach the S3 endpoint {endpoint} ({error})") from None
    except RetriesExceededError as error:  # download_file's own retries, around a connection error
        raise StoreError(f"{what}: cannot reach the S3 endpoint {endpoint} ({error.last_exception})") from None
    except (bx.ClientError, S3UploadFailedError) as error:
        code = error_code(error)
        if code in MISSING_CODES and missing is not None:
            raise ObjectMissing(missing) from None
        reason = _CODE_REASONS.get(code) or ("not found" if code in MISSING_CODES
                                             else f"S3 error {code or '?'}: {error}")
        raise StoreError(f"{what}: {reason} (endpoint {endpoint})") from None
    except (bx.BotoCoreError, Boto3Error) as error:
        raise StoreError(f"{what}: {error}") from None


@contextmanager
def s3_call(location: str, what: str, settings: StoreConfig | None,
            missing: str | None = None) -> Iterator[tuple[Any, str, str]]:
    """(client, bucket, key) of an s3:// location, boto3's errors becoming StoreErrors that name it."""
    bucket, key = parse_s3_uri(location)
    client = s3_client(settings)
    with s3_errors(f"{what} {location}", client.meta.endpoint_url, missing):
        yield client, bucket, key


def s3_filesystem(uri: str, settings: StoreConfig | None = None) -> tuple[Any, str]:
    """(pyarrow.fs.S3FileSystem, "bucket/prefix") reaching what boto3 reaches for `uri`.

    Endpoint and region are the ones boto3 resolved; static credentials are passed as
    they are, refreshable ones (instance/pod roles, SSO, assume-role) are left to
    pyarrow's own AWS chain so that they keep refreshing during a long sweep.
    """
    from botocore.credentials import RefreshableCredentials
    from pyarrow import fs

    settings = settings or StoreConfig()
    bucket, prefix = parse_s3_uri(uri)
    session = _boto_session(settings)
    resolved = _new_client(settings, session).meta  # the endpoint and region boto3 itself would use
    credentials = session.get_credentials()
    if credentials is None:
        raise StoreError(f"cannot open {uri}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role")
    keys: dict[str, Any] = {}
    if not isinstance(credentials, RefreshableCredentials):
        frozen = credentials.get_frozen_credentials()
        keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
    scheme, _, host = resolved.endpoint_url.partition("://")
    custom = settings.endpoint_url is not None or not host.split("/")[0].endswith("amazonaws.com")
    filesystem = fs.S3FileSystem(
        region=resolved.region_name, scheme=scheme, endpoint_override=host.rstrip("/") if custom else None,
        connect_timeout=settings.connect_timeout, request_timeout=settings.read_timeout,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        force_virtual_addressing=settings.addressing_style == "virtual", **keys)
    return filesystem, f"{bucket}/{prefix}".rstrip("/")


# What a job's Ray workers need to reach the same S3 as the process that submits it. On a cluster
# of its own (KubeRay pods with a role or a secret) a worker has its own chain; on a cluster joined
# with an endpoint or keys set only in the submitting shell, it would have none of them. Profiles
# and config files are not forwarded: their files need not exist on another node.
FORWARDED_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def forwarded_aws_env() -> dict[str, str]:
    """The AWS_* variables of this process that a Ray job hands to its workers (runtime_env)."""
    return {name: os.environ[name] for name in FORWARDED_AWS_ENV if os.environ.get(name)}
