"""Checkpoint loading without arbitrary code execution: every torch.load is weights_only=True.

DeepSpeed's own loaders use weights_only=False. Its checkpoints hold only tensors, plain Python
values and three small data classes, which are allow-listed here; anything else in a file is
refused by torch's restricted unpickler.
"""
from __future__ import annotations

import contextlib
import pickle
import types

import torch

from ..errors import UserError


def deepspeed_data_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal_detail(message: str) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    for line in message.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith(("Check the documentation", "Please file an issue")):
            return line
    return "not a plain checkpoint"


def load(path, map_location="cpu", **kwargs):
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        # a checkpoint that only a full unpickler could read may run code: refuse it, in one line
        raise UserError(f"{path}: refused to load: it holds pickled Python objects beyond tensors and plain "
                        f"values ({_refusal_detail(str(exc))}); loading it could run code. Use a checkpoint "
                        f"written by ernie-tiny-ds, from a source you trust") from None


def install_on_engine(engine) -> None:
    """Make the engine's checkpoint loads weights_only (its saves are unchanged)."""
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: load(path, map_location=map_location)


@contextlib.contextmanager
def weights_only_torch_in(module: types.ModuleType):
    """Within the block, `module`'s calls to torch.load are weights_only (for DeepSpeed's zero_to_fp32)."""
    original = module.torch
    proxy = types.SimpleNamespace(**{name: getattr(original, name) for name in dir(original)
                                     if not name.startswith("__")})
    proxy.load = lambda path, map_location=None, **kw: load(path, map_location=map_location,
                                                            **{k: v for k, v in kw.items() if k == "mmap"})
    module.torch = proxy
    try:
        yield
    finally:
        module.torch = original
