"""The recipe's sections: one dataclass each. A field's bounds, path kind and resume-safety are its
metadata (config/rules.py); a rule that ties fields together is its section's `check()`."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..assets.shipped import shipped
from ..errors import ConfigError
from .rules import NON_NEGATIVE, POSITIVE, PathKind, SafeOn, setting, within

HUB, LOCAL = PathKind.HUB, PathKind.LOCAL
RATE_APPLIED = "applied: the scheduler's base rate is reset to it from this step on"
LENGTH_APPLIED = "applied: the warm-up/decay schedule now ends at the new step count"


class Section:
    def check(self) -> None:
        """Rules that tie this section's fields together; each field's own rules are its metadata."""


@dataclass
class TeacherConfig(Section):
    path: Optional[str] = setting(None, path=HUB)  # pretrained Hugging Face folder or Hub ID (stage 1)
    # teacher finetuned on the task (stages 2-4): folder or Hub ID
    finetuned_path: Optional[str] = setting(None, path=HUB)
    revision: Optional[str] = None        # Hub branch, tag or commit of teacher.path (default: main)
    finetuned_revision: Optional[str] = None  # the same for teacher.finetuned_path
    config: Optional[dict] = None         # inline model config, randomly initialised (tests)
    zero3: bool = False                   # shard the frozen teacher with a ZeRO-3 inference engine
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: train.precision
    trust_remote_code: bool = False

    def check(self) -> None:
        if self.path is None and self.config is None and self.finetuned_path is None:
            raise ConfigError("teacher: give teacher.path (a Hugging Face folder) or teacher.config (inline)")
        if self.path is not None and self.config is not None:
            raise ConfigError("teacher: give teacher.path or teacher.config, not both")


@dataclass
class StudentConfig(Section):
    # start from this Hugging Face folder (or Hub ID) instead of a fresh student
    path: Optional[str] = setting(None, path=HUB)
    revision: Optional[str] = None  # Hub branch, tag or commit of student.path
    # hidden/embedding projections to start from (a stage's projections.safetensors); unset: the one
    # beside student.path's folder
    projections: Optional[str] = setting(None, path=LOCAL)
    num_hidden_layers: int = setting(4, bounds=POSITIVE)
    hidden_size: int = setting(312, bounds=POSITIVE)
    num_attention_heads: int = setting(12, bounds=POSITIVE)
    intermediate_size: int = setting(1200, bounds=POSITIVE)

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"student.hidden_size ({self.hidden_size}) must be divisible by "
                              f"student.num_attention_heads ({self.num_attention_heads})")


SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
# a student's folder name under output_dir: never a stage's or the teacher's folder, never a path
STUDENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class StudentShape(Section):
    """One entry of `students:`: a name (its folder under output_dir) and the student section's shape
    keys; a key left out is `student:`'s."""
    name: Optional[str] = None
    num_hidden_layers: Optional[int] = setting(None, bounds=POSITIVE)
    hidden_size: Optional[int] = setting(None, bounds=POSITIVE)
    num_attention_heads: Optional[int] = setting(None, bounds=POSITIVE)
    intermediate_size: Optional[int] = setting(None, bounds=POSITIVE)

    def shaped(self, base: StudentConfig) -> StudentConfig:
        """`base` (the recipe's student section) with this entry's shape keys."""
        given = {key: getattr(self, key) for key in SHAPE_KEYS if getattr(self, key) is not None}
        return dataclasses.replace(base, **given)


@dataclass
class DataConfig(Section):
    corpus: Optional[str] = setting(None, path=LOCAL)  # file, folder or glob of the general corpus; default: bundled
    source: Literal["streaming", "shards"] = "streaming"  # shards: `ernie-tiny-ds preprocess` output
    format: Literal["auto", "text", "jsonl", "parquet", "datasets"] = "auto"
    text_field: str = "text"          # JSON-lines field / Parquet column / datasets column
    document_separator: Literal["line", "blank_line"] = "line"
    # folder or Hub ID; default: the teacher's, else the bundled tokenizer
    tokenizer: Optional[str] = setting(None, path=HUB)
    tokenizer_revision: Optional[str] = None  # Hub branch, tag or commit of data.tokenizer
    max_seq_len: int = setting(128, bounds=within(8, 8192))
    shuffle_buffer: int = setting(1024, bounds=POSITIVE)  # streaming: sequences per seeded shuffle window
    # streaming: full = fill sequences with whole sentences across documents ([SEP] between), document =
    # never mix documents. full is the default: the demo's general stages padded 0.8-0.9 % of positions
    # with it against 7.0-7.3 % with document, and its student kept as much of the teacher
    # (100.5 % vs 99.2 % of dev accuracy, a gap of 5 of 400 examples; BENCHMARKS.md §6)
    packing: Literal["document", "full"] = "full"
    # DataLoader worker processes per rank for the streaming corpus and the task's train batches (0: in
    # the training process); shards ignore it (the memory-mapped reader outruns worker IPC). auto: 0 on
    # CPU (the step already uses every core), 2 on CUDA, with pinned memory (data/workers.py)
    num_workers: Union[int, Literal["auto"]] = setting("auto", bounds=NON_NEGATIVE)
    on_binary_file: Literal["error", "skip"] = "error"
    dataset_split: str = "train"      # format=datasets: the split to stream


@dataclass
class TaskConfig(Section):
    name: Optional[str] = None        # a bundled task (sentiment, pair, similarity, coherence) or a free name
    train_file: Optional[str] = setting(None, path=LOCAL)
    # `ernie-tiny-ds augment` output: stages 3-4 train on it instead of train_file (finetuning, dev and
    # selection never read it)
    augmented_train_file: Optional[str] = setting(None, path=LOCAL)
    dev_file: Optional[str] = setting(None, path=LOCAL)
    test_file: Optional[str] = setting(None, path=LOCAL)  # `predict --split test` on files (labels optional)
    header: bool = True               # false: the files have no header row (GLUE's CoLA); columns are indices
    # a `datasets` dataset instead of files: a local save_to_disk folder, else a Hub name (load_dataset)
    dataset: Optional[str] = setting(None, path=HUB)
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
    # a fraction of train held out (seeded) to pick the best checkpoint on, so the dev score stays
    # honest; unset: the dev split picks
    selection_split: Optional[float] = setting(None, bounds=within(0, 1, low_open=True, high_open=True,
                                                                    noun="a fraction"))


@dataclass
class LossConfig(Section):
    # loss-term weights by registered name (distill/loss_terms.py: embedding, hidden, attention,
    # soft_label, hard_label, ...); a term not named keeps its default weight, 0 switches it off.
    # Which terms a stage trains on is the stage's own (stages.py).
    weights: dict[str, float] = field(default_factory=dict)
    attention_kind: Literal["kl", "mse"] = "kl"
    relation_heads: Optional[int] = setting(None, bounds=POSITIVE)  # MiniLMv2 re-split when head counts differ
    temperature: float = setting(1.0, bounds=POSITIVE)
    layer_map: Union[str, list[int]] = "uniform"  # uniform | last-k | [teacher layer per student layer]
    kernels: Literal["auto", "triton", "torch"] = "auto"
    # torch path: attention rows per chunk (memory O(L*chunk)); null: whole maps (~5% faster at L=512,
    # 2.6x the memory: BENCHMARKS 1)
    query_chunk: Optional[int] = setting(128, bounds=POSITIVE)
    carry_projections: bool = True          # start the projections from the previous stage's (as TinyBERT's
                                            # fit_dense lives across its stages); false: fresh every stage

    # keys of earlier recipes: each is refused with its new name, not as an unknown key (a plain class
    # attribute, not a field: no recipe key)
    RENAMED_KEYS = {f"{term}_weight": f"weights.{term}"
                    for term in ("hidden", "embedding", "attention", "soft_label", "hard_label")}

    def check(self) -> None:
        if isinstance(self.layer_map, str) and self.layer_map not in ("uniform", "last-k"):
            raise ConfigError(f"losses.layer_map: {self.layer_map!r} is not 'uniform', 'last-k' or a list of layers")
        for name, value in self.weights.items():
            NON_NEGATIVE.check(value, f"losses.weights.{name}")
        if self.weights:  # the registry imports torch: only when a recipe names a weight
            from ..distill.loss_terms import check_weight_names
            check_weight_names(self.weights)


@dataclass
class OptimConfig(Section):
    lr: float = setting(5e-5, bounds=POSITIVE, safe_on=SafeOn.RESUME, applied=RATE_APPLIED)
    weight_decay: float = setting(0.01, bounds=NON_NEGATIVE)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, bounds=POSITIVE)
    warmup_ratio: float = setting(0.1, bounds=within(0, 1, high_open=True))
    grad_clip: float = setting(1.0, bounds=NON_NEGATIVE)

    def check(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig(Section):
    max_steps: int = setting(1000, bounds=POSITIVE, safe_on=SafeOn.RESUME, applied=LENGTH_APPLIED)
    micro_batch_size: int = setting(32, bounds=POSITIVE)  # per rank
    grad_accum: int = setting(1, bounds=POSITIVE)
    # auto: bf16 on a CUDA device with native bf16 (Ampere and newer), else fp32 (CPU; older GPUs, where
    # fp16 would need loss scaling: ask for it); runtime/device_defaults.py
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42
    log_every: int = setting(10, bounds=POSITIVE, safe_on=SafeOn.RUN)
    save_every: int = setting(500, bounds=POSITIVE, safe_on=SafeOn.RUN)
    keep_checkpoints: int = setting(2, bounds=POSITIVE, safe_on=SafeOn.RUN)
    # collective timeout: a dead rank ends the job after this
    dist_timeout_s: int = setting(1800, bounds=POSITIVE, safe_on=SafeOn.RUN)
    # auto: NCCL on CUDA, gloo on CPU; gloo on CUDA lets ranks share one GPU (tensors go through the host)
    dist_backend: Literal["auto", "nccl", "gloo"] = setting("auto", safe_on=SafeOn.RUN)
    # consecutive NaN/inf steps before the run stops
    max_nonfinite_steps: int = setting(5, bounds=POSITIVE, safe_on=SafeOn.RUN)
    progress_bar: bool = setting(True, safe_on=SafeOn.RUN)
    # end this run (checkpointed) at this step: time-sliced jobs
    stop_at_step: Optional[int] = setting(None, bounds=POSITIVE, safe_on=SafeOn.RUN)
    # task_specific stage: score the student every N steps (and at the end) and export the best one to
    # OUT/task_specific/student_best; finetuning's default for finetune.eval_every
    eval_every: Optional[int] = setting(None, bounds=POSITIVE, safe_on=SafeOn.FINETUNE_RESUME, applied=(
        "applied to finetuning through finetune.eval_every; the best so far is kept"))
    # where rank 0 also logs each metrics.jsonl row and the final report (runtime/trackers.py);
    # OUT/<stage>/tensorboard is always written
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: Optional[str] = None  # W&B project / MLflow experiment; default: output_dir's name
    # the device's peak TFLOP/s for MFU in the log; unset: a table of known GPUs, else the measured
    # matmul rate (runtime/flops.py)
    peak_tflops: Optional[float] = setting(None, bounds=POSITIVE)


@dataclass
class FinetuneConfig(Section):
    """`finetune-teacher`: the pretrained teacher + a fresh task head, trained on the task's train split."""
    # passes over the train split; fractions allowed (steps rounded up)
    epochs: float = setting(3.0, bounds=POSITIVE, safe_on=SafeOn.FINETUNE_RESUME, applied=LENGTH_APPLIED)
    # peak rate: linear warm-up, then linear decay to 0
    lr: float = setting(5e-5, bounds=POSITIVE, safe_on=SafeOn.FINETUNE_RESUME, applied=RATE_APPLIED)
    micro_batch_size: int = setting(32, bounds=POSITIVE)  # per rank
    warmup_ratio: float = setting(0.1, bounds=within(0, 1, high_open=True))
    weight_decay: float = setting(0.01, bounds=NON_NEGATIVE)
    seed: int = 42                    # head initialisation, data order, dropout
    # score the teacher every N steps (and at the end); default train.eval_every
    eval_every: Optional[int] = setting(None, bounds=POSITIVE, safe_on=SafeOn.FINETUNE_RESUME, applied=(
        "applied: the teacher is scored at the new cadence; the best so far is kept"))
    # with eval_every: the teacher stages 2-4 distil from, best (by task.metric; the default) or last
    ship: Optional[Literal["best", "last"]] = setting(None, safe_on=SafeOn.FINETUNE_RESUME, applied=(
        "applied: it picks the teacher that stages 2-4 distil from"))


@dataclass
class AugmentConfig(Section):
    """`augment`: TinyBERT-style copies of the task's train file (workflows/augment.py)."""
    copies: int = setting(20, bounds=POSITIVE)  # augmented copies per train example (TinyBERT: 20)
    # chance that a word (a character in Chinese) is replaced
    replace_prob: float = setting(0.4, bounds=within(0, 1, low_open=True))
    top_k: int = setting(15, bounds=POSITIVE)  # the masked LM's candidates a replacement is drawn from
    # masked LM (folder or Hub ID) when teacher.path has no MLM head
    mlm_model: Optional[str] = setting(None, path=HUB)
    seed: Optional[int] = None        # unset: train.seed
    # masked sentences per MLM forward (does not change the output)
    batch_size: int = setting(64, bounds=POSITIVE)
    max_examples: Optional[int] = setting(None, bounds=POSITIVE)  # augment only the first N train examples


@dataclass
class ReleaseConfig(Section):
    """What an exported student carries besides its weights: a README.md model card, model.onnx,
    model.int8.onnx."""
    license: str = "apache-2.0"       # the card's license (the teacher's terms may bind the student)
    language: list[str] = field(default_factory=list)  # card metadata, e.g. [zh]
    model_name: Optional[str] = None  # the card's title; default: output_dir's name
    onnx: Union[bool, Literal["auto"]] = "auto"  # model.onnx + ONNX Runtime timings in the report;
                                      # auto: when the onnx extra (onnx, onnxruntime, onnxscript) is installed
    int8: bool = False                # + model.int8.onnx (dynamic int8), scored on dev and timed in the report

    def check(self) -> None:
        if self.int8 and self.onnx is False:  # the int8 graph is quantised from model.onnx
            raise ConfigError("release.int8: true needs model.onnx, but release.onnx is false: set release.onnx "
                              "to true or auto")
        if self.int8 or self.onnx is True:  # asked for outright: say so now, not after hours of training
            missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                key = "release.int8" if self.int8 else "release.onnx"
                raise ConfigError(f"{key}: true needs {', '.join(missing)}: pip install 'ernie-tiny-ds[onnx]'")


@dataclass
class DeepSpeedSection(Section):
    # a name in ds_configs/ (zero1, zero2, zero3, zero3_offload) or a JSON path
    config: str = setting("zero1", path=LOCAL)
    overrides: dict = field(default_factory=dict)  # merged into the JSON (nested keys)


def is_bundled_deepspeed_config(value: str) -> bool:
    """`value` names a JSON shipped in ds_configs/, not a path of the user's."""
    return Path(value).suffix == "" and (shipped("ds_configs") / f"{value}.json").is_file()
