"""The bundled corpus, tokenizer and tasks: present, regenerable, and giving real token ids."""
import csv
import json

from transformers import AutoTokenizer

from ernie_tiny_ds.assets import BUNDLED_TASKS, DEFAULT_CORPUS_DIR, DEFAULT_TOKENIZER, GENERATED_TASKS, task_dir
from ernie_tiny_ds.assets.build_assets import build


def test_regenerating_gives_the_same_corpus_and_tasks(tmp_path):
    build(tmp_path)
    for shipped in sorted(DEFAULT_CORPUS_DIR.glob("*.txt")):
        assert (tmp_path / "corpus" / shipped.name).read_bytes() == shipped.read_bytes()
    for name in GENERATED_TASKS:  # coherence comes from real text: tests/test_coherence_task.py
        for part in ("train.tsv", "dev.tsv", "task.json"):
            assert (tmp_path / "tasks" / name / part).read_bytes() == (task_dir(name) / part).read_bytes()


def test_tokenizer_covers_the_corpus_without_unknown_tokens():
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER))
    lines = (DEFAULT_CORPUS_DIR / "general-00.txt").read_text(encoding="utf-8").splitlines()[:200]
    ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
    flat = [i for row in ids for i in row]
    assert tokenizer.unk_token_id not in flat
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids)
    assert len(set(flat)) > 200  # real word pieces, not a handful of characters


def test_tasks_have_consistent_labels_and_columns():
    for name in BUNDLED_TASKS:
        meta = json.loads((task_dir(name) / "task.json").read_text())
        for split in ("train.tsv", "dev.tsv"):
            with open(task_dir(name) / split, encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            assert len(rows) >= 400
            assert set(meta["text_columns"]) | {meta["label_column"]} == set(rows[0])
            labels = [row[meta["label_column"]] for row in rows]
            if meta["type"] == "classification":
                assert set(labels) == set(meta["labels"])  # every class occurs
            else:
                scores = [float(x) for x in labels]
                assert 0.0 <= min(scores) < 1.0 and 4.0 < max(scores) <= 5.0
