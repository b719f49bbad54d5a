"""Atomic checkpoints: DeepSpeed engine state + per-rank trainer state (step, data position, RNG).

Layout under CKPT = OUT/<stage>/checkpoints:
  CKPT/step_00000100/            one complete checkpoint (DeepSpeed files, trainer_state_rank*.pt,
                                 student config + tokenizer, manifest.json)
  CKPT/latest                    the tag of the newest complete checkpoint, replaced last

A checkpoint is written under `<tag>.partial`, checked, described by a manifest (every file with
its size and sha256), renamed, and only then named in `latest`. A crash at any moment leaves
either the old or the new checkpoint complete; resume verifies the manifest and falls back to
the newest checkpoint that is intact. Pruning never removes the checkpoint `latest` names (the one
just written), and when every checkpoint is damaged resume stops with one line instead of silently
starting over. `.partial` folders of saves that never finished (a crash, a full disk) are removed
at resume and before each save, under the job's lock only (outputs.py). Each checkpoint keeps the
stage's effective recipe (recipe.json): resume names every key that changed since and refuses the
ones that are not safe to change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, UserError
from ..files import (
    atomic_torch_save,
    atomic_write_text,
    disk_full_is_one_line,
    fsync_dir,
    fsync_tree,
    remove_stale_temps,
)
from ..outputs import under_lock
from . import recipe_changes, safe_load
from .collectives import all_gather_objects, broadcast_object

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL = ".partial"
RECIPE = "recipe.json"  # the stage's effective recipe when the checkpoint was written



@dataclass(frozen=True)
class RecipeRecord:
    """The recipe fingerprint (recipe_changes.fingerprint) a run's checkpoints keep as recipe.json, and
    what a resume lets change: keys in `safe` apply with a warning, others are refused; a change of a
    key in `schedule_keys` re-derives the rate from the recipe's `lr_key`."""
    fingerprint: dict | None = None
    safe: frozenset = recipe_changes.SAFE_ON_RESUME
    lr_key: str = "optim.lr"
    schedule_keys: tuple = ("optim.lr", "train.max_steps")


@dataclass(frozen=True)
class CheckpointedRun:
    """What a run's checkpoints under `root` save and a resume restores: the engine, the loader's
    position (and every RNG), the recipe record; `what` names the run in messages."""
    engine: object
    loader: object
    root: Path
    what: str
    recipe: RecipeRecord = RecipeRecord()


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


def save(engine, root: Path, step: int, trainer_state: dict, extra_files=None, keep: int = 2,
         recipe: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. `recipe` (the run's
    recipe fingerprint, RecipeRecord) is kept in the checkpoint as recipe.json."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    partial = root / (tag + PARTIAL)
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(root)  # leftovers of a crash or a full disk during an earlier save
        # DeepSpeed needs the name, so it cannot be random: create the folder here exclusively (a
        # symlink or folder planted at the name makes this fail) for DeepSpeed to write into
        os.mkdir(partial)
    _barrier()
    with _checkpoint_disk_full(root, partial):
        engine.save_checkpoint(str(root), tag=tag + PARTIAL, client_state={"step": step}, save_latest=False)
        state_file = partial / f"trainer_state_rank{rank}.pt"
        atomic_torch_save(trainer_state, state_file)
    _barrier()
    if rank == 0:
        with _checkpoint_disk_full(root, partial):
            if extra_files is not None:
                extra_files(partial)  # student config + tokenizer, so one folder is enough to export
            if recipe is not None:
                atomic_write_text(partial / RECIPE, json.dumps(recipe, sort_keys=True, indent=1))
            write_manifest(partial)
            fsync_tree(partial)  # DeepSpeed's files too: `latest` must never name a folder a power loss can truncate
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep, tag)
    _barrier()
    return final


def remove_stale_partials(root: Path) -> None:
    """Remove `<tag>.partial` folders: saves that never finished; nothing trusts them, they only fill the disk.
    Only under the job's lock (outputs.exclusive): otherwise a `.partial` may be another live job's save."""
    if not root.is_dir() or not under_lock(root):
        return
    remove_stale_temps(root / LATEST)  # a `latest` whose write never finished
    for path in root.iterdir():
        if path.name.startswith("step_") and path.name.endswith(PARTIAL):
            if path.is_symlink():  # never ours: a save would write through it wherever it points
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def checkpoint_bytes(folder: Path) -> int | None:
    """The size of a complete checkpoint, from its manifest (None when it has none)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return sum(int(meta["size"]) for meta in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoint_disk_full(root: Path, partial: Path):
    """A full disk during a save: the partial folder is removed and the line says about how many bytes a
    checkpoint needs, from the newest complete one's manifest."""
    def needs() -> tuple[int | None, str]:
        tags = complete_tags(root)
        needed = checkpoint_bytes(root / tags[-1]) if tags else None
        size = f"about {needed:,} bytes (the size of {tags[-1]})" if needed else "more space than is left"
        return needed, f"a checkpoint needs {size}"
    return disk_full_is_one_line(root, needs, "free space there, lower train.keep_checkpoints, or move output_dir "
                                 "to a larger disk", partial=partial)


def step_of(tag: str) -> int:
    """The step a checkpoint tag (tag_for) names."""
    return int(tag.split("_")[-1])


def _prune(root: Path, keep: int, fresh: str | None = None) -> None:
    """Keep `fresh` (the checkpoint just written, which `latest` names) and the keep-1 newest older
    ones. Pruning by name alone once kept a damaged newer folder and deleted the intact one `latest`
    named; folders newer than `fresh` belong to an abandoned or damaged past and go as well."""
    tags = complete_tags(root)
    if fresh is None or fresh not in tags:
        latest = root / LATEST
        fresh = latest.read_text().strip() if latest.is_file() else None
        if fresh not in tags:
            return  # nothing known to be good: remove nothing
    older = [t for t in tags if step_of(t) < step_of(fresh)]
    kept = {fresh, *older[max(0, len(older) - (keep - 1)):]} if keep > 1 else {fresh}
    for tag in tags:
        if tag not in kept:
            shutil.rmtree(root / tag, ignore_errors=True)


def complete_tags(root: Path) -> list[str]:
    """Finished checkpoint folders, oldest first (integrity not checked here)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(PARTIAL) and (p / MANIFEST).is_file())


def find_resumable(root: Path, log=print) -> str | None:
    """The newest intact checkpoint tag; damaged ones are reported and skipped. None when there was
    never a checkpoint; UserError when there were some but none is intact (starting over at step 0
    would silently throw the run away)."""
    tags = complete_tags(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if latest in tags:  # look at `latest` first, then older ones
        tags.remove(latest)
        tags.append(latest)
    damaged = []
    for tag in reversed(tags):
        problem = verify(root / tag)
        if problem is None:
            return tag
        damaged.append(f"{tag}: {problem}")
        log(f"warning: checkpoint {root / tag} is damaged ({problem}); trying an older one")
    if damaged or latest is not None:
        what = "; ".join(damaged) if damaged else f"`latest` names {latest}, which is missing"
        raise UserError(f"every checkpoint in {root} is damaged ({what}); restore one from a copy, or remove "
                        f"{root} to start this run over from step 0")
    return None


def load(engine, root: Path, tag: str, rank: int) -> dict:
    """Restore engine (params, optimizer, scheduler) and return this rank's trainer state."""
    # Before DeepSpeed reads anything: with more ranks than wrote it, its loaders fail deep inside
    # (a traceback); data positions and optimizer shards are per rank either way. Every rank counts
    # the same files, so all raise the same line together.
    written = len(list((root / tag).glob("trainer_state_rank*.pt")))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if written != world:
        raise UserError(f"checkpoint {root / tag} was written by {written} rank(s); this run has {world}: "
                        f"resume with {written} rank(s), or start over in a new output_dir")
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state_file = root / tag / f"trainer_state_rank{rank}.pt"
    if not state_file.is_file():
        raise RuntimeError(f"{state_file} is missing: the checkpoint was written by a run with fewer ranks")
    return safe_load.load(state_file)  # weights_only, and a pickle is one line, not a traceback


def agreed_tag(choice):
    """Rank 0's choice on every rank: on a shared filesystem ranks could otherwise see different
    checkpoints (a save in flight, a slow cache) and resume from different steps."""
    return broadcast_object(choice, src=0)


def run_folder(root: Path) -> Path:
    """What to remove to start over: OUT/<stage> for a stage's checkpoints, else the checkpoint folder."""
    return root.parent if root.name == "checkpoints" else root


def _choose(root: Path, recipe: dict | None, what: str, safe: frozenset) -> dict:
    """Rank 0: the checkpoint to resume from, or the one-line error every rank raises, and the recipe
    keys that changed since that checkpoint was written."""
    remove_stale_partials(root)  # a crash or a full disk during the last save
    try:
        tag = find_resumable(root, log=lambda m: print(m, flush=True))
    except UserError as exc:
        return {"tag": None, "error": str(exc)}
    changes: list = []
    if tag is not None and recipe is not None and (root / tag / RECIPE).is_file():
        saved = json.loads((root / tag / RECIPE).read_text())
        try:
            changes = recipe_changes.check(saved, recipe, safe,
                                           f"the recipe of {what} changed since {root / tag} was written",
                                           f"rm -r {run_folder(root)} to start {what} over, or use a new "
                                           "output_dir")
        except ConfigError as exc:
            return {"tag": None, "error": str(exc), "config": True}
    return {"tag": tag, "error": None, "changes": changes}


def apply_lr(engine, lr: float) -> None:
    """A changed optim.lr takes effect on resume: the scheduler's base rate is reset and the current
    rate re-derived from the schedule (whose warm-up/decay already follows the recipe's max_steps)."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return
    sched.base_lrs = [lr for _ in sched.optimizer.param_groups]
    rates = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, rate in zip(sched.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = lr, rate
    sched._last_lr = rates


def resume_or_seed(run: CheckpointedRun, rank: int, seed: int) -> int:
    """Restore the newest intact checkpoint under `run.root` (engine, data position, RNG) and return
    its step; without one, seed this rank's RNG (dropout differs by rank, reproducibly) and return 0.
    Collective: rank 0 chooses (and alone reads the checksums), every rank loads that one. The
    checkpoint's recipe is compared with `run.recipe`: keys safe to change are applied with a
    warning, others refused."""
    root, what, record = run.root, run.what, run.recipe
    choice = agreed_tag(_choose(root, record.fingerprint, what, record.safe) if rank == 0 else None)
    if choice["error"] is not None:
        raise (ConfigError if choice.get("config") else UserError)(choice["error"])
    tag = choice["tag"]
    if tag is None:
        torch.manual_seed(seed + rank)
        return 0
    state = load(run.engine, root, tag, rank)
    steps = set(all_gather_objects(int(state["step"])))
    if steps != {int(state["step"])} or int(state["step"]) != step_of(tag):
        raise RuntimeError(f"ranks loaded different steps {sorted(steps)} from {root / tag}: the checkpoint's "
                           "trainer states disagree")
    run.loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    changed = {key for key, _old, _new in choice["changes"]}
    if changed & set(record.schedule_keys) and record.fingerprint is not None:  # the schedule follows the new rate
        apply_lr(run.engine, float(recipe_changes.flatten(record.fingerprint)[record.lr_key]))
    if rank == 0:
        for key, old, new in choice["changes"]:
            print(f"warning: {what}: {key} changed from {old!r} to {new!r} since {root / tag}; "
                  f"{recipe_changes.HOW_APPLIED.get(key, 'applied from here on')}", flush=True)
        print(f"resumed {what} from {root / tag} at step {int(state['step'])}", flush=True)
    return int(state["step"])


def trainer_state(step: int, loader) -> dict:
    """What a checkpoint keeps beside the engine: the step, the data position and every RNG."""
    return {"step": step, "loader": loader.state_dict(), "rng": rng_state()}
