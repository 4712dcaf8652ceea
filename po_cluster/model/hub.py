"""Pushing an open_clip export folder to the Hugging Face Hub, where open_clip loads it as
`hf-hub:ORG/NAME`. The token comes from huggingface_hub's own chain (HF_TOKEN, or the file
`huggingface-cli login` writes), the endpoint from HF_ENDPOINT: never from a po-cluster config."""
from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "hf-hub:"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class HubError(RuntimeError):
    """The push did not happen; the message says where and why."""


def repo_id(target: str) -> str:
    """`hf-hub:ORG/NAME` → ORG/NAME; ValueError naming the expected form otherwise."""
    name = target.removeprefix(PREFIX)
    if not target.startswith(PREFIX) or not _REPO.fullmatch(name):
        raise ValueError(f"--push {target!r}: expected hf-hub:ORG/NAME (letters, digits, . _ -)")
    return name


def push_folder(folder: str | Path, target: str, private: bool | None = None) -> str:
    """Create the model repository if needed and upload every file of `folder` in one commit; returns the
    commit's URL. The upload is huggingface_hub's own (large files through its LFS protocol)."""
    from huggingface_hub import HfApi

    name = repo_id(target)
    # huggingface_hub reads HF_ENDPOINT once, when it is first imported; read here, it is the one in effect now
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(name, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=name, repo_type="model",
                                   commit_message="po-cluster export")
    except Exception as error:  # HTTP statuses, connection and token errors: huggingface_hub has no one base
        raise HubError(f"push to {target} ({api.endpoint}) failed: {type(error).__name__}: {error}") from None
    return str(commit.commit_url)
