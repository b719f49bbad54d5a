"""ZeRO checkpoint -> Hugging Face model folder (config, safetensors, tokenizer).

The checkpoint holds the whole DistillationObjective (student + projections); the export keeps
the student only. ZeRO shards are consolidated to fp32 on the CPU, so any stage exports the same way.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save

from ..distill.objective import projection_state
from ..errors import UserError
from ..files import (
    plain_file_modes,
    remove_stale_temps,
    replace_dir,
    temp_dir_beside,
    weights_disk_full_is_one_line,
    write_atomic,
)
from ..outputs import write_marker
from . import safe_load
from .checkpoint import LATEST, verify

STUDENT_PREFIX = "student."
STUDENT_DIR = "student_hf"  # inside each checkpoint: config + tokenizer of the student
EXPORT = "export"  # the marker kind of a model folder exported from a checkpoint


def _checkpoint_folder(path: Path) -> Path:
    """Accept a checkpoint folder itself or the folder holding `latest`."""
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32

    if any(folder.glob("*optim_states.pt")):
        with safe_load.weights_only_torch_in(zero_to_fp32):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # ZeRO stage 0: the full module is in the model-states file
    states = safe_load.load(folder / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


def student_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                      projections: str | os.PathLike | None = None) -> Path:
    """The student of a checkpoint as a Hugging Face folder; with `projections`, the objective's
    projections also go to that safetensors file (outside the folder: they are no part of the model)."""
    folder = _checkpoint_folder(Path(checkpoint))
    if not folder.is_dir():
        raise UserError(f"--checkpoint: {folder} is not a checkpoint folder")
    problem = verify(folder)
    if problem is not None:
        raise UserError(f"--checkpoint: {folder} is not a complete checkpoint: {problem}")
    hf_dir = folder / STUDENT_DIR
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"--checkpoint: {folder} has no {STUDENT_DIR}/config.json (not written by ernie-tiny-ds?)")
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    architecture = (config.architectures or [None])[0]
    model_cls = getattr(transformers, architecture, None) if architecture else transformers.AutoModel
    if model_cls is None:
        raise UserError(f"{hf_dir}/config.json names an unknown architecture {architecture!r}")
    model = model_cls(config)
    full = consolidated_state_dict(folder)
    model.load_state_dict(student_state_dict(full), strict=True)
    if projections is not None:
        save_projections(full, Path(projections))
    return save_model_folder(model, hf_dir, Path(output))


def save_projections(full: dict[str, torch.Tensor], path: Path) -> Path:
    """The projection weights of a consolidated state, written durably (temp file, fsync, rename)."""
    tensors = {k: v.detach().float().contiguous() for k, v in projection_state(full).items()}
    return write_atomic(path, lambda handle: handle.write(save(tensors)))


def save_model_folder(model, tokenizer_dir: Path | None, output: Path, tokenizer=None) -> Path:
    """Write model (safetensors) + tokenizer to `output` durably: a temp folder, synced, renamed at the end."""
    remove_stale_temps(output)  # what an interrupted export (a full disk) left beside it
    tmp = temp_dir_beside(output)
    try:
        with weights_disk_full_is_one_line(output, model):
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is None and tokenizer_dir is not None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_marker(tmp, EXPORT)  # what a later `export --output` here may replace
        plain_file_modes(tmp)  # model.safetensors comes 0600 from transformers
        problem = export_problem(tmp)  # test-load before it replaces anything (and before any marker names it)
        if problem is not None:
            raise RuntimeError(f"the export written for {output} does not load: {problem}")
        return replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_outputs(model, batch: dict) -> torch.Tensor:
    """What a user of the exported model reads: logits for a task head, else the last hidden state."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def load_exported(folder: str | os.PathLike):
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or [""])[0]
    auto = transformers.AutoModelForSequenceClassification if architecture.endswith("ForSequenceClassification") \
        else transformers.AutoModel
    return auto.from_pretrained(folder).eval()


def export_problem(folder: str | os.PathLike) -> str | None:
    """None when the model folder loads, else why not (a truncated model.safetensors, a missing config)."""
    try:
        load_exported(folder)
    except Exception as exc:  # whatever transformers/safetensors raise for a damaged folder
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None

