"""Does the exported fp32 model reproduce the student the engine trained? A bound fit for the engine's precision.

The engine runs the student in train.precision (bf16 on a GPU); the export holds the fp32 master
weights and runs in fp32 on rank 0's CPU. An absolute tolerance cannot judge that: bf16 keeps 8
significant bits (spacing 0.0625 between 8 and 16) and a trained model's last hidden state has
outlier dimensions well above 8. A bound in epsilons alone cannot either: how far rounding moves
the outputs depends on the model (in bf16 epsilons, 1.2 for a fresh demo-shape student, 5 for the
pretrained MiniLM-L6), and so does how far a corruption moves them (a zeroed FFN: 19 epsilons in a
fresh student, 190 in MiniLM). So the check measures the model's own rounding and
allows a few times that:

    error(a, b) = max over tokens of ||a - b||_2 / RMS over tokens of ||b||_2
    measured    = error(engine, export)
    rounding    = error(export run in train.precision, export)     (fp32: the export run in float64)
    allowed     = max(SPREAD x rounding, FLOOR epsilons)

(the worst token against a typical token's length: an outlier dimension or a near-zero row of
logits does not swing it, and a corruption that hits a few tokens still shows). The engine's weights
are the export's rounded to train.precision, so a healthy engine differs from the export by one
rounding of the same size, summed in another order (another device's kernels).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from ..errors import UserError
from .export import load_exported, model_outputs

EPSILON = {"fp32": torch.finfo(torch.float32).eps, "bf16": torch.finfo(torch.bfloat16).eps,
           "fp16": torch.finfo(torch.float16).eps}
# the export runs in these to show a precision's own rounding: 16-bit against the fp32 export itself,
# fp32 against float64
ROUNDING_RUN = {"fp32": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}

# Two runs in one precision (the engine's kernels, the export's on the CPU) each move the outputs by
# about `rounding`, independently: their distance is at most about twice that. Measured on CPU with
# other attention kernels (eager against SDPA) in bf16, fp16 and fp32: 0.84-1.02x `rounding`. 4 leaves
# 2x room and stays well under what a corruption does, in units of `rounding`: a zeroed FFN or a
# re-initialised matrix 16-24x in a fresh demo-shape student, its first and last layers swapped 300x;
# a zeroed FFN or two swapped layers of MiniLM-L6 34-36x. (10 % noise on one matrix, 2-7x, is not a
# broken export and may pass in 16 bits; in fp32 even 1 % noise fails.)
SPREAD = 4.0
FLOOR = 2  # epsilons: the outputs' own final rounding, so a lucky near-zero `rounding` cannot fail a healthy run


class ExportCheck(NamedTuple):
    ok: bool
    measured: float      # relative_error(engine, export)
    allowed: float       # SPREAD x the model's own rounding, at least FLOOR epsilons
    max_abs_diff: float  # the largest single difference, for the record
    explanation: str     # one line: measured, bound, and what the bound is


class ExportMismatch(UserError):
    """The export does not reproduce the trained student: the run must not mark the stage done."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The worst token's distance against a typical token's length (NaN for non-finite or all-zero outputs)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    typical = want.pow(2).sum(-1).mean().sqrt()
    return float((got - want).norm(dim=-1).max() / typical) if typical > 0 else float("nan")


def export_matches(engine: torch.Tensor, export: torch.Tensor, export_rounded: torch.Tensor,
                   precision: str) -> ExportCheck:
    """Judge `export` (the fp32 export's outputs) against `engine` (the trained student's, run in
    `precision`); `export_rounded` is the export run in `precision` (fp32: in float64), which gives the
    model's own rounding. Outputs are [..., features]: last hidden states or logits."""
    if engine.shape != export.shape:
        return ExportCheck(False, float("inf"), 0.0, float("inf"),
                           f"outputs of shape {tuple(export.shape)}, the engine's {tuple(engine.shape)}")
    measured = relative_error(engine, export)
    rounding = relative_error(export_rounded, export)
    # a rounding run that overflowed (fp16 on the CPU) measures nothing: the floor, never an infinite bound
    allowed = max(FLOOR * EPSILON[precision], SPREAD * rounding if math.isfinite(rounding) else 0.0)
    max_abs = float((engine.double().cpu() - export.double().cpu()).abs().max())
    ok = measured <= allowed  # NaN (a non-finite export) fails
    explanation = (f"the worst token differs by {measured:.3g} of a typical token's length "
                   f"({'within' if ok else 'over'} the bound {allowed:.3g} = {SPREAD:g} x this model's own "
                   f"{precision} rounding {rounding:.3g}, at least {FLOOR} x epsilon); max abs diff {max_abs:.3g}")
    return ExportCheck(ok, measured, allowed, max_abs, explanation)


def check_export(folder: str | os.PathLike, batch: dict, expected: torch.Tensor, precision: str) -> dict:
    """Load the export fresh, run it on the probe batch in fp32 and in `precision` (fp32: float64) and
    judge it against the engine's outputs: the fields stage_done.json records, or ExportMismatch (one
    line naming the folder)."""
    model = load_exported(folder)
    batch = {k: v.cpu() for k, v in batch.items()}
    with torch.no_grad():
        export = model_outputs(model, batch)
        rounded = model_outputs(model.to(ROUNDING_RUN[precision]), batch)
    check = export_matches(expected, export, rounded, precision)
    if not check.ok:
        raise ExportMismatch(f"the export in {folder} does not reproduce the trained student: {check.explanation}")
    return {"export_max_abs_diff": check.max_abs_diff, "export_error": check.measured,
            "export_error_allowed": check.allowed}
