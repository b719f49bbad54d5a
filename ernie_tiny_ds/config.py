"""Typed recipe: dataclasses loaded from YAML, `key.sub=value` overrides, validation with clear errors.

A recipe is one YAML file. Every section below is a dataclass; unknown keys, wrong types and
bad values raise ConfigError naming the key (and the closest valid key for a typo).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from . import recipe_paths, recipe_yaml
from .errors import ConfigError
from .stages import STAGE_SPECS, STAGES  # the stage names, defined once beside what each stage is


@dataclass
class TeacherConfig:
    path: Optional[str] = None            # pretrained Hugging Face folder or Hub ID (stage 1)
    finetuned_path: Optional[str] = None  # teacher finetuned on the task (stages 2-4): folder or Hub ID
    revision: Optional[str] = None        # Hub branch, tag or commit of teacher.path (default: main)
    finetuned_revision: Optional[str] = None  # the same for teacher.finetuned_path
    config: Optional[dict] = None         # inline model config, randomly initialised (tests)
    zero3: bool = False                   # shard the frozen teacher with a ZeRO-3 inference engine
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: train.precision
    trust_remote_code: bool = False


@dataclass
class StudentConfig:
    path: Optional[str] = None  # start from this Hugging Face folder (or Hub ID) instead of a fresh student
    revision: Optional[str] = None  # Hub branch, tag or commit of student.path
    projections: Optional[str] = None  # hidden/embedding projections to start from (a stage's
                                       # projections.safetensors); unset: the one beside student.path's folder
    num_hidden_layers: int = 4
    hidden_size: int = 312
    num_attention_heads: int = 12
    intermediate_size: int = 1200


@dataclass
class DataConfig:
    corpus: Optional[str] = None      # file, folder or glob of the general corpus; default: bundled
    source: Literal["streaming", "shards"] = "streaming"  # shards: `ernie-tiny-ds preprocess` output
    format: Literal["auto", "text", "jsonl", "parquet", "datasets"] = "auto"
    text_field: str = "text"          # JSON-lines field / Parquet column / datasets column
    document_separator: Literal["line", "blank_line"] = "line"
    tokenizer: Optional[str] = None   # folder or Hub ID; default: the teacher's, else the bundled tokenizer
    tokenizer_revision: Optional[str] = None  # Hub branch, tag or commit of data.tokenizer
    max_seq_len: int = 128
    shuffle_buffer: int = 1024        # streaming: sequences per seeded shuffle window
    packing: Literal["document", "full"] = "document"  # streaming: full = fill sequences across documents
    num_workers: int = 0              # streaming: DataLoader worker processes per rank (0: in the training
                                      # process); shards ignore it (the memory-mapped reader outruns worker IPC)
    on_binary_file: Literal["error", "skip"] = "error"
    dataset_split: str = "train"      # format=datasets: the split to stream


@dataclass
class TaskConfig:
    name: Optional[str] = None        # a bundled task (sentiment, pair, similarity, coherence) or a free name
    train_file: Optional[str] = None
    # `ernie-tiny-ds augment` output: stages 3-4 train on it instead of train_file (finetuning, dev and
    # selection never read it)
    augmented_train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None   # `predict --split test` on files (labels optional)
    header: bool = True               # false: the files have no header row (GLUE's CoLA); columns are indices
    # a `datasets` dataset instead of files: a local save_to_disk folder, else a Hub name (load_dataset)
    dataset: Optional[str] = None
    subset: Optional[str] = None      # the dataset's configuration (glue: cola, mnli, ...)
    train_split: str = "train"
    dev_split: Union[str, list[str]] = "validation"  # several: each is scored (mnli: matched, mismatched)
    test_split: Union[str, list[str]] = "test"       # what `predict` writes by default
    # columns by name, or by 0-based index when header is false; [] with a dataset: its string features
    text_columns: list[Union[str, int]] = field(default_factory=list)  # one (single sentence) or two (pair)
    label_column: Union[str, int] = "label"
    labels: list[str] = field(default_factory=list)        # class names in id order; [] = the train file's, sorted
    type: Literal["classification", "regression"] = "classification"
    max_seq_len: int = 128
    # the metric that ranks models (report's `retained`); unset: the official one of a GLUE/CLUE task
    # name (cola: mcc, mrpc/qqp: acc_f1, stsb: pearson_spearman, ...), else accuracy / pearson
    metric: Optional[Literal["accuracy", "f1", "mcc", "acc_f1", "pearson", "spearman", "pearson_spearman"]] = None
    # stage 4 with train.eval_every: which student the pipeline ships (and the report scores as "the
    # student"): best (by the main metric; the default with eval_every) or last
    ship: Optional[Literal["best", "last"]] = None
    selection_split: Optional[float] = None  # a fraction of train held out (seeded) to pick the best checkpoint
                                             # on, so the dev score stays honest; unset: the dev split picks


@dataclass
class LossConfig:
    hidden_weight: float = 1.0
    embedding_weight: float = 1.0
    attention_weight: float = 1.0
    attention_kind: Literal["kl", "mse"] = "kl"
    relation_heads: Optional[int] = None    # MiniLMv2 re-split when head counts differ
    soft_label_weight: float = 1.0          # task_specific stage only
    hard_label_weight: float = 1.0          # task_specific stage only
    temperature: float = 1.0
    layer_map: Union[str, list[int]] = "uniform"  # uniform | last-k | [teacher layer per student layer]
    kernels: Literal["auto", "triton", "torch"] = "auto"
    query_chunk: Optional[int] = 128        # torch path: attention rows per chunk (memory O(L*chunk)); null:
                                            # whole maps (~5% faster at L=512, 2.6x the memory: BENCHMARKS 1)
    carry_projections: bool = True          # start the projections from the previous stage's (as TinyBERT's
                                            # fit_dense lives across its stages); false: fresh every stage


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 32        # per rank
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 42
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    dist_timeout_s: int = 1800        # collective timeout: a dead rank ends the job after this
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, gloo on CPU;
                                      # gloo on CUDA lets ranks share one GPU (tensors go through the host)
    max_nonfinite_steps: int = 5      # consecutive NaN/inf steps before the run stops
    progress_bar: bool = True
    stop_at_step: Optional[int] = None  # end this run (checkpointed) at this step: time-sliced jobs
    eval_every: Optional[int] = None  # task_specific stage: score the student every N steps (and at the end)
                                      # and export the best one to OUT/task_specific/student_best
    # where rank 0 also logs each metrics.jsonl row and the final report (runtime/trackers.py);
    # OUT/<stage>/tensorboard is always written
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: Optional[str] = None  # W&B project / MLflow experiment; default: output_dir's name
    peak_tflops: Optional[float] = None  # the device's peak TFLOP/s for MFU in the log; unset: a table of
                                      # known GPUs, else the measured matmul rate (runtime/flops.py)


@dataclass
class FinetuneConfig:
    """`finetune-teacher`: the pretrained teacher + a fresh task head, trained on the task's train split."""
    epochs: float = 3.0               # passes over the train split; fractions allowed (steps rounded up)
    lr: float = 5e-5                  # peak rate: linear warm-up, then linear decay to 0
    micro_batch_size: int = 32        # per rank
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42                    # head initialisation, data order, dropout
    eval_every: Optional[int] = None  # score the teacher every N steps (and at the end); default train.eval_every
    # with eval_every: the teacher stages 2-4 distil from, best (by task.metric; the default) or last
    ship: Optional[Literal["best", "last"]] = None


@dataclass
class AugmentConfig:
    """`augment`: TinyBERT-style copies of the task's train file (workflows/augment.py)."""
    copies: int = 20                  # augmented copies per train example (TinyBERT: 20)
    replace_prob: float = 0.4         # chance that a word (a character in Chinese) is replaced
    top_k: int = 15                   # the masked LM's candidates a replacement is drawn from
    mlm_model: Optional[str] = None   # masked LM (folder or Hub ID) when teacher.path has no MLM head
    seed: Optional[int] = None        # unset: train.seed
    batch_size: int = 64              # masked sentences per MLM forward (does not change the output)
    max_examples: Optional[int] = None  # augment only the first N train examples


@dataclass
class ReleaseConfig:
    """What an exported student carries besides its weights: a README.md model card, model.onnx,
    model.int8.onnx."""
    license: str = "apache-2.0"       # the card's license (the teacher's terms may bind the student)
    language: list[str] = field(default_factory=list)  # card metadata, e.g. [zh]
    model_name: Optional[str] = None  # the card's title; default: output_dir's name
    onnx: Union[bool, Literal["auto"]] = "auto"  # model.onnx + ONNX Runtime timings in the report;
                                      # auto: when the onnx extra (onnx, onnxruntime, onnxscript) is installed
    int8: bool = False                # + model.int8.onnx (dynamic int8), scored on dev and timed in the report

    def __post_init__(self):
        if self.int8 and self.onnx is False:  # the int8 graph is quantised from model.onnx
            raise ConfigError("release.int8: true needs model.onnx, but release.onnx is false: set release.onnx "
                              "to true or auto")
        if self.int8 or self.onnx is True:  # asked for outright: say so now, not after hours of training
            import importlib.util
            missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                key = "release.int8" if self.int8 else "release.onnx"
                raise ConfigError(f"{key}: true needs {', '.join(missing)}: pip install 'ernie-tiny-ds[onnx]'")


@dataclass
class DeepSpeedSection:
    config: str = "zero1"             # a name in ds_configs/ (zero1, zero2, zero3, zero3_offload) or a JSON path
    overrides: dict = field(default_factory=dict)  # merged into the JSON (nested keys)


STAGE_SECTIONS = ("train", "optim", "losses", "data")  # what stages.<name> may override


@dataclass
class StageOverride:
    train: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


@dataclass
class Recipe:
    output_dir: str = "runs/ernie-tiny"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stages: dict[str, StageOverride] = field(default_factory=dict)
    # set by load_recipe, not a recipe key: the command-line overrides of the sections a stage can
    # override, so that for_stage lets them win over the recipe file's stages.<name> too
    command_line: list[str] = field(default_factory=list)

    def for_stage(self, stage: str) -> "Recipe":
        """This recipe with the stage's overrides applied (validated like the rest).

        Precedence, lowest first: the recipe's sections, its stages.<stage>, the command line's
        section keys (train.max_steps=20 shortens every stage), the command line's stages.<stage>."""
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
        merged = to_dict(self)
        override = self.stages.get(stage)
        if override is not None:
            for section in STAGE_SECTIONS:
                merged[section].update(getattr(override, section))
        general, this_stage = [], []
        for text in self.command_line:
            path, _ = parse_override(text)
            if path[0] in STAGE_SECTIONS:
                general.append(text)
            elif path[:2] == ["stages", stage] and len(path) > 3:
                this_stage.append(text.split(".", 2)[2])  # stages.<stage>.train.x=v -> train.x=v
        merged = apply_overrides(merged, general + this_stage)
        merged["stages"] = {}
        out = from_dict(merged, source=f"stages.{stage}")
        if STAGE_SPECS[stage].data == "general":  # the commands that never read the corpus never check its length
            check_positions(out, [("data.max_seq_len", out.data.max_seq_len)])
        out.stages = self.stages
        out.command_line = self.command_line
        return out


# --------------------------------------------------------------------------- (de)serialisation
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return copy.deepcopy(obj)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, expected: str, value: Any, typed: bool = True) -> ConfigError:
    got = f"{type(value).__name__} {value!r}" if typed else repr(value)
    return ConfigError(f"{key}: expected {expected}, got {got}")


def _checked(ok: bool, key: str, expected: str, value: Any, typed: bool = True) -> Any:
    """`value` when `ok`, else the error naming the key, what it expects and what it got."""
    if not ok:
        raise _mismatch(key, expected, value, typed)
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, _checked(isinstance(value, dict), key, "a mapping", value), key)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise _mismatch(key, _type_name(tp), value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        _checked(isinstance(value, list), key, _type_name(tp), value)
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _checked(isinstance(value, dict), key, "a mapping", value)
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[1]):
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return value
    if tp is type(None):
        if value is not None:
            raise _mismatch(key, "null", value, typed=False)
        return None
    if tp is bool:
        return _checked(isinstance(value, bool), key, "true or false", value, typed=False)
    if tp is int:
        return _checked(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _checked(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = (f"; did you mean '{(key + '.' if key else '') + close[0]}'?" if close
            else f"; valid keys: {', '.join(valid)}")
    return ConfigError(f"unknown key '{(key + '.' if key else '') + name}'{hint}")


def _build(cls: type, values: dict, key: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise _unknown_key(key, str(name), names)
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def load_section(cls: type, values: dict, key: str) -> Any:
    """One recipe section (e.g. TaskConfig) from a mapping, with the recipe's key-naming errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(values).__name__} {values!r}")
    return _build(cls, values, key)


def from_dict(values: dict, source: str = "recipe") -> Recipe:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(values).__name__}")
    recipe = _build(Recipe, values, "")
    validate(recipe)
    return recipe


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = recipe_yaml.load(raw, lambda _line: f"override {text!r}") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when path is None) and apply overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        bundled = Path(__file__).resolve().parent / "recipes" / f"{path}.yaml"
        by_name = not p.is_file() and p.suffix == "" and bundled.is_file()
        if by_name:
            p = bundled  # a bundled recipe by name: `--config demo`
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        try:
            values = recipe_yaml.load(p.read_text(encoding="utf-8"), lambda line: f"{p}:{line}") or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of sections")
        if not by_name:  # a bundled recipe lives in the package, not in a folder of the user's
            values = recipe_paths.anchor(values, p.parent.resolve())
    values = apply_overrides(values, overrides or [])
    if "command_line" in values:  # from the file or the command line
        raise ConfigError("unknown key 'command_line': it is not a recipe setting")
    recipe = from_dict(values, source=str(path or "overrides"))
    recipe.command_line = list(overrides or [])  # for_stage picks the ones a stage can override
    return recipe


# --------------------------------------------------------------------------- validation
def _positive(value: float | int, key: str) -> None:
    if not value > 0:  # `not >` also refuses NaN, which every comparison answers False
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(value: float | int, key: str) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def _check_finite(obj: Any, key: str = "") -> None:
    """Every float in the recipe must be finite: NaN passes every `<`/`==` range check, and YAML
    reads .nan/.inf (and the strings nan/inf) as floats, so check them all here, naming the key."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _check_finite(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{key} must be a finite number, got {obj}")


def _check_paths_not_empty(r: Recipe) -> None:
    for section, key in recipe_paths.PATH_KEYS:
        value = getattr(getattr(r, section) if section else r, key)
        if isinstance(value, str) and not value.strip():
            name = f"{section}.{key}" if section else key
            hub = " or a Hub ID" if (section, key) in recipe_paths.HUB_KEYS else ""
            raise ConfigError(f"{name} is empty: give a path{hub}, or leave the key out")


def _usable_positions(config: Any) -> Optional[int]:
    """The longest sequence a model config takes: max_position_embeddings, less RoBERTa's offset
    (its position ids start after the padding id). None when the config does not say."""
    if not isinstance(config, dict):
        return None
    positions = config.get("max_position_embeddings", 512)  # the BERT-family default
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        pad = config.get("pad_token_id", 1)
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def _folder_config(path: Optional[str]) -> Optional[dict]:
    """config.json of a local model folder; None for a Hub ID or an unreadable file (the loader reports
    those, naming the key, when it opens the model)."""
    if not path:
        return None
    try:
        return json.loads((Path(os.path.expanduser(path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_positions(r: Recipe, lengths: list[tuple[str, int]]) -> None:
    """Sequence lengths within the positions of every model whose config can be read now, so a
    mistake stops before any work and not at the first forward of a long job."""
    models = [("teacher.config", r.teacher.config), ("teacher.path", _folder_config(r.teacher.path)),
              ("teacher.finetuned_path", _folder_config(r.teacher.finetuned_path)),
              ("student.path", _folder_config(r.student.path))]
    for model_key, config in models:
        limit = _usable_positions(config)
        for length_key, length in lengths:
            if limit is not None and length > limit:
                raise ConfigError(f"{length_key} ({length}) is longer than the {limit} positions of {model_key}'s "
                                  f"model (max_position_embeddings); set {length_key} to at most {limit}")


def validate(r: Recipe) -> None:
    """Range and consistency checks that types alone do not catch. Files are checked where used."""
    _check_finite(r)
    _check_paths_not_empty(r)
    if r.teacher.path is None and r.teacher.config is None and r.teacher.finetuned_path is None:
        raise ConfigError("teacher: give teacher.path (a Hugging Face folder) or teacher.config (inline)")
    if r.teacher.path is not None and r.teacher.config is not None:
        raise ConfigError("teacher: give teacher.path or teacher.config, not both")
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        _positive(getattr(r.student, name), f"student.{name}")
    if r.student.hidden_size % r.student.num_attention_heads:
        raise ConfigError(f"student.hidden_size ({r.student.hidden_size}) must be divisible by "
                          f"student.num_attention_heads ({r.student.num_attention_heads})")
    if not 8 <= r.data.max_seq_len <= 8192:
        raise ConfigError(f"data.max_seq_len must be in 8..8192, got {r.data.max_seq_len}")
    _positive(r.data.shuffle_buffer, "data.shuffle_buffer")
    _non_negative(r.data.num_workers, "data.num_workers")
    for name in ("hidden_weight", "embedding_weight", "attention_weight", "soft_label_weight", "hard_label_weight"):
        _non_negative(getattr(r.losses, name), f"losses.{name}")
    _positive(r.losses.temperature, "losses.temperature")
    if r.losses.relation_heads is not None:
        _positive(r.losses.relation_heads, "losses.relation_heads")
    if r.losses.query_chunk is not None:
        _positive(r.losses.query_chunk, "losses.query_chunk")
    if isinstance(r.losses.layer_map, str) and r.losses.layer_map not in ("uniform", "last-k"):
        raise ConfigError(f"losses.layer_map: {r.losses.layer_map!r} is not 'uniform', 'last-k' or a list of layers")
    _positive(r.optim.lr, "optim.lr")
    _non_negative(r.optim.weight_decay, "optim.weight_decay")
    _positive(r.optim.eps, "optim.eps")
    if len(r.optim.betas) != 2 or not all(0 <= b < 1 for b in r.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {r.optim.betas}")
    if not 0 <= r.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {r.optim.warmup_ratio}")
    _non_negative(r.optim.grad_clip, "optim.grad_clip")
    for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints",
                 "dist_timeout_s", "max_nonfinite_steps"):
        _positive(getattr(r.train, name), f"train.{name}")
    if r.train.stop_at_step is not None:
        _positive(r.train.stop_at_step, "train.stop_at_step")
    if r.train.eval_every is not None:
        _positive(r.train.eval_every, "train.eval_every")
    if r.task.selection_split is not None and not 0 < r.task.selection_split < 1:
        raise ConfigError(f"task.selection_split must be a fraction in (0, 1), got {r.task.selection_split}")
    if r.train.peak_tflops is not None:
        _positive(r.train.peak_tflops, "train.peak_tflops")
    _positive(r.finetune.epochs, "finetune.epochs")
    _positive(r.finetune.lr, "finetune.lr")
    _positive(r.finetune.micro_batch_size, "finetune.micro_batch_size")
    if not 0 <= r.finetune.warmup_ratio < 1:
        raise ConfigError(f"finetune.warmup_ratio must be in [0, 1), got {r.finetune.warmup_ratio}")
    _non_negative(r.finetune.weight_decay, "finetune.weight_decay")
    for name in ("copies", "top_k", "batch_size"):
        _positive(getattr(r.augment, name), f"augment.{name}")
    if not 0 < r.augment.replace_prob <= 1:
        raise ConfigError(f"augment.replace_prob must be in (0, 1], got {r.augment.replace_prob}")
    if r.augment.max_examples is not None:
        _positive(r.augment.max_examples, "augment.max_examples")
    for stage in r.stages:
        if stage not in STAGES:
            close = difflib.get_close_matches(stage, STAGES, n=1)
            hint = f"; did you mean 'stages.{close[0]}'?" if close else f"; stages are {', '.join(STAGES)}"
            raise ConfigError(f"unknown key 'stages.{stage}'{hint}")
    if r.task.name or r.task.train_file or r.task.dataset:  # no task: task.max_seq_len is never used
        check_positions(r, [("task.max_seq_len", r.task.max_seq_len)])
    if r.deepspeed.overrides or not recipe_paths.is_bundled_deepspeed_config(r.deepspeed.config):
        from .runtime.ds_validation import check_ds_config  # imports DeepSpeed: only when there is something to check
        check_ds_config(r)
    # stage overrides must themselves form a valid recipe
    for stage in r.stages:
        r.for_stage(stage)
