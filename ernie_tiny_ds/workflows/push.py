"""`ernie-tiny-ds push --model DIR --repo-id NAME`: upload an exported model folder (weights, tokenizer,
README.md card, model.onnx when present) to the Hugging Face Hub, or to another endpoint (--endpoint,
HF_ENDPOINT: a private Hub mirror). The token comes from HF_TOKEN or `huggingface-cli login`."""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..data.hub import looks_like_hub_id
from ..errors import UserError
from .model_card import CARD, check_loadable


def push(folder: str | os.PathLike, repo_id: str, endpoint: str | None = None, private: bool = False,
         revision: str | None = None, message: str | None = None, token: str | None = None) -> str:
    """Create the repository if needed and upload the folder in one commit; returns the commit URL."""
    folder = Path(folder)
    check_loadable(folder)
    if not looks_like_hub_id(repo_id):
        raise UserError(f"--repo-id: {repo_id!r} is not a Hub repository name (owner/name)")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message or f"Upload {folder.name} (ernie-tiny-ds)",
                                 ignore_patterns=[".*", "*.tmp"])  # durable-write temp files never go up
    except OfflineModeIsEnabled:
        raise UserError("push needs the network but HF_HUB_OFFLINE=1: run it with HF_HUB_OFFLINE=0") from None
    except HfHubHTTPError as exc:
        raise UserError(f"push to {repo_id} failed: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # the Hub refused the card's YAML front matter
        raise UserError(f"push to {repo_id} failed: {' '.join(str(exc).split())}") from None
    except _network_errors() as exc:  # connection refused, DNS, timeouts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"push to {repo_id} failed: cannot reach {api.endpoint}: {first}") from None
    return str(getattr(info, "commit_url", info))


def _network_errors() -> tuple[type, ...]:
    """What the Hub client raises when the endpoint cannot be reached. Its HTTP library changed across
    huggingface_hub releases (requests, httpx, httpx2), and none of their transport errors is an OSError."""
    errors: list[type] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an exported model folder (e.g. OUT/task_specific/student)")
    parser.add_argument("--repo-id", required=True, help="owner/name on the Hub (created when missing)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--message", default=None, help="commit message")


def run(args) -> int:
    folder = Path(args.model)
    if not (folder / CARD).is_file():
        print(f"warning: {folder} has no {CARD} model card (the pipeline's report writes one)", flush=True)
    url = push(folder, args.repo_id, endpoint=args.endpoint, private=args.private, revision=args.revision,
               message=args.message)
    print(f"pushed {folder} to {args.repo_id}: {url}", flush=True)
    return 0
