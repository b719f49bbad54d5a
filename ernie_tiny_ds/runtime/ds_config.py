"""The DeepSpeed JSON of a run: a bundled config or a file, its "auto" values filled from the recipe, and
the few deepspeed.overrides a recipe may set (everything else is refused with one line)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..assets.shipped import shipped
from ..config import DeepSpeedSection
from ..config.dotted import flatten
from ..errors import ConfigError
from .engine_settings import EngineSettings

DS_CONFIG_DIR = shipped("ds_configs")
# The bundled ZeRO JSONs keep DeepSpeed's recommended values (BENCHMARKS.md section 10):
# - overlap_comm true (ZeRO-2/3; DeepSpeed's default for ZeRO-3): the gradient reduction runs on a side
#   CUDA stream during the backward pass. DeepSpeed's CPU accelerator has no streams, so on a CPU nothing
#   overlaps, but nothing breaks either: two gloo ranks train to the same losses with it on or off.
# - stage3_param_persistence_threshold 1e5 (DeepSpeed's default): tensors under 100k elements (biases,
#   LayerNorms, the 312-wide student's projections) stay gathered on every rank, where 0 all-gathered
#   each of them at every use (many latency-bound collectives); their optimizer state stays partitioned.


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_ds_config(name_or_path: str) -> dict:
    """A bundled config by name (zero1, zero2, zero3, zero3_offload, …) or a JSON file."""
    path = Path(name_or_path)
    if not path.suffix and (DS_CONFIG_DIR / f"{name_or_path}.json").is_file():
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        bundled = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed.config: {name_or_path!r} is neither a file nor a bundled config "
                          f"({', '.join(bundled)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None


def fill_auto(node, values: dict, prefix: str = ""):
    """Replace "auto" leaves by the recipe's values (keys are dotted paths)."""
    if isinstance(node, dict):
        return {k: fill_auto(v, values, f"{prefix}{k}.") for k, v in node.items()}
    if node == "auto":
        key = prefix[:-1]
        if key not in values:
            raise ConfigError(f"deepspeed config: no recipe value for \"auto\" at {key}")
        return values[key]
    return node


# deepspeed.overrides may set only these (dotted; "x.*" = anything under x). Every other key is
# refused: some re-enable DeepSpeed loaders that unpickle with torch.load(weights_only=False)
# (checkpoint.load_universal, a checkpoint engine), others start jobs or write files of their own
# (autotuning, monitors, profilers), others fight the recipe (batch sizes). README lists this set.
ALLOWED_OVERRIDES = (
    "optimizer.type", "optimizer.params.*",
    "zero_optimization.*", "bf16.*", "fp16.*",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "communication_data_type", "seq_parallel_communication_data_type", "data_types.*",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing.*",
    "wall_clock_breakdown", "memory_breakdown", "steps_per_print",
)
# keys the recipe sets: an override would disagree with the data loader and the schedule
RECIPE_OWNED = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                "gradient_accumulation_steps": "train.grad_accum",
                "train_batch_size": "train.micro_batch_size and train.grad_accum"}
# DeepSpeed ignores a config's scheduler when the engine passes its own, as build_training_engine does
RECIPE_SCHEDULE = ("refused: the recipe sets the schedule (linear warm-up, then linear decay to 0 "
                   "at train.max_steps): set optim.lr and optim.warmup_ratio")
# never allowed, in a deepspeed.config file either: paths into DeepSpeed code that unpickles or runs jobs
PICKLE_LOADING = ("checkpoint", "load_universal_checkpoint", "nebula", "checkpoint_engine", "autotuning",
                  "elasticity", "data_efficiency", "curriculum_learning")


def _allowed(path: str) -> bool:
    return any(path == pattern or (pattern.endswith(".*") and path.startswith(pattern[:-1]))
               for pattern in ALLOWED_OVERRIDES)


def check_overrides(overrides: dict, config_source: dict | None = None, source: str = "deepspeed.config") -> None:
    """Refuse deepspeed.overrides outside ALLOWED_OVERRIDES, and pickle-loading keys anywhere."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"deepspeed.overrides: expected a mapping, got {type(overrides).__name__}")
    for path in flatten(overrides):
        top = path.split(".")[0]
        if top in PICKLE_LOADING:
            raise ConfigError(f"deepspeed.overrides.{path}: refused: it leads DeepSpeed to load checkpoints with "
                              f"pickle (code could run) or to start jobs of its own")
        if top in RECIPE_OWNED:
            raise ConfigError(f"deepspeed.overrides.{path}: set {RECIPE_OWNED[top]} in the recipe instead")
        if top == "scheduler":
            raise ConfigError(f"deepspeed.overrides.{path}: {RECIPE_SCHEDULE}")
        if not _allowed(path):
            raise ConfigError(f"deepspeed.overrides.{path}: not an override this tool allows; allowed: "
                              f"{', '.join(ALLOWED_OVERRIDES)}")
    for key in (config_source or {}):
        if key == "scheduler":
            raise ConfigError(f"{source}: key 'scheduler' {RECIPE_SCHEDULE}")
        if key in PICKLE_LOADING:
            raise ConfigError(f"{source}: key {key!r} refused: it leads DeepSpeed to load checkpoints with pickle "
                              f"(code could run) or to start jobs of its own")


def build_ds_config(deepspeed: DeepSpeedSection, settings: EngineSettings, world_size: int) -> dict:
    """The DeepSpeed JSON: the recipe's deepspeed.config with its overrides, its "auto" values filled
    from what the engine trains with."""
    s = settings
    base = read_ds_config(deepspeed.config)
    check_overrides(deepspeed.overrides, base, f"deepspeed.config {deepspeed.config}")
    raw = _deep_merge(base, deepspeed.overrides)
    auto = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "gradient_clipping": s.grad_clip,
        "optimizer.params.lr": s.lr,
        "optimizer.params.betas": list(s.betas),
        "optimizer.params.eps": s.eps,
        "optimizer.params.weight_decay": s.weight_decay,
        "bf16.enabled": s.precision == "bf16",
        "fp16.enabled": s.precision == "fp16",
    }
    config = fill_auto(raw, auto)
    config["train_batch_size"] = s.micro_batch_size * s.grad_accum * world_size
    if config.get("zero_optimization", {}).get("offload_optimizer"):
        # offloaded optimizer states are updated on the CPU; torch's AdamW avoids a JIT-compiled op
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    use_fused_torch_adam(config)
    return config


def use_fused_torch_adam(config: dict) -> None:
    """torch's AdamW in its fused form (one pass per tensor, CPU and CUDA) instead of the default
    for-each form: same update, about 3x less optimizer time per step on CPU (bench/step.py).
    A config that names "fused" or "foreach" itself keeps its choice."""
    optimizer = config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if (str(optimizer.get("type", "")).lower() in ("adam", "adamw") and params.get("torch_adam")
            and "fused" not in params and "foreach" not in params):
        params["fused"] = True


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
