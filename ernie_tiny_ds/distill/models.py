"""Build teacher and student, and capture their hidden states and attention Q/K with forward hooks.

Both models run their normal SDPA attention: attention transfer is computed later from the
captured Q and K, so no model ever materialises attention maps (never `output_attentions`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import StudentConfig, TeacherConfig
from ..data.hub import resolve as resolve_hub
from ..errors import ConfigError, UserError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "ernie", "xlm-roberta")


def _check_model_type(config: PretrainedConfig, where: str) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{where}: model type '{config.model_type}' is not supported; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (BERT-style encoders)")


def _check_hf_folder(path: str, key: str) -> None:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: folder not found: {path}")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json (expected a Hugging Face model folder)")


def _load_errors() -> tuple:
    """What a damaged model folder raises while loading: a truncated or corrupt safetensors file
    (SafetensorError), a missing shard (OSError), bad JSON (ValueError), weights that do not fit
    the config (RuntimeError)."""
    from safetensors import SafetensorError
    return (SafetensorError, OSError, ValueError, RuntimeError)


def _cannot_load(key: str, path: str, what: str, exc: BaseException) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"{key}: cannot load the {what} in {path}: {first} (a truncated or damaged file? copy "
                     f"the model folder again)")


def _from_pretrained(auto_class, path: str, key: str, **kwargs) -> PreTrainedModel:
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except _load_errors() as exc:
        raise _cannot_load(key, path, "weights", exc) from None


def load_config(path: str, key: str, trust_remote_code: bool = False) -> PretrainedConfig:
    _check_hf_folder(path, key)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except _load_errors() as exc:
        raise _cannot_load(key, path, "config.json", exc) from None
    _check_model_type(config, key)
    return config


def inline_config(values: dict, key: str = "teacher.config") -> PretrainedConfig:
    values = dict(values)
    model_type = values.pop("model_type", "bert")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    _check_model_type(config, key)
    return config


def base_model(model: nn.Module) -> nn.Module:
    """The encoder body (BertModel & co.) of a model with or without a task head."""
    body = getattr(model, "base_model", model)
    if not (hasattr(body, "embeddings") and hasattr(body, "encoder") and hasattr(body.encoder, "layer")):
        raise UserError(f"{type(model).__name__} has no embeddings/encoder.layer: not a BERT-style encoder")
    return body


# --------------------------------------------------------------------------- teacher
def load_teacher(cfg: TeacherConfig, finetuned: bool, seed: int) -> PreTrainedModel:
    """The frozen teacher: pretrained encoder (stage 1) or the task-finetuned classifier (stages 2-4)."""
    common = dict(attn_implementation="sdpa", trust_remote_code=cfg.trust_remote_code)
    # a Hub ID becomes its snapshot folder in the Hub cache; a folder stays as it is
    cfg = copy.copy(cfg)
    if finetuned:
        cfg.finetuned_path = resolve_hub(cfg.finetuned_path, "teacher.finetuned_path", cfg.finetuned_revision)
        if cfg.finetuned_path is None:
            raise ConfigError("teacher.finetuned_path: this stage needs a teacher finetuned on the task "
                              "(run `ernie-tiny-ds finetune-teacher` or set teacher.finetuned_path)")
        load_config(cfg.finetuned_path, "teacher.finetuned_path", cfg.trust_remote_code)
        model = _from_pretrained(transformers.AutoModelForSequenceClassification, cfg.finetuned_path,
                                 "teacher.finetuned_path", **common)
    elif cfg.path is not None:
        cfg.path = resolve_hub(cfg.path, "teacher.path", cfg.revision)
        load_config(cfg.path, "teacher.path", cfg.trust_remote_code)
        model = _from_pretrained(transformers.AutoModel, cfg.path, "teacher.path", **common)
    else:
        config = inline_config(cfg.config or {})
        torch.manual_seed(seed)  # every rank builds the same random teacher
        model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    return model


def encoder_up_to(model: nn.Module, deepest_layer: int) -> nn.Module:
    """The teacher as a stage without logits runs it: the encoder body alone (no pooler, no task or
    MLM head) and only its layers 1..deepest_layer, since nothing above the deepest mapped layer is
    read. Features of the kept layers are exactly the full model's (each layer sees only the ones below)."""
    body = base_model(model)
    layers = body.encoder.layer
    if not 1 <= deepest_layer <= len(layers):
        raise ConfigError(f"layer {deepest_layer} is outside the teacher's layers 1..{len(layers)}")
    body.encoder.layer = layers[:deepest_layer]
    if getattr(body, "pooler", None) is not None:
        body.pooler = None
    return body


# --------------------------------------------------------------------------- student attention
FUSED_HEAD_MULTIPLE = 8  # SDPA's memory-efficient and cuDNN kernels need head dims that are a multiple of 8
STUDENT_ATTENTION = "sdpa_fused_head"  # the student's attention function in transformers' AttentionInterface


def padded_head_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """SDPA with the head dim zero-padded up to a multiple of 8, the output sliced back.

    Zero columns add nothing to q.k nor to the weighted sum of v, so the result is the plain one as long
    as the softmax scale stays 1/sqrt(unpadded head dim): it is passed explicitly for that reason."""
    head = query.shape[-1]
    extra = -head % FUSED_HEAD_MULTIPLE
    if scaling is None:
        scaling = head ** -0.5
    if extra == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    padded = [F.pad(t, (0, extra)) for t in (query, key, value)]
    output, weights = sdpa_attention_forward(module, *padded, attention_mask, scaling=scaling, **kwargs)
    return output[..., :head], weights  # [B, L, H, padded head]: the caller reshapes (and copies) it


def pads_heads_on(device: torch.device) -> bool:
    """Only CUDA's fused kernels need the padding; the CPU's SDPA takes any head dim, and padding 26 to 32
    made its attention slower there (BENCHMARKS §4, bench/student_attention.py)."""
    return device.type == "cuda"


def student_sdpa(module: nn.Module, query: torch.Tensor, *args, **kwargs):
    """The student's attention: SDPA, with padded heads where a fused kernel needs them."""
    if pads_heads_on(query.device):
        return padded_head_sdpa(module, query, *args, **kwargs)
    return sdpa_attention_forward(module, query, *args, **kwargs)


# Registered by name: the name lives on the in-memory config only (save_pretrained does not write it), so
# saved and exported students stay plain models that load with attn_implementation="sdpa" anywhere.
# The mask needs its own entry: transformers builds no mask at all for a name it has no mask function for,
# and the student would attend to padding.
AttentionInterface.register(STUDENT_ATTENTION, student_sdpa)
AttentionMaskInterface.register(STUDENT_ATTENTION, sdpa_mask)


def use_student_attention(model: PreTrainedModel) -> PreTrainedModel:
    model.set_attn_implementation(STUDENT_ATTENTION)
    return model


# --------------------------------------------------------------------------- student
def student_config_from(cfg: StudentConfig, teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The student's config: the teacher's (same vocabulary, type, positions) with student sizes."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = cfg.num_hidden_layers
    config.hidden_size = cfg.hidden_size
    config.num_attention_heads = cfg.num_attention_heads
    config.intermediate_size = cfg.intermediate_size
    config.architectures = None
    for key in ("id2label", "label2id"):
        if hasattr(config, key):
            setattr(config, key, {0: "LABEL_0", 1: "LABEL_1"} if key == "id2label" else {"LABEL_0": 0, "LABEL_1": 1})
    return config


def keep_task_labels(config: PretrainedConfig, teacher_config: PretrainedConfig) -> None:
    """A task student answers in the finetuned teacher's class names and order."""
    if getattr(teacher_config, "num_labels", None) == config.num_labels:
        config.id2label = dict(teacher_config.id2label)
        config.label2id = dict(teacher_config.label2id)
        config.problem_type = getattr(teacher_config, "problem_type", None)


def build_student(cfg: StudentConfig, teacher_config: PretrainedConfig, seed: int,
                  num_labels: int | None = None) -> PreTrainedModel:
    """Fresh (seeded, identical on every rank) or loaded student; with a task head when num_labels is set.
    Its attention runs student_sdpa (fused GPU kernels for any head dim); weights and config stay plain."""
    return use_student_attention(_new_or_loaded_student(cfg, teacher_config, seed, num_labels))


def _new_or_loaded_student(cfg: StudentConfig, teacher_config: PretrainedConfig, seed: int,
                           num_labels: int | None) -> PreTrainedModel:
    common = dict(attn_implementation="sdpa")
    if cfg.path is not None:
        cfg = copy.copy(cfg)
        cfg.path = resolve_hub(cfg.path, "student.path", cfg.revision)
        config = load_config(cfg.path, "student.path")
        if config.vocab_size != teacher_config.vocab_size:
            raise ConfigError(f"student.path: student vocabulary ({config.vocab_size}) differs from the "
                              f"teacher's ({teacher_config.vocab_size}); both must share one tokenizer")
        if num_labels is None:
            return _from_pretrained(transformers.AutoModel, cfg.path, "student.path", **common)
        config.num_labels = num_labels
        keep_task_labels(config, teacher_config)
        return _from_pretrained(transformers.AutoModelForSequenceClassification, cfg.path, "student.path",
                                config=config, **common)
    config = student_config_from(cfg, teacher_config)
    torch.manual_seed(seed)
    if num_labels is None:
        return transformers.AutoModel.from_config(config, **common)
    config.num_labels = num_labels
    keep_task_labels(config, teacher_config)
    return transformers.AutoModelForSequenceClassification.from_config(config, **common)


def count_parameters(model: nn.Module) -> int:
    """Full parameter count, also for ZeRO-3 partitioned parameters (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def weights_fingerprint(model: nn.Module) -> float:
    """Sum of |w| over the encoder body (task heads left out): equal weights give an equal number,
    so a stage can prove which student it started from. Call it before ZeRO-3 partitions the model."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in base_model(model).parameters()))


# --------------------------------------------------------------------------- capture hooks
@dataclass
class Features:
    """What one forward pass exposed: hidden[0] is the embedding output, hidden[i] layer i's output;
    q[i], k[i] are layer i's attention query/key as [B, H, L, d]."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)


class FeatureCapture:
    """Forward hooks on an encoder's embeddings, layers and query/key projections.

    ``layers`` are 1-based layer numbers to capture (None = all); the embedding output is always kept.
    The hooks keep features only inside ``with capture.recording() as features:``; a forward outside
    one (an evaluation, an export probe) keeps nothing, so no step's activations outlive it.
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None):
        body = base_model(model)
        self.num_layers = len(body.encoder.layer)
        self.layers = sorted(set(layers)) if layers is not None else list(range(1, self.num_layers + 1))
        self._features: Features | None = None  # the store of the open recording()
        self._handles = [body.embeddings.register_forward_hook(self._keep_hidden(0))]
        for i in self.layers:
            if not 1 <= i <= self.num_layers:
                raise ConfigError(f"layer {i} is outside the model's layers 1..{self.num_layers}")
            layer = body.encoder.layer[i - 1]
            attention = getattr(getattr(layer, "attention", None), "self", None)
            if attention is None or not hasattr(attention, "query") or not hasattr(attention, "key"):
                raise UserError(f"{type(model).__name__} layer {i} has no attention.self.query/key projections")
            heads = getattr(attention, "num_attention_heads", None) or attention.config.num_attention_heads
            self._handles.append(layer.register_forward_hook(self._keep_hidden(i)))
            self._handles.append(attention.query.register_forward_hook(self._keep_heads("q", i, heads)))
            self._handles.append(attention.key.register_forward_hook(self._keep_heads("k", i, heads)))

    @contextlib.contextmanager
    def recording(self) -> Iterator[Features]:
        """The features of the forward passes run inside the block; the capture lets go of them when
        the block ends (its caller alone holds them then)."""
        self._features = Features()
        try:
            yield self._features
        finally:
            self._features = None

    # The hooks look up self._features when they fire: None outside recording().
    def _keep_hidden(self, index: int):
        def hook(_module, _inputs, output):
            if self._features is not None:
                self._features.hidden[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def _keep_heads(self, which: str, index: int, heads: int):
        def hook(_module, _inputs, output):
            if self._features is not None:
                b, l, width = output.shape
                getattr(self._features, which)[index] = output.view(b, l, heads, width // heads).transpose(1, 2)
        return hook
