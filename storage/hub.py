"""Hugging Face hub repositories fetched into the local hub cache.

Only weights in safetensors form, their index, the side files of `storage.model_files`
(configs, tokenizer and processor files, diffusers' component configs) and a LoRA
``adapter_config.json`` are fetched (pickle weights only when allowed).
The revision is resolved to a commit, which is recorded. The token comes from ``HF_TOKEN``
(huggingface_hub's own lookup) and is never logged or stored. Remote code is never run:
nothing here imports or executes anything from the repository.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tvsplit.storage.errors import SourceError, SourceUnavailableError
from tvsplit.storage.model_files import SIDE_FILE_PATTERNS, WEIGHT_PATTERNS

#: Weights in safetensors form, the side files a model folder carries (the one list of
#: `storage.model_files`, diffusers folders included) and a LoRA adapter's config.
ALLOW_PATTERNS = [*WEIGHT_PATTERNS, *SIDE_FILE_PATTERNS, "adapter_config.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class HubSnapshot:
    """A fetched repository: its local folder and the commit it was resolved to."""

    repo_id: str
    revision: str
    commit: str
    folder: Path


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it looks like ``org/name`` (or ``name``), else SourceError."""
    if not _REPO.match(repo_id) or ".." in repo_id:
        raise SourceError(f"hf://{repo_id}: not a repository id (expected hf://org/name[@rev])")
    return repo_id


def fetch(repo_id: str, revision: str = "main", *, allow_pickle: bool = False) -> HubSnapshot:
    """Download (or find in the cache) the files tvsplit needs from a hub model repository.

    Raises SourceError for a missing repository, revision or file (bad input), and
    SourceUnavailableError when the hub cannot be reached and the cache cannot answer.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"hf://{repo_id}@{revision}"
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise SourceError(
            f"{label}: repository not found or not accessible ({_short(error)})"
        ) from None
    except LocalEntryNotFoundError as error:
        message = f"{label}: not in the local hub cache and the hub cannot be reached"
        if constants.HF_HUB_OFFLINE:  # retrying cannot help: offline mode is a choice
            raise SourceError(f"{message} (HF_HUB_OFFLINE is set)") from None
        raise SourceUnavailableError(f"{message} ({_short(error)})") from None
    except RevisionNotFoundError:
        raise SourceError(f"{label}: revision {revision!r} not found") from None
    except EntryNotFoundError as error:
        raise SourceError(f"{label}: {_short(error)}") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status is not None and (status >= 500 or status == 429):
            raise SourceUnavailableError(f"{label}: hub error {status}") from None
        raise SourceError(f"{label}: {_short(error)}") from None
    except (OSError, TimeoutError) as error:
        raise SourceUnavailableError(f"{label}: {_short(error)}") from None
    except Exception as error:
        if type(error).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "httpcore2"}:
            raise SourceUnavailableError(f"{label}: network error ({_short(error)})") from None
        raise
    path = Path(folder)
    commit = path.name if _COMMIT.match(path.name) else revision
    if not _COMMIT.match(commit):
        raise SourceError(f"{label}: could not resolve the revision to a commit")
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=commit, folder=path)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
