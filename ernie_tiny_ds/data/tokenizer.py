"""Load the Hugging Face fast tokenizer shared by teacher and student, and check that it is real."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import ConfigError


def recipe_tokenizer_path(recipe, use_finetuned_teacher: bool = True) -> str:
    """The recipe's tokenizer, else the teacher's own (pretrained, then finetuned when allowed),
    else (inline test teachers) the bundled one."""
    teachers = [recipe.teacher.path] + ([recipe.teacher.finetuned_path] if use_finetuned_teacher else [])
    for candidate in (recipe.data.tokenizer, *teachers):
        if candidate:
            return candidate
    from ..assets import DEFAULT_TOKENIZER
    return str(DEFAULT_TOKENIZER)


_PROBE = "The quick brown fox jumps over the lazy dog near the river bank."


def load_tokenizer(path: str, key: str = "data.tokenizer") -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: tokenizer folder not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"{key}: {path} gave a slow tokenizer; a fast (tokenizer.json) one is required")
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ConfigError(f"{key}: the tokenizer in {path} maps plain English to [UNK] only: its vocabulary did not load")
    for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ConfigError(f"{key}: the tokenizer in {path} has no {name.replace('_id', '')}")
    return tokenizer


def check_vocab_matches(tokenizer: PreTrainedTokenizerBase, vocab_size: int, tokenizer_path: str) -> None:
    """Every id the tokenizer can produce must exist in the teacher's embedding table."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"data.tokenizer: the tokenizer in {tokenizer_path} has {len(tokenizer)} tokens but the "
                          f"teacher's vocabulary has {vocab_size}: they do not belong together")
