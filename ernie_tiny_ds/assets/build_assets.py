"""Regenerate the generated bundled assets: general corpus, WordPiece tokenizer and three small tasks.

    python -m ernie_tiny_ds.assets.build_assets [--out DIR]

Everything comes from a seeded English grammar below: the corpus and task files are identical on
every run (the tokenizer too, up to the order in which the trainer breaks ties between pieces).
The corpus and the tasks share one small world (people, places, things, films), which is what
makes general distillation on the corpus useful for the tasks, as with a real corpus.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

from . import ASSETS_DIR, GENERATED_TASKS

SEED = 20261125
NAMES = ["anna", "ben", "clara", "david", "elena", "farid", "grace", "hugo", "ines", "jonas", "kira", "leo",
         "maya", "nils", "olga", "pablo", "rosa", "samir", "tara", "victor", "wen", "yusuf", "zoe", "marco"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "owl", "goat", "parrot", "turtle", "squirrel"]
THINGS = ["book", "lamp", "bicycle", "guitar", "camera", "letter", "basket", "kettle", "map", "umbrella",
          "painting", "violin", "jacket", "clock", "notebook", "boat", "chair", "window", "garden hose", "ticket"]
FOODS = ["bread", "soup", "apples", "cheese", "rice", "tea", "coffee", "cake", "oranges", "noodles"]
PLACES = ["kitchen", "garden", "library", "station", "market", "harbour", "museum", "park", "school",
          "village", "forest", "bakery", "office", "hospital", "theatre", "river bank", "mountain hut"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple"]
SIZES = ["small", "large", "old", "new", "heavy", "light", "broken", "shiny", "wooden", "tiny"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "on monday", "on the weekend",
         "after lunch", "before dinner", "last winter", "during the storm"]
VERBS = [("found", "find"), ("carried", "carry"), ("painted", "paint"), ("bought", "buy"), ("sold", "sell"),
         ("repaired", "repair"), ("cleaned", "clean"), ("lost", "lose"), ("borrowed", "borrow"),
         ("opened", "open"), ("moved", "move"), ("hid", "hide")]
WEATHER = ["rain", "snow", "wind", "fog", "sunshine", "thunder", "frost", "heat"]
POSITIVE = ["wonderful", "delightful", "brilliant", "charming", "moving", "excellent", "beautiful",
            "funny", "clever", "gripping", "warm", "superb", "enjoyable", "touching"]
NEGATIVE = ["boring", "dull", "awful", "clumsy", "tedious", "painful", "weak", "confusing", "lifeless",
            "terrible", "predictable", "shallow", "messy", "forgettable"]
WORKS = ["film", "novel", "play", "concert", "album", "series", "documentary", "opera", "story", "exhibition"]
ASPECTS = ["acting", "music", "plot", "ending", "dialogue", "camera work", "pacing", "cast", "script", "design"]
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "truly ", "rather ", "extremely "]
FACTS = [
    "the {place} opens early and closes late in summer.",
    "people in the {place} often talk about the {weather}.",
    "a {size} {thing} stood near the door of the {place}.",
    "the {animal} sleeps most of the day and wakes up {time}.",
    "{name} likes {food} and drinks {food2} {time}.",
    "the road to the {place} was closed because of the {weather}.",
    "many visitors come to the {place} to see the {colour} {thing}.",
    "the {animal} and the {animal2} live near the {place}.",
    "{name} works at the {place} and walks home {time}.",
    "there was {weather} {time}, so {name} stayed in the {place}.",
    "the {colour} {animal} ran across the {place} and disappeared.",
    "{name} wrote a letter about the {place} to {name2}.",
    "the price of {food} went up at the market this year.",
    "children learn about the {animal} at the {place}.",
]


def pick(rng: random.Random, items: list[str]) -> str:
    return items[rng.randrange(len(items))]


def scene(rng: random.Random) -> dict[str, str]:
    past, base = pick(rng, VERBS)
    return {"name": pick(rng, NAMES), "past": past, "base": base, "colour": pick(rng, COLOURS),
            "thing": pick(rng, THINGS), "place": pick(rng, PLACES), "time": pick(rng, TIMES)}


def scene_sentence(s: dict[str, str], with_time: bool = False) -> str:
    tail = f" {s['time']}" if with_time else ""
    return f"{s['name']} {s['past']} the {s['colour']} {s['thing']} in the {s['place']}{tail}."


def fact_sentence(rng: random.Random) -> str:
    template = pick(rng, FACTS)
    return template.format(place=pick(rng, PLACES), weather=pick(rng, WEATHER), size=pick(rng, SIZES),
                           thing=pick(rng, THINGS), animal=pick(rng, ANIMALS), animal2=pick(rng, ANIMALS),
                           time=pick(rng, TIMES), name=pick(rng, NAMES), name2=pick(rng, NAMES),
                           food=pick(rng, FOODS), food2=pick(rng, FOODS), colour=pick(rng, COLOURS))


# --------------------------------------------------------------------------- sentiment
def review(rng: random.Random) -> tuple[str, str]:
    """One review sentence and its label; negation and 'although' clauses make it non-trivial."""
    positive = rng.random() < 0.5
    work, aspect = pick(rng, WORKS), pick(rng, ASPECTS)

    def judgement(good: bool) -> str:
        negate = rng.random() < 0.3
        words = NEGATIVE if good == negate else POSITIVE  # "not boring" reads as praise
        adjective = pick(rng, INTENSIFIERS) + pick(rng, words)
        return f"{'not ' if negate else ''}{adjective}"

    main = rng.choice([f"the {work} was {judgement(positive)}",
                       f"the {aspect} of this {work} is {judgement(positive)}",
                       f"{pick(rng, NAMES)} thought the {work} was {judgement(positive)}"])
    if rng.random() < 0.3:  # a contrasting clause that the main clause overrides
        main = f"although the {pick(rng, ASPECTS)} was {pick(rng, NEGATIVE if positive else POSITIVE)}, {main}"
    return main + ".", "positive" if positive else "negative"


# --------------------------------------------------------------------------- pair (entailment)
def entailment_pair(rng: random.Random) -> tuple[str, str, str]:
    s = scene(rng)
    premise = scene_sentence(s)
    label = pick(rng, ["entailment", "neutral", "contradiction"])
    if label == "entailment":
        hypothesis = rng.choice([f"someone {s['past']} the {s['thing']} in the {s['place']}.",
                                 f"{s['name']} {s['past']} a {s['thing']}.",
                                 f"{s['name']} was in the {s['place']}.",
                                 f"the {s['thing']} that {s['name']} {s['past']} was {s['colour']}."])
    elif label == "contradiction":
        other = pick(rng, [c for c in COLOURS if c != s["colour"]])
        hypothesis = rng.choice([f"{s['name']} did not {s['base']} the {s['thing']}.",
                                 f"the {s['thing']} that {s['name']} {s['past']} was {other}.",
                                 f"{s['name']} never went to the {s['place']}."])
    else:
        hypothesis = rng.choice([f"{s['name']} {s['past']} the {s['thing']} {s['time']}.",
                                 f"{s['name']} was happy about the {s['thing']}.",
                                 f"{pick(rng, NAMES)} helped {s['name']} in the {s['place']}."])
    return premise, hypothesis, label


# --------------------------------------------------------------------------- similarity
def similarity_pair(rng: random.Random) -> tuple[str, str, str]:
    """Two scene sentences; the score is 5 x the share of the five slots they share, plus noise."""
    a = scene(rng)
    b = dict(a)
    slots = ["name", "verb", "colour", "thing", "place"]
    changed = rng.sample(slots, rng.randint(0, 5))
    for slot in changed:
        if slot == "verb":
            b["past"], b["base"] = pick(rng, [v for v in VERBS if v[0] != a["past"]])
        else:
            pool = {"name": NAMES, "colour": COLOURS, "thing": THINGS, "place": PLACES}[slot]
            b[slot] = pick(rng, [x for x in pool if x != a[slot]])
    score = 5.0 * (len(slots) - len(changed)) / len(slots) + rng.uniform(-0.3, 0.3)
    return scene_sentence(a), scene_sentence(b, with_time=rng.random() < 0.5), f"{min(5.0, max(0.0, score)):.2f}"


# --------------------------------------------------------------------------- corpus
def document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 9)):
        kind = rng.random()
        if kind < 0.45:
            sentences.append(fact_sentence(rng))
        elif kind < 0.75:
            sentences.append(scene_sentence(scene(rng), with_time=rng.random() < 0.4))
        else:
            sentences.append(review(rng)[0])
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def write_tsv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")


def build_tasks(out: Path, rng: random.Random) -> None:
    specs = {
        "sentiment": (review, ["sentence", "label"], {"text_columns": ["sentence"], "labels": ["negative", "positive"],
                                                      "type": "classification"}, 2000, 400),
        "pair": (entailment_pair, ["premise", "hypothesis", "label"],
                 {"text_columns": ["premise", "hypothesis"], "labels": ["entailment", "neutral", "contradiction"],
                  "type": "classification"}, 2400, 480),
        "similarity": (similarity_pair, ["sentence1", "sentence2", "label"],
                       {"text_columns": ["sentence1", "sentence2"], "labels": [], "type": "regression"}, 2000, 400),
    }
    for name, (make, header, meta, n_train, n_dev) in specs.items():
        folder = out / "tasks" / name
        folder.mkdir(parents=True)
        write_tsv(folder / "train.tsv", header, [make(rng) for _ in range(n_train)])
        write_tsv(folder / "dev.tsv", header, [make(rng) for _ in range(n_dev)])
        (folder / "task.json").write_text(json.dumps({**meta, "label_column": "label"}, indent=2) + "\n")


def build_corpus(out: Path, rng: random.Random, shards: int = 4, docs_per_shard: int = 1500) -> None:
    folder = out / "corpus"
    folder.mkdir(parents=True)
    for shard in range(shards):
        with open(folder / f"general-{shard:02d}.txt", "w", encoding="utf-8") as f:
            for _ in range(docs_per_shard):
                f.write(document(rng) + "\n")


def build_tokenizer(out: Path, vocab_size: int = 4096) -> None:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    files = (sorted(str(p) for p in (out / "corpus").glob("*.txt"))
             + sorted(str(p) for p in (out / "tasks").rglob("*.tsv")))
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train(files, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True,
                                  unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]")
    tokenizer.save_pretrained(out / "tokenizer")


def build(out: Path) -> None:
    rng = random.Random(SEED)
    staging = Path(tempfile.mkdtemp(prefix=".assets-", dir=out.parent))
    try:
        build_corpus(staging, rng)
        build_tasks(staging, rng)
        build_tokenizer(staging)
        # task by task: tasks/coherence comes from real text (build_coherence) and stays
        for part in ("corpus", "tokenizer", *(f"tasks/{name}" for name in GENERATED_TASKS)):
            shutil.rmtree(out / part, ignore_errors=True)
            (out / part).parent.mkdir(parents=True, exist_ok=True)
            (staging / part).rename(out / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
