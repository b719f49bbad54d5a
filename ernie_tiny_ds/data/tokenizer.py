"""Load the Hugging Face fast tokenizer shared by teacher and student, and check that it is real."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..assets import DEFAULT_TOKENIZER
from ..errors import ConfigError
from .hub import resolve as resolve_hub


def recipe_tokenizer_path(recipe, use_finetuned_teacher: bool = True) -> str:
    """The recipe's tokenizer, else the teacher's own (pretrained, then finetuned when allowed),
    else (inline test teachers) the bundled one."""
    teachers = [("teacher.path", recipe.teacher.path, recipe.teacher.revision)]
    if use_finetuned_teacher:
        teachers.append(("teacher.finetuned_path", recipe.teacher.finetuned_path, recipe.teacher.finetuned_revision))
    for key, candidate, revision in (("data.tokenizer", recipe.data.tokenizer, recipe.data.tokenizer_revision),
                                     *teachers):
        if candidate:
            folder = resolve_hub(candidate, key, revision, what="tokenizer")  # a Hub ID: its cached snapshot
            if key != "data.tokenizer" and not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
                raise ConfigError(f"{key}: {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                                  f"set data.tokenizer to the teacher's tokenizer (a folder or Hub ID)")
            return folder
    return str(DEFAULT_TOKENIZER)


# a vocabulary that did not load maps everything to [UNK]; a Chinese one may know no English words
_PROBES = ("The quick brown fox jumps over the lazy dog near the river bank.", "我们在河边的小城里读书。")


def load_tokenizer(path: str, key: str = "data.tokenizer") -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        path = resolve_hub(path, key, what="tokenizer")  # a Hub ID (else: folder not found)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"{key}: {path} gave a slow tokenizer; a fast (tokenizer.json) one is required")
    probes = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in _PROBES]
    if all(not ids or all(i == tokenizer.unk_token_id for i in ids) for ids in probes):
        raise ConfigError(f"{key}: the tokenizer in {path} maps plain English and Chinese to [UNK] only: "
                          "its vocabulary did not load")
    for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ConfigError(f"{key}: the tokenizer in {path} has no {name.replace('_id', '')}")
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model")


def _lowercases(tokenizer: PreTrainedTokenizerBase) -> bool | None:
    """Whether the tokenizer lower-cases its input (None: it cannot tell)."""
    try:
        normalizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer")
    except (AttributeError, ValueError):
        normalizer = None

    def walk(node) -> bool | None:
        if not isinstance(node, dict):
            return None
        if node.get("type") == "Lowercase":
            return True
        if "lowercase" in node:
            return bool(node["lowercase"])
        found = [walk(child) for child in node.get("normalizers") or []]
        return True if True in found else (False if False in found else None)

    found = walk(normalizer)
    if found is None and "do_lower_case" in getattr(tokenizer, "init_kwargs", {}):
        found = bool(tokenizer.init_kwargs["do_lower_case"])
    return found


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_vocab_matches(tokenizer: PreTrainedTokenizerBase, teacher, tokenizer_path: str) -> None:
    """Every id the tokenizer can produce must exist in the teacher's embedding table, and mean the
    same token there. `teacher` is the teacher's config (or just its vocab_size). When the teacher's
    folder ships a tokenizer of its own, the vocabularies are compared token by token and their
    lower-casing too: a cased tokenizer and an uncased teacher can have sizes that fit and still
    feed the teacher the wrong ids."""
    vocab_size = teacher if isinstance(teacher, int) else teacher.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"data.tokenizer: the tokenizer in {tokenizer_path} has {len(tokenizer)} tokens but the "
                          f"teacher's vocabulary has {vocab_size}: they do not belong together")
    folder = None if isinstance(teacher, int) else getattr(teacher, "_name_or_path", None)
    if not folder or not Path(folder).is_dir() or _same_folder(folder, tokenizer_path):
        return  # an inline teacher, or the tokenizer is the teacher's own
    if not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        return  # weights only: the size check above is all there is to compare
    try:
        own = AutoTokenizer.from_pretrained(folder, use_fast=True)
    except (OSError, ValueError):
        return  # the teacher's tokenizer does not load: the recipe's one is what the user chose
    theirs, ours = own.get_vocab(), tokenizer.get_vocab()
    moved = [token for token, i in theirs.items() if ours.get(token) != i]
    if moved:
        token = sorted(moved, key=theirs.__getitem__)[0]
        where = f"id {ours[token]}" if token in ours else "missing"
        raise ConfigError(f"data.tokenizer: the tokenizer in {tokenizer_path} does not share the teacher's "
                          f"vocabulary ({folder}): {len(moved)} of its {len(theirs)} tokens differ, e.g. "
                          f"{token!r} is id {theirs[token]} for the teacher but {where} in the tokenizer")
    mine, teachers = _lowercases(tokenizer), _lowercases(own)
    if mine is not None and teachers is not None and mine != teachers:
        raise ConfigError(f"data.tokenizer: the tokenizer in {tokenizer_path} "
                          f"{'lower-cases' if mine else 'keeps the case of'} its input but the teacher's "
                          f"({folder}) {'lower-cases' if teachers else 'keeps case'}: use the teacher's tokenizer")
