"""Backend choice for the loss kernels: the fused Triton kernels or the torch reference.

backend "auto":   Triton when every tensor is on CUDA, its dtype is one the kernels take and
                  triton imports; otherwise the torch path.
backend "triton": the kernels; on CPU only under the Triton interpreter (TRITON_INTERPRET=1
                  set before triton is first imported); anything else is a clear error.
backend "torch":  attention transfer in torch with a closed-form backward
                  (``attention_transfer_torch``; ``query_chunk`` bounds its score maps to
                  [B, H, chunk, L], forward and backward); the soft-label loss from the reference
                  in ``ernie_tiny_ds.losses``, which defines what every path must return.

The argument checks of the kernels and the torch path live in ``checks.py``, once
(``check_*_inputs``); each path calls them at its entry, so a call is checked exactly once
whichever path runs it.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import losses as _ref
from .attention_transfer_torch import attention_transfer_torch
from .checks import KERNEL_DTYPES

BACKENDS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "yes", "on", "y")  # what triton's knobs accept as true


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """triton imports (it is only in the ``test`` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_active() -> bool:
    """True when the kernels run on CPU tensors: TRITON_INTERPRET is set now and was set when the
    kernel modules were first imported (triton decides interpreted vs compiled at decoration)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from .soft_label_triton import _soft_label_fwd
    return isinstance(_soft_label_fwd, InterpretedFunction)


# --------------------------------------------------------------------------- backend choice
def select_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors, or an error that says why 'triton' cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        usable = on_cuda and all(t.dtype in KERNEL_DTYPES for t in tensors) and triton_installed()
        return "triton" if usable else "torch"
    if not triton_installed():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'ernie-tiny-ds[test]'); "
                           "use backend='auto' or 'torch' without it")
    if not on_cuda and not interpreter_active():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"backend='triton' got tensors on {devices}: Triton runs on CUDA tensors, or on CPU only "
                           "under its interpreter (set TRITON_INTERPRET=1 before triton is first imported); "
                           "use backend='auto' or 'torch' on CPU")
    return "triton"


def attention_transfer(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                       attention_mask: torch.Tensor, kind: str = "kl", relation_heads: int | None = None,
                       backend: str = "auto", query_chunk: int | None = None) -> torch.Tensor:
    """Attention transfer loss; ``query_chunk`` applies to the torch path (the kernel never holds L x L)."""
    if select_backend(backend, q_s, k_s, q_t, k_t) == "triton":
        from . import attention_transfer as fused
        return fused(q_s, k_s, q_t, k_t, attention_mask, kind=kind, relation_heads=relation_heads)
    return attention_transfer_torch(q_s, k_s, q_t, k_t, attention_mask, kind=kind, relation_heads=relation_heads,
                                    query_chunk=query_chunk)


def soft_label(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               backend: str = "auto") -> torch.Tensor:
    if select_backend(backend, student_logits, teacher_logits) == "triton":
        from . import soft_label as fused
        return fused(student_logits, teacher_logits, temperature)
    return _ref.soft_label_loss(student_logits, teacher_logits, temperature)
