"""Atomic checkpoints: DeepSpeed engine state + per-rank trainer state (step, data position, RNG).

Layout under CKPT = OUT/<stage>/checkpoints:
  CKPT/step_00000100/            one complete checkpoint (DeepSpeed files, trainer_state_rank*.pt,
                                 student config + tokenizer, manifest.json)
  CKPT/latest                    the tag of the newest complete checkpoint, replaced last

A checkpoint is written under `<tag>.partial`, checked, described by a manifest (every file with
its size and sha256), renamed, and only then named in `latest`. A crash at any moment leaves
either the old or the new checkpoint complete; resume verifies the manifest and falls back to
the newest checkpoint that is intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..files import atomic_torch_save, atomic_write_text, fsync_dir, fsync_tree
from .collectives import all_gather_objects, broadcast_object

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL = ".partial"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the checkpoint was never completed)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save / load
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, trainer_state: dict, extra_files=None, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    partial = root / (tag + PARTIAL)
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crash during an earlier save
    _barrier()
    engine.save_checkpoint(str(root), tag=tag + PARTIAL, client_state={"step": step}, save_latest=False)
    state_file = partial / f"trainer_state_rank{rank}.pt"
    atomic_torch_save(trainer_state, state_file)
    _barrier()
    if rank == 0:
        if extra_files is not None:
            extra_files(partial)  # student config + tokenizer, so one folder is enough to export
        write_manifest(partial)
        fsync_tree(partial)  # DeepSpeed's files too: `latest` must never name a folder a power loss can truncate
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    tags = complete_tags(root)
    for tag in tags[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)


def complete_tags(root: Path) -> list[str]:
    """Finished checkpoint folders, oldest first (integrity not checked here)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(PARTIAL) and (p / MANIFEST).is_file())


def find_resumable(root: Path, log=print) -> str | None:
    """The newest intact checkpoint tag; damaged ones are reported and skipped."""
    tags = complete_tags(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if latest in tags:  # look at `latest` first, then older ones
        tags.remove(latest)
        tags.append(latest)
    for tag in reversed(tags):
        problem = verify(root / tag)
        if problem is None:
            return tag
        log(f"warning: checkpoint {root / tag} is damaged ({problem}); trying an older one")
    return None


def load(engine, root: Path, tag: str, rank: int) -> dict:
    """Restore engine (params, optimizer, scheduler) and return this rank's trainer state."""
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state_file = root / tag / f"trainer_state_rank{rank}.pt"
    if not state_file.is_file():
        raise RuntimeError(f"{state_file} is missing: the checkpoint was written by a run with fewer ranks")
    return torch.load(state_file, weights_only=True)


def agreed_tag(tag: str | None) -> str | None:
    """Rank 0's choice on every rank: on a shared filesystem ranks could otherwise see different
    checkpoints (a save in flight, a slow cache) and resume from different steps."""
    return broadcast_object(tag, src=0)


def resume_or_seed(engine, root: Path, loader, rank: int, seed: int, what: str) -> int:
    """Restore the newest intact checkpoint under `root` (engine, data position, RNG) and return its
    step; without one, seed this rank's RNG (dropout differs by rank, reproducibly) and return 0.
    Collective: rank 0 chooses (and alone reads the checksums), every rank loads that one."""
    tag = find_resumable(root, log=lambda m: print(m, flush=True)) if rank == 0 else None
    tag = agreed_tag(tag)
    if tag is None:
        torch.manual_seed(seed + rank)
        return 0
    state = load(engine, root, tag, rank)
    steps = set(all_gather_objects(int(state["step"])))
    if steps != {int(state["step"])} or int(state["step"]) != int(tag.split("_")[-1]):
        raise RuntimeError(f"ranks loaded different steps {sorted(steps)} from {root / tag}: the checkpoint's "
                           "trainer states disagree")
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    if rank == 0:
        print(f"resumed {what} from {root / tag} at step {int(state['step'])}", flush=True)
    return int(state["step"])


def trainer_state(step: int, loader) -> dict:
    """What a checkpoint keeps beside the engine: the step, the data position and every RNG."""
    return {"step": step, "loader": loader.state_dict(), "rng": rng_state()}
