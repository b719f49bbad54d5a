"""Hugging Face Hub IDs wherever a model or tokenizer folder is accepted.

A value that is an existing folder stays a folder. Otherwise, if it looks like a Hub ID
(`bert-base-uncased`, `nghuyong/ernie-3.0-base-zh`), it is resolved to a snapshot folder in the
Hub cache (HF_HOME / HF_HUB_CACHE, read at call time so a test or a job can point it elsewhere):
with HF_HUB_OFFLINE=1 only a copy already in the cache is used, otherwise it is downloaded once.
Every later loader (transformers' from_pretrained, the tokenizer) then reads a plain folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError

# owner/name or a legacy single name; the Hub allows letters, digits, '-', '_', '.' (no '--' or '..')
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

# what a model or tokenizer needs; *.bin only when a repository has no safetensors (see _fetch)
_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]


def looks_like_hub_id(value: str) -> bool:
    if not _HUB_ID.match(value) or "--" in value or ".." in value or value.endswith((".", "-")):
        return False
    # a file name (recipe.yaml, model.bin) is a missing local file, not a repository
    return not re.search(r"\.(ya?ml|json|txt|bin|safetensors|pt|onnx|tsv|csv|jsonl)$", value)


def hub_cache_dir() -> Path:
    """The Hub cache the huggingface_hub client would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(value: str | None, key: str, revision: str | None = None, what: str = "model") -> str | None:
    """A local folder for `value` (a folder, or a Hub ID fetched into / found in the cache).

    `what` is "model" (config, weights, tokenizer) or "tokenizer" (tokenizer files only)."""
    if value is None:
        return None
    local = Path(os.path.expanduser(value))
    if local.is_dir():
        return str(local)
    if not looks_like_hub_id(value):
        raise ConfigError(f"{key}: folder not found: {value} (not a Hub ID either)")
    return str(_fetch(value, key, revision, what))


def _fetch(repo_id: str, key: str, revision: str | None, what: str) -> Path:
    # imported here: only recipes that name a Hub ID pay for the client's import
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    at = f"@{revision}" if revision else ""
    patterns = _TOKENIZER_FILES if what == "tokenizer" else _MODEL_FILES
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns,
                                        local_files_only=offline()))
        if what == "model" and not offline() and not any(folder.glob("*.safetensors")):
            # an older repository with PyTorch pickles only
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                            allow_patterns=patterns + ["*.bin"]))
    except LocalEntryNotFoundError:
        if offline():
            raise ConfigError(
                f"{key}: Hub model {repo_id}{at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: "
                f"pre-download it with `huggingface-cli download {repo_id}"
                f"{' --revision ' + revision if revision else ''}` (same HF_HOME), or run with HF_HUB_OFFLINE=0"
            ) from None
        raise ConfigError(f"{key}: cannot reach the Hugging Face Hub for {repo_id}{at} and it is not in the cache "
                          f"({cache}); pre-download it with `huggingface-cli download {repo_id}`") from None
    except GatedRepoError:
        raise ConfigError(f"{key}: {repo_id} is a gated repository: accept its terms on the Hub and log in "
                          "(`huggingface-cli login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: no folder {repo_id} here and no Hub repository {repo_id} (or it is private: "
                          "log in with `huggingface-cli login`)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: {repo_id} has no revision {revision!r}") from None
    except OSError as exc:  # network errors, HTTP errors, a full disk
        raise ConfigError(f"{key}: cannot fetch {repo_id}{at} from the Hugging Face Hub: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not (folder / "config.json").is_file() and what == "model":
        raise ConfigError(f"{key}: the Hub snapshot of {repo_id}{at} in {folder} has no config.json "
                          "(not a transformers model repository?)")
    return folder
