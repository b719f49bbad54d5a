"""The bundled `coherence` task (real Wikipedia sentence pairs): its builder on a wiki dump made here,
and the bundled files."""
import bz2
import csv
import random

from ernie_tiny_ds.assets import task_dir
from ernie_tiny_ds.assets.build_coherence import LABELS, build, clean_wikitext, split_sentences
from ernie_tiny_ds.config import TaskConfig
from ernie_tiny_ds.data.tasks import load_task

WORDS = ["river", "castle", "engine", "winter", "harbour", "garden", "station", "library", "market", "forest",
         "bridge", "valley", "island", "tower", "museum", "village", "mountain", "railway", "school", "temple"]


def article_text(rng: random.Random, title: str, sentences: int) -> tuple[str, list[str]]:
    """Wikitext with every kind of markup the cleaner drops, and the prose sentences it must keep, in order."""
    kept = [f"The {title} sentence {i} talks about the {rng.choice(WORDS)} and the {rng.choice(WORDS)} today."
            for i in range(sentences)]
    half = sentences // 2
    first = " ".join(kept[:half]).replace(" talks about", " [[Talk page|talks]] about", 1)
    bold = f"The '''{title}''' sentence 0" + '<ref name="a">A reference. To drop.</ref>'
    first = first.replace(f"The {title} sentence 0", bold, 1)
    text = "\n".join([
        "{{Infobox thing | name = {{nested|template}} | size = 3}}",
        first + '<ref name="b"/>',
        "== A heading ==",
        "* a list item that is dropped entirely from the prose.",
        "{| class=\"wikitable\"\n| cell one || cell two\n|}",
        "[[File:Picture.jpg|thumb|A caption with a [[link]].]]",
        " ".join(kept[half:]),
        "<!-- a comment that is dropped. -->",
        "[[Category:Things]]",
    ])
    return text, kept


def write_dump(path, articles: dict[str, str]) -> None:
    pages = "".join(
        f"<page><title>{title}</title><ns>{0 if not title.startswith('Talk:') else 1}</ns>"
        f"<revision><text xml:space=\"preserve\">{text.replace('&', '&amp;').replace('<', '&lt;')}</text>"
        f"</revision></page>"
        for title, text in articles.items())
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(f"<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.10/\">{pages}</mediawiki>")


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_cleaning_keeps_the_prose_in_order_and_drops_the_markup():
    rng = random.Random()
    text, kept = article_text(rng, "Alpha", 8)
    paragraphs = clean_wikitext(text)
    sentences = [s for p in paragraphs for s in split_sentences(p)]
    assert sentences == [s.replace("[[Talk page|talks]]", "talks") for s in kept]
    assert split_sentences("Dr. Smith met J. Doe in 1900. They spoke.") == ["Dr. Smith met J. Doe in 1900.",
                                                                            "They spoke."]


def test_rows_say_truly_where_b_comes_from_and_dev_shares_no_article(tmp_path):
    rng = random.Random()
    articles, prose = {}, {}
    for i in range(20):
        title = f"Topic{i}"
        articles[title], prose[title] = article_text(rng, title, rng.randint(10, 16))
    articles["Talk:Topic0"] = "A talk page. It is not an article at all today."
    articles["Redirected"] = "#REDIRECT [[Topic1]]"
    write_dump(tmp_path / "dump.xml.bz2", articles)

    counts = build(tmp_path / "dump.xml.bz2", tmp_path / "out", corpus_out=tmp_path / "corpus")
    assert counts["articles"] == 20 and counts["corpus_articles"] == 10
    where = {s: (title, i) for title, sentences in prose.items() for i, s in enumerate(sentences)}
    folder = tmp_path / "out" / "tasks" / "coherence"
    seen = {}
    for split in ("train", "dev"):
        rows = read_rows(folder / f"{split}.tsv")
        assert rows and {r["label"] for r in rows} == set(LABELS)
        labels = [r["label"] for r in rows]
        assert max(labels.count(x) for x in LABELS) - min(labels.count(x) for x in LABELS) <= 1  # balanced
        for r in rows:
            (ta, ia), (tb, ib) = where[r["sentence1"]], where[r["sentence2"]]
            if r["label"] == "next":
                assert (tb, ib) == (ta, ia + 1)
            elif r["label"] == "same_article":
                assert tb == ta and abs(ib - ia) >= 3
            else:
                assert tb != ta
            seen.setdefault(split, set()).add(ta)
    corpus = (tmp_path / "corpus" / "wiki-general.txt").read_text(encoding="utf-8")
    corpus_articles = {t for t, sentences in prose.items() if sentences[0] in corpus}
    assert len(corpus_articles) == 10
    assert not (seen["train"] & seen["dev"]) and not (seen["dev"] | seen["train"]) & corpus_articles

    again = build(tmp_path / "dump.xml.bz2", tmp_path / "again")
    assert again == {**counts}
    for part in ("train.tsv", "dev.tsv", "task.json"):
        assert (tmp_path / "again/tasks/coherence" / part).read_bytes() == (folder / part).read_bytes()


def test_the_bundled_task_loads_by_name_balanced_and_within_the_length_the_demo_uses():
    task = load_task(TaskConfig(name="coherence", max_seq_len=128))
    assert task.type == "classification" and task.label_names == LABELS
    assert len(task.train) > 4000 and len(task.dev) > 600
    for split in (task.train, task.dev):
        counts = [sum(e.label == k for e in split) for k in range(3)]
        assert max(counts) - min(counts) <= 1
    assert (task_dir("coherence") / "SOURCE.md").read_text().count("CC BY-SA") == 1
