"""Tasks from `datasets` (save_to_disk folders the tests build, offline), header-less task files with
column indices (GLUE's CoLA), several dev splits (MNLI), and `predict` writing GLUE submission files."""
import json

import pytest
import torch
import transformers

from ernie_tiny_ds.config import TaskConfig
from ernie_tiny_ds.data.tasks import load_split, load_task
from ernie_tiny_ds.errors import ConfigError, DataError
from ernie_tiny_ds.workflows.evaluate import evaluate_model

NLI = ["entailment", "neutral", "contradiction"]
WORDS = "the river town market bridge school garden north south winter summer people".split()


def sentence(i):
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 4)) + "."


def mnli_like(folder):
    """premise/hypothesis/label(ClassLabel)/idx, GLUE's split names; the test splits unlabelled (-1)."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=NLI), "idx": datasets.Value("int32")})

    def split(n, offset, labelled=True):
        return datasets.Dataset.from_dict(
            {"premise": [sentence(i) for i in range(n)], "hypothesis": [sentence(i + 5) for i in range(n)],
             "label": [i % 3 if labelled else -1 for i in range(n)], "idx": [offset + i for i in range(n)]},
            features=features)

    datasets.DatasetDict({"train": split(24, 0), "validation_matched": split(9, 100),
                          "validation_mismatched": split(6, 200), "test_matched": split(5, 300, False),
                          "test_mismatched": split(4, 400, False)}).save_to_disk(str(folder))
    return str(folder)


def stsb_like(folder):
    import datasets

    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.Value("float32"), "idx": datasets.Value("int32")})
    data = {"sentence1": [sentence(i) for i in range(12)], "sentence2": [sentence(i + 1) for i in range(12)],
            "label": [i * 0.4 for i in range(12)], "idx": list(range(12))}
    split = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(folder))
    return str(folder)


def test_a_dataset_gives_columns_labels_and_several_dev_splits(tmp_path):
    cfg = TaskConfig(dataset=mnli_like(tmp_path / "mnli"), name="mnli",
                     dev_split=["validation_matched", "validation_mismatched"])
    task = load_task(cfg)
    assert task.text_columns == ["premise", "hypothesis"]  # the string features; idx and label are not text
    assert task.type == "classification" and task.label_names == NLI and task.main_metric == "accuracy"
    assert [e.label for e in task.train[:4]] == [0, 1, 2, 0]  # the dataset's own ids
    assert task.train[1].texts == (sentence(1), sentence(6))
    assert list(task.dev_splits) == ["validation_matched", "validation_mismatched"]
    assert len(task.dev) == 9 and task.dev is task.dev_splits["validation_matched"]
    assert len(task.dev_splits["validation_mismatched"]) == 6
    _, test = load_split(cfg, "test_matched")
    assert [e.index for e in test] == [300, 301, 302, 303, 304] and {e.label for e in test} == {-1}


def test_a_float_label_makes_a_regression_task(tmp_path):
    task = load_task(TaskConfig(dataset=stsb_like(tmp_path / "stsb"), subset="stsb"))
    assert task.type == "regression" and task.label_names == [] and task.num_labels == 1
    assert task.name == "stsb" and task.main_metric == "pearson_spearman"
    assert task.train[3].label == pytest.approx(1.2)


def test_dataset_errors_name_the_key(tmp_path):
    folder = mnli_like(tmp_path / "mnli")
    with pytest.raises(ConfigError, match=r"task.dev_split: the dataset has no split 'validation' \(its splits: train"):
        load_task(TaskConfig(dataset=folder))
    with pytest.raises(ConfigError, match="task.text_columns: the dataset has no column 'sentence'"):
        load_task(TaskConfig(dataset=folder, text_columns=["sentence"], dev_split="validation_matched"))
    with pytest.raises(ConfigError, match="task.type: regression, but the dataset's 'label' is a class label"):
        load_task(TaskConfig(dataset=folder, type="regression", dev_split="validation_matched"))
    with pytest.raises(ConfigError, match="task.dataset: cannot open"):
        load_task(TaskConfig(dataset=str(tmp_path / "nowhere" / "x")))
    with pytest.raises(ConfigError, match="not both"):
        load_task(TaskConfig(dataset=folder, train_file="train.tsv"))


COLA = ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tOne more pseudo generalization.",
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.", "gj04\t0\t*\tThe more we study verbs."]


def test_headerless_tsv_with_column_indices(tmp_path):
    folder = tmp_path / "CoLA"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("\n".join(COLA) + "\n")
    for columns, label in ((["3"], "1"), ([3], 1)):
        task = load_task(TaskConfig(train_file=str(folder / "train.tsv"), dev_file=str(folder / "dev.tsv"),
                                    header=False, text_columns=columns, label_column=label))
        assert task.name == "CoLA" and task.main_metric == "mcc" and task.label_names == ["0", "1"]
        assert ([e.label for e in task.train] == [1, 0, 1, 0]
                and task.train[0].texts == ("Our friends won't buy this analysis.",))
        assert task.train[0].source.endswith("train.tsv:1")  # no header: the first line is an example
    with pytest.raises(ConfigError, match="task.header is false: columns are 0-based indices, got 'sentence'"):
        load_task(TaskConfig(train_file=str(folder / "train.tsv"), header=False, text_columns=["sentence"]))
    (folder / "short.tsv").write_text(COLA[0] + "\ngj04\t1\n")
    with pytest.raises(DataError, match=r"short.tsv:2: 2 fields, column 3 is used"):
        load_task(TaskConfig(train_file=str(folder / "short.tsv"), header=False, text_columns=["3"], label_column="1"))


def tiny_classifier(folder, tokenizer_dir, vocab_size, num_labels):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=128, num_labels=num_labels)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_evaluate_scores_every_dev_split(tmp_path, tokenizer_dir, vocab_size):
    cfg = TaskConfig(dataset=mnli_like(tmp_path / "mnli"), name="mnli",
                     dev_split=["validation_matched", "validation_mismatched"])
    model = tiny_classifier(tmp_path / "model", tokenizer_dir, vocab_size, 3)
    metrics = evaluate_model(model, cfg)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["validation_mismatched/accuracy"] <= 1
    assert metrics["examples"] == 9


def read_tsv(path):
    lines = path.read_text().splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


def test_predict_writes_glue_submission_files(tmp_path, tokenizer_dir, vocab_size, in_process):
    # one process, no group: the command runs in this one
    model = tiny_classifier(tmp_path / "model", tokenizer_dir, vocab_size, 3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"teacher": {"config": {}}, "task": {
        "dataset": mnli_like(tmp_path / "mnli"), "name": "mnli", "dev_split": "validation_matched",
        "test_split": ["test_matched", "test_mismatched"]}}))
    code, err = in_process(["predict", "--model", str(model), "--config", str(recipe),
                            "--output", str(tmp_path / "sub")])
    assert code == 0, err
    for name, indices in (("MNLI-m.tsv", range(300, 305)), ("MNLI-mm.tsv", range(400, 404))):
        header, rows = read_tsv(tmp_path / "sub" / name)
        assert header == "index\tprediction"
        assert [int(r[0]) for r in rows] == list(indices) and {r[1] for r in rows} <= set(NLI)

    # CoLA from header-less files: a test file (no labels) and class ids, as GLUE scores CoLA
    folder = tmp_path / "CoLA"
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(COLA) + "\n")
    (folder / "test.tsv").write_text("\n".join(line.split("\t", 1)[0] + "\t\t\t" + line.split("\t")[3]
                                               for line in COLA[:3]) + "\n")
    cola = tiny_classifier(tmp_path / "cola_model", tokenizer_dir, vocab_size, 2)
    code, err = in_process(["predict", "--model", str(cola), "--task", "cola", "--output", str(tmp_path / "sub"),
                            f"task.train_file={folder / 'train.tsv'}", f"task.test_file={folder / 'test.tsv'}",
                            "task.header=false", "task.text_columns=[3]", "task.label_column=1"])
    assert code == 0, err
    header, rows = read_tsv(tmp_path / "sub" / "CoLA.tsv")
    assert [r[0] for r in rows] == ["0", "1", "2"] and {r[1] for r in rows} <= {"0", "1"}
    code, err = in_process(["predict", "--model", str(cola), "--task", "cola", "--split", "test",
                            f"task.train_file={folder / 'train.tsv'}", "task.header=false", "task.text_columns=[3]",
                            "task.label_column=1"])
    assert code == 2 and "error: --split test: set task.test_file" in "\n".join(err)
