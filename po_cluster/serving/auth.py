"""Optional API keys (Authorization: Bearer <key>), from an environment variable or a mounted secret file.

Keys are configured by naming their source in the app args, never by value, so
that no key is written into a Serve config. A source that is named but empty or
missing fails the replica's start (closed, not open). A secret file is re-read
when it changes, so a rotated Kubernetes secret takes effect without a restart.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from po_cluster.config import Strict
from po_cluster.serving.limits import ApiError


class AuthConfig(Strict):

    api_keys_env: str | None = Field(None, description="name of an environment variable: keys separated by "
                                                       "commas or whitespace")
    api_keys_file: str | None = Field(None, description="path of a mounted secret file: one key per line")


def _split(text: str) -> set[str]:
    return {key for key in text.replace(",", " ").split() if key}


def _digest(key: str) -> bytes:
    # Compare digests: equal length whatever the key, so the comparison time says nothing about it.
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys; `check(header)` raises a 401 ApiError unless the Bearer key is one of them."""

    def __init__(self, auth: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
        self.auth = auth
        self._env_keys: set[str] = set()
        if auth.api_keys_env:
            environ = os.environ if environ is None else environ
            self._env_keys = _split(environ.get(auth.api_keys_env, ""))
            if not self._env_keys:
                raise ValueError(f"api keys: environment variable {auth.api_keys_env} is unset or empty")
        self._file_stamp: tuple[int, int] | None = None
        self._file_keys: set[str] = set()
        self._digests = [_digest(k) for k in sorted(self._env_keys)]
        self._refresh()
        if self.enabled and not self._digests:
            raise ValueError(f"api keys: the secret file {auth.api_keys_file} holds no key")

    @property
    def enabled(self) -> bool:
        return bool(self.auth.api_keys_env or self.auth.api_keys_file)

    def _refresh(self) -> None:
        if self.auth.api_keys_file:
            path = Path(self.auth.api_keys_file)
            try:
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._file_stamp:  # changed (rotated): the only time the digests are rebuilt
                    self._file_keys, self._file_stamp = _split(path.read_text()), stamp
                    self._digests = [_digest(k) for k in sorted(self._env_keys | self._file_keys)]
            except OSError as error:
                if self._file_stamp is None:  # at start: refuse to run open
                    raise ValueError(f"api keys: cannot read the secret file {path}: {error.strerror}") from None
                # later (a secret being swapped): keep the keys we had

    def check(self, authorization: str | None) -> str:
        """The id of the request's key (a digest prefix, safe to log), "anonymous" when no keys are asked."""
        if not self.enabled:
            return "anonymous"
        self._refresh()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "authorization", "missing API key: send the header 'Authorization: Bearer <key>'",
                           "missing_api_key")
        given = _digest(key.strip())
        if not any([hmac.compare_digest(given, digest) for digest in self._digests]):  # no early exit
            raise ApiError(401, "authorization", "the API key is not valid", "invalid_api_key")
        return given.hex()[:16]
