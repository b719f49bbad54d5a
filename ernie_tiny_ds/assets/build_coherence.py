"""The bundled `coherence` task: sentence pairs from real English Wikipedia, harder than `sentiment`.

Each row pairs a sentence A with a sentence B and says where B comes from:
  next           the sentence right after A in its paragraph;
  same_article   a sentence of A's article at least three sentences away;
  other_article  a sentence of another article.
Telling `next` from `same_article` needs discourse (pronouns, connectives, what was just said), not
the topic words a model trained from scratch picks up, which is where a pretrained teacher and the
general stages should pay.

The text is the English Wikipedia sample that gensim's wheel ships for its tests (106 articles,
CC BY-SA 4.0). Articles are split three ways by a seeded shuffle: half become a general corpus that
no task row comes from (--corpus-out, for benches; not bundled), 40% train rows, 10% dev rows, so
dev never shares an article with train or with the corpus.

    pip download --no-deps --only-binary :all: gensim==4.4.0 && unzip -o gensim-4.4.0-*.whl \
        'gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
    python -m ernie_tiny_ds.assets.build_coherence --wiki gensim/test/test_data/enwiki-*-shortened.bz2 \
        [--out ernie_tiny_ds/assets] [--corpus-out runs/wiki-corpus]

The output is identical on every run for the same input.
"""
from __future__ import annotations

import argparse
import bz2
import json
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from . import ASSETS_DIR

SEED = 20261203
LABELS = ["next", "same_article", "other_article"]
MAX_TRAIN, MAX_DEV = 6000, 900
MIN_WORDS, MAX_WORDS = 6, 40
DROPPED_LINKS = ("file:", "image:", "category:")

_TAG_PAIRS = re.compile(r"<(ref|gallery|math|code|pre|timeline)\b[^>]*?(?<!/)>.*?</\1\s*>", re.S | re.I)
_TAGS = re.compile(r"<[^<>]*>")
_COMMENTS = re.compile(r"<!--.*?-->", re.S)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MARKUP_LEFT = re.compile(r"[{}\[\]|=<>_\t]|https?://")
_ABBREVIATION = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|e\.g|i\.e|c|ca|No|Vol|pp?)\.$")


def _until_stable(pattern: re.Pattern, replace, text: str) -> str:
    """Nested markup ({{a {{b}} }}, [[File:x|[[y]]]]) goes innermost first."""
    while True:
        new = pattern.sub(replace, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    if target.lower().startswith(DROPPED_LINKS):
        return ""
    return target.rsplit("|", 1)[-1]


def clean_wikitext(text: str) -> list[str]:
    """Wikitext -> its prose paragraphs (headings, lists, tables, templates, references dropped)."""
    text = _COMMENTS.sub("", text)
    text = _TAG_PAIRS.sub("", text)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = _EXTERNAL.sub(lambda m: m.group(1), text)
    text = _TAGS.sub("", text).replace("'''", "").replace("''", "")
    text = text.replace("&nbsp;", " ").replace("&ndash;", "-").replace("&mdash;", "-")
    paragraphs = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line and not line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            paragraphs.append(line)
    return paragraphs


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; a split after an abbreviation ("Dr.", "c.", an initial) is undone."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and not _MARKUP_LEFT.search(sentence)


def read_articles(path: Path) -> list[tuple[str, list[list[str]]]]:
    """(title, paragraphs as lists of sentences) of every main-namespace article that is not a redirect."""
    articles = []
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            text = element.findtext("{*}revision/{*}text") or ""
            if element.findtext("{*}ns") == "0" and not text.lstrip().lower().startswith("#redirect"):
                paragraphs = [split_sentences(p) for p in clean_wikitext(text)]
                articles.append((element.findtext("{*}title"), [p for p in paragraphs if p]))
            element.clear()
    return articles


def pair_rows(articles: list[tuple[str, list[list[str]]]], rng: random.Random, limit: int) -> list[tuple[str, ...]]:
    """Balanced rows (A, B, label); labels take turns, so each class gets a third."""
    flat = [[s for p in paragraphs for s in p] for _, paragraphs in articles]
    anchors = []  # (article, index in the article's flat list) of usable sentences followed by a usable one
    for a, (_, paragraphs) in enumerate(articles):
        offset = 0
        for p in paragraphs:
            anchors += [(a, offset + i) for i in range(len(p) - 1) if usable(p[i]) and usable(p[i + 1])]
            offset += len(p)
    rng.shuffle(anchors)
    rows = []
    for a, i in anchors:
        label = LABELS[len(rows) % 3]
        if label == "next":
            b = flat[a][i + 1]
        elif label == "same_article":
            far = [j for j in range(len(flat[a])) if abs(j - i) >= 3 and usable(flat[a][j])]
            if not far:
                continue
            b = flat[a][rng.choice(far)]
        else:
            other = rng.choice([x for x in range(len(articles)) if x != a and flat[x]])
            b = rng.choice([s for s in flat[other] if usable(s)] or flat[other])
        rows.append((flat[a][i], b, label))
        if len(rows) == limit:
            break
    return rows


def write_tsv(path: Path, rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("sentence1\tsentence2\tlabel\n")
        for row in rows:
            f.write("\t".join(row) + "\n")


def build(wiki: Path, out: Path, corpus_out: Path | None = None) -> dict[str, int]:
    rng = random.Random(SEED)
    articles = read_articles(wiki)
    order = list(range(len(articles)))
    rng.shuffle(order)
    n_corpus, n_train = len(order) // 2, (len(order) * 4) // 10
    corpus = [articles[i] for i in order[:n_corpus]]
    train = [articles[i] for i in order[n_corpus:n_corpus + n_train]]
    dev = [articles[i] for i in order[n_corpus + n_train:]]
    folder = out / "tasks" / "coherence"
    folder.mkdir(parents=True, exist_ok=True)
    train_rows, dev_rows = pair_rows(train, rng, MAX_TRAIN), pair_rows(dev, rng, MAX_DEV)
    write_tsv(folder / "train.tsv", train_rows)
    write_tsv(folder / "dev.tsv", dev_rows)
    meta = {"text_columns": ["sentence1", "sentence2"], "labels": LABELS, "type": "classification",
            "label_column": "label"}
    (folder / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "SOURCE.md").write_text(
        "Sentences from the English Wikipedia sample in gensim 4.4.0's wheel "
        "(gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2), "
        "licensed CC BY-SA 4.0 by Wikipedia's contributors. Built by "
        "`python -m ernie_tiny_ds.assets.build_coherence`.\n\n"
        f"Train articles: {', '.join(t for t, _ in train)}.\n\nDev articles: {', '.join(t for t, _ in dev)}.\n")
    if corpus_out is not None:  # one paragraph per line: the loader packs sentences of a line together
        corpus_out.mkdir(parents=True, exist_ok=True)
        with open(corpus_out / "wiki-general.txt", "w", encoding="utf-8", newline="\n") as f:
            for _, paragraphs in corpus:
                for p in paragraphs:
                    f.write(" ".join(p) + "\n")
    return {"articles": len(articles), "corpus_articles": len(corpus), "train_rows": len(train_rows),
            "dev_rows": len(dev_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wiki", type=Path, required=True, help="the gensim wheel's enwiki-*-shortened.bz2")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--corpus-out", type=Path, help="also write the held-out articles as a general corpus here")
    args = parser.parse_args()
    print(json.dumps(build(args.wiki, args.out, args.corpus_out)))


if __name__ == "__main__":
    main()
