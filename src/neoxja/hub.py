"""Finding a checkpoint's files: a local directory, or a Hugging Face hub id resolved through
huggingface_hub (its cache, revisions, token from the environment, HF_HUB_OFFLINE)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError


HUB_ARGS = ("revision", "local_files_only", "token", "cache_dir")


def pop_hub_args(kwargs: dict) -> dict:
    """Take the hub-download arguments (revision, local_files_only, token, cache_dir) out of `kwargs`."""
    return {key: kwargs.pop(key) for key in HUB_ARGS if key in kwargs}


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).is_dir()


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    required: bool = True,
) -> Path | None:
    """Path of `filename` in a local checkpoint directory or a hub repository.

    Returns None for a missing optional file (required=False); raises CheckpointError otherwise."""
    if is_local(name_or_path):
        path = Path(name_or_path) / filename
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"{filename} not found in checkpoint directory {name_or_path}")
        return None
    name = str(name_or_path)
    if os.path.exists(name):
        raise CheckpointError(f"{name} is a file, not a checkpoint directory or hub id")
    if name.count("/") > 1 or not name.strip() or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such checkpoint directory (and not a valid hub id)")
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                name,
                filename,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except hf_errors.LocalEntryNotFoundError:
        if not required and _cached_repo_exists(name, cache_dir):
            return None
        raise CheckpointError(
            f"{name}/{filename} is not in the local hub cache and cannot be downloaded (offline, "
            f"local_files_only, or no network). Download it where there is network, or pass a local directory."
        ) from None
    except hf_errors.EntryNotFoundError:
        if required:
            raise CheckpointError(f"{filename} not found in hub repository {name}") from None
        return None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{name}: no such local directory, and no such hub repository (or it is private: set HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{name}: revision {revision!r} not found") from None
    except (OSError, ValueError) as err:  # HTTP failures surface as OSError subclasses
        raise CheckpointError(f"could not fetch {filename} from {name}: {err}") from None


def _cached_repo_exists(name: str, cache_dir: str | os.PathLike | None) -> bool:
    """True when the hub cache holds some snapshot of `name` (so an absent file is really absent)."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + name.replace("/", "--")) / "snapshots"
    return root.is_dir() and any(root.iterdir())
