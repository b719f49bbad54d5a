"""The recipe's DeepSpeed JSON checked before any work starts: DeepSpeed's own config model (its
pydantic sections), the optimizer's name and keyword arguments, and the types of the top-level
settings DeepSpeed reads without checking. A mistake is one line naming the key, where DeepSpeed
would otherwise fail at engine start-up with a traceback or a many-line pydantic report.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

# DeepSpeed at the top: config/recipe.py imports this module only when there is a DeepSpeed setting to check
import torch
from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.ops.lamb import FusedLamb
from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig
from pydantic import ValidationError

from ..config import Recipe
from ..errors import ConfigError
from .device_defaults import device_defaults
from .ds_config import build_ds_config
from .engine_settings import EngineSettings
from .process_group import device

# what DeepSpeed itself takes out of optimizer.params before it builds the optimizer
_DEEPSPEED_OPTIMIZER_KEYS = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
_NUMBER, _BOOL = (int, float), (bool,)
# top-level settings DeepSpeed reads as they are: a string here fails (or is silently true) much later
_SCALAR_TYPES = {"gradient_clipping": _NUMBER, "gradient_predivide_factor": _NUMBER, "steps_per_print": (int,),
                 "prescale_gradients": _BOOL, "sparse_gradients": _BOOL, "zero_allow_untested_optimizer": _BOOL,
                 "zero_force_ds_cpu_optimizer": _BOOL, "wall_clock_breakdown": _BOOL, "memory_breakdown": _BOOL}


def check_ds_config(recipe: Recipe) -> None:
    # `auto` keys as this process's device would resolve them: they change bf16/fp16.enabled, never the shape
    resolved = recipe.on_device(device_defaults(device()))
    config = build_ds_config(recipe.deepspeed, EngineSettings.of_stage(resolved), world_size=1)
    # the batch keys are the recipe's (an override of them is refused); without train_batch_size
    # DeepSpeedConfig derives it from whatever world it sees, so the check holds on any number of ranks
    del config["train_batch_size"]
    config.update(train_micro_batch_size_per_gpu=recipe.train.micro_batch_size,
                  gradient_accumulation_steps=recipe.train.grad_accum)

    def where(path: str) -> str:
        node = recipe.deepspeed.overrides
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return f"deepspeed.config {recipe.deepspeed.config}: {path}"
            node = node[part]
        return f"deepspeed.overrides.{path}"

    _check_scalars(config, where)
    _check_optimizer(config.get("optimizer") or {}, where)
    _check_with_deepspeed(config, where)


def _check_scalars(config: dict, where: Callable[[str], str]) -> None:
    for key, types in _SCALAR_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (types is not _BOOL and isinstance(value, bool)):
            expected = "true or false" if types is _BOOL else "a number"
            raise ConfigError(f"{where(key)}: expected {expected}, got {type(value).__name__} {value!r}")


def _optimizer_classes(name: str, params: dict) -> list | None:
    """The classes DeepSpeed may build for optimizer.type `name`; [] when it is an optimizer whose
    arguments are not checked here; None when it is no optimizer at all."""
    lowered = name.lower()
    if lowered in ("adam", "adamw"):
        if params.get("torch_adam"):
            return [torch.optim.AdamW]
        return [FusedAdam, DeepSpeedCPUAdam]  # which one: the ZeRO offload decides
    if lowered == "lamb":
        return [FusedLamb]
    if lowered == "lion":
        return [FusedLion, DeepSpeedCPULion]
    if lowered == "adagrad":
        return [torch.optim.Adagrad, DeepSpeedCPUAdagrad]
    if lowered in DEEPSPEED_OPTIMIZERS:
        return []  # muon and the mup optimizers: arguments of their own
    found = getattr(torch.optim, name, None)  # DeepSpeed's fallback: any torch.optim class by its exact name
    return [found] if isinstance(found, type) and issubclass(found, torch.optim.Optimizer) else None


def _optimizer_names() -> list[str]:
    base = torch.optim.Optimizer
    torch_names = [name for name, cls in vars(torch.optim).items()
                   if isinstance(cls, type) and issubclass(cls, base) and cls is not base]
    return sorted(set(DEEPSPEED_OPTIMIZERS) | set(torch_names))


def _check_optimizer(optimizer: dict, where: Callable[[str], str]) -> None:
    name = optimizer.get("type")
    if name is None:
        return
    params = optimizer.get("params") or {}
    classes = _optimizer_classes(str(name), params) if isinstance(name, str) else None
    if classes is None:
        names = _optimizer_names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; DeepSpeed takes {', '.join(names)}"
        raise ConfigError(f"{where('optimizer.type')}: {name!r} is not an optimizer{hint}")
    if "max_grad_norm" in params:
        raise ConfigError(f"{where('optimizer.params.max_grad_norm')}: set optim.grad_clip in the recipe instead")
    signatures = [inspect.signature(c).parameters for c in classes]
    if not signatures or any(p.kind is p.VAR_KEYWORD for sig in signatures for p in sig.values()):
        return
    accepted = _DEEPSPEED_OPTIMIZER_KEYS | {n for sig in signatures for n in list(sig)[1:]}
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
            hint = (f"did you mean 'optimizer.params.{close[0]}'?" if close
                    else f"it takes {', '.join(sorted(accepted))}")
            raise ConfigError(f"{where('optimizer.params.' + key)}: not an argument of {classes[0].__name__}; {hint}")


def _paths(node: dict, prefix: str = ""):
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


def _check_with_deepspeed(config: dict, where: Callable[[str], str]) -> None:
    try:
        DeepSpeedConfig(config)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        path = next((p for p in _paths(config) if p == loc or p.endswith("." + loc)), f"{exc.title}.{loc}")
        got = f" (got {error['input']!r})" if error.get("type") != "missing" else ""
        raise ConfigError(f"{where(path)}: {error['msg']}{got}") from None
    except (ValueError, AssertionError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"deepspeed: DeepSpeed refuses the config (deepspeed.config with deepspeed.overrides): "
                          f"{first}") from None
