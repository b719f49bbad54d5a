"""Generated corpora whose documents can be recognised after tokenization, and tiny trained tokenizers.

Every sentence of document N starts with the word `docN`, so decoding a packed sequence tells which
document (and how many of its sentences) it holds: coverage is checked by counting, not by trust.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from distributed import WORDS

_DOC_ID = re.compile(r"\bdoc(\d+)\b")


def document(doc_id: int, rng: random.Random, sentences: int) -> str:
    return " ".join(f"doc{doc_id} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "."
                    for _ in range(sentences))


def write_id_corpus(folder: Path, documents: int, files: int, seed: int = 0) -> dict[int, str]:
    """Documents (one per line) spread round-robin over `files` text files; returns id -> text."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = {d: document(d, rng, rng.randint(1, 5)) for d in range(documents)}
    handles = [open(folder / f"part-{i:02d}.txt", "w", encoding="utf-8") for i in range(files)]
    for d, text in docs.items():
        handles[d % files].write(text + "\n")
    for h in handles:
        h.close()
    return docs


def sentence_counts(docs: dict[int, str]) -> Counter:
    return Counter({d: len(_DOC_ID.findall(text)) for d, text in docs.items()})


def decoded_counts(tokenizer, sequences) -> Counter:
    """doc id -> sentences seen in `sequences`; asserts that no sequence mixes two documents."""
    seen: Counter = Counter()
    for seq in sequences:
        ids = [int(i) for i in seq]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id, ids
        found = _DOC_ID.findall(tokenizer.decode(ids[1:-1]))
        assert len(set(found)) == 1, f"a sequence mixes documents {set(found)}"
        seen[int(found[0])] += len(found)
    return seen


def batch_sequences(batch) -> list[list[int]]:
    """The unpadded rows of a loader batch, after checking that padding only comes at the end."""
    rows = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n), "padding must come only at the end"
        rows.append(ids[:n])
    return rows


def _training_text(folder: Path) -> Path:
    rng = random.Random(1)
    path = folder / "tokenizer-train.txt"
    path.write_text("\n".join(document(d, rng, 3) for d in range(400)) + "\n"
                    + "The quick brown fox jumps over the lazy dog near the river bank.\n")
    return path


def train_wordpiece(folder: Path) -> str:
    """A WordPiece tokenizer whose vocabulary is built, not trained: every word of the training
    text whole, every character alone and as a continuation, and the numbers below 1000 as
    continuations. The tokenizers trainer breaks ties between equal merge counts differently from
    run to run, so a trained vocabulary (and every sequence length a test sees) would change."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    text = _training_text(folder).read_text(encoding="utf-8").lower()
    words = sorted(set(re.findall(r"[a-z]+", text)))           # docN becomes "doc" + "##N" pieces
    chars = sorted(set(re.sub(r"\s", "", text)))
    numbers = [f"##{n}" for n in range(1000)]                    # so docN costs two tokens, not 1 + digits
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words, *numbers]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                  pad_token="[PAD]", mask_token="[MASK]")
    out = folder / "wordpiece"
    tok.save_pretrained(out)
    return str(out)


def train_sentencepiece(folder: Path) -> str:
    """A SentencePiece unigram model, turned into a fast tokenizer from its own pieces and scores."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "sp"
    spm.SentencePieceTrainer.train(input=str(_training_text(folder)), model_prefix=str(prefix), vocab_size=120,
                                   hard_vocab_limit=False, character_coverage=1.0, pad_id=0, unk_id=1, bos_id=-1,
                                   eos_id=-1, user_defined_symbols=["[CLS]", "[SEP]"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    backend = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]",
                                  pad_token="<pad>", unk_token="<unk>")
    probe = "doc12 the river town."
    assert tok(probe, add_special_tokens=False)["input_ids"] == sp.encode(probe), "fast tokenizer != SentencePiece"
    out = folder / "sentencepiece"
    tok.save_pretrained(out)
    return str(out)


def load(path: str):
    """Through the project's loader, which refuses a tokenizer that maps English to [UNK] only."""
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    ids = tok("doc7 the river town", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
    return tok
