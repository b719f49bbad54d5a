"""Per-task main metrics: every metric against scipy/sklearn on random inputs, GLUE's composites,
the official metric of GLUE/CLUE task names, task.metric, and evaluate_model reporting it."""
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ernie_tiny_ds.config import TaskConfig, load_recipe
from ernie_tiny_ds.data.benchmarks import compute_metrics, main_metric
from ernie_tiny_ds.data.tasks import load_task
from ernie_tiny_ds.errors import ConfigError


@pytest.mark.parametrize("k, seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_classification_metrics_equal_sklearn(k, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, 300)
    logits = rng.normal(size=(300, k)) + 1.2 * np.eye(k)[labels] * (rng.random(300) < 0.6)[:, None]
    predictions = logits.argmax(-1)
    average = "binary" if k == 2 else "macro"
    expected = {"accuracy": accuracy_score(labels, predictions),
                "f1": f1_score(labels, predictions, average=average),
                "mcc": matthews_corrcoef(labels, predictions)}
    expected["acc_f1"] = (expected["accuracy"] + expected["f1"]) / 2
    for main in ("accuracy", "f1", "mcc", "acc_f1"):
        got = compute_metrics("classification", logits, labels, main)
        assert got[main] == pytest.approx(expected[main], abs=1e-12)
        assert {"accuracy", "f1", "mcc"} <= set(got)
    assert "acc_f1" not in compute_metrics("classification", logits, labels)  # only when it is the main one


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_metrics_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 200)
    outputs = labels + rng.normal(scale=1.5, size=200)
    expected = {"pearson": pearsonr(outputs, labels)[0], "spearman": spearmanr(outputs, labels)[0]}
    expected["pearson_spearman"] = (expected["pearson"] + expected["spearman"]) / 2
    for main in ("pearson", "spearman", "pearson_spearman"):
        got = compute_metrics("regression", outputs[:, None], labels, main)
        assert got[main] == pytest.approx(expected[main], abs=1e-12)
    constant = compute_metrics("regression", np.ones((200, 1)), labels, "pearson_spearman")
    assert constant["pearson_spearman"] is None  # undefined, not NaN


@pytest.mark.parametrize("name, kind, metric", [
    ("cola", "classification", "mcc"), ("CoLA", "classification", "mcc"), ("SST-2", "classification", "accuracy"),
    ("mrpc", "classification", "acc_f1"), ("qqp", "classification", "acc_f1"),
    ("stsb", "regression", "pearson_spearman"), ("STS-B", "regression", "pearson_spearman"),
    ("mnli", "classification", "accuracy"), ("qnli", "classification", "accuracy"),
    ("rte", "classification", "accuracy"), ("wnli", "classification", "accuracy"),
    ("afqmc", "classification", "accuracy"), ("tnews", "classification", "accuracy"),
    ("iflytek", "classification", "accuracy"), ("cmnli", "classification", "accuracy"),
    ("ocnli", "classification", "accuracy"), ("wsc", "classification", "accuracy"),
    ("csl", "classification", "accuracy"), ("chnsenticorp", "classification", "accuracy"),
    ("my_task", "classification", "accuracy"), ("my_task", "regression", "pearson"), (None, "regression", "pearson"),
])
def test_official_metric_by_task_name(name, kind, metric):
    assert main_metric(name, kind) == metric


def write_task(folder, name, rows, header="sentence\tlabel"):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return TaskConfig(name=name, train_file=str(folder / "train.tsv"), dev_file=str(folder / "dev.tsv"),
                      text_columns=["sentence"])


def test_task_metric_overrides_and_must_fit_the_task_type(tmp_path):
    rows = ["a b c\t0", "d e f\t1", "g h\t1", "i j\t0"]
    cfg = write_task(tmp_path / "CoLA", None, rows)
    assert load_task(cfg).main_metric == "mcc"  # named after its folder, as GLUE ships it
    cfg.metric = "f1"
    assert load_task(cfg).main_metric == "f1"
    cfg.metric = "pearson"
    with pytest.raises(ConfigError, match="task.metric: 'pearson' does not score a classification task"):
        load_task(cfg)
    with pytest.raises(ConfigError, match="task.metric"):
        load_recipe(None, ["teacher.config={}", "task.metric=bleu"])


def test_evaluate_model_reports_the_main_metric_the_report_ranks_by(tmp_path, tokenizer_dir, vocab_size):
    """build_report reads metrics[task.main_metric] for `retained`: for MRPC that is the acc/F1 mean."""
    import transformers

    from ernie_tiny_ds.workflows.evaluate import evaluate_model

    cfg = write_task(tmp_path / "glue", "mrpc", ["a b\tc d\t0", "the river\tthe town\t1", "e f\tg h\t1",
                                                 "old\tnew\t0", "king\tqueen\t1"],
                     header="sentence1\tsentence2\tlabel")
    cfg.text_columns = ["sentence1", "sentence2"]
    torch_config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=16, max_position_embeddings=128)
    transformers.BertForSequenceClassification(torch_config).save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "model")
    assert load_task(cfg).main_metric == "acc_f1"
    metrics = evaluate_model(tmp_path / "model", cfg)
    assert metrics["acc_f1"] == pytest.approx((metrics["accuracy"] + metrics["f1"]) / 2)
