"""Teacher finetuning on 2 real ranks (torchrun): it learns, saves a loadable folder, is reused."""
import json
import random

import pytest
import torch
import yaml
from distributed import WORDS, run_cli, run_ranks, tiny_teacher
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.constant_predictions import KEY as CONSTANT
from ernie_tiny_ds.data.tasks import load_task
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.workflows.evaluate import evaluate_model
from ernie_tiny_ds.workflows.finetune import DONE_FILE, _reusable, build_classifier

pytestmark = pytest.mark.slow

FILLER = [w for w in WORDS if w not in ("king", "queen")]


def keyword_task(folder, n_train=256, n_dev=64, seed=0):
    """Random sentences holding either 'king' (label royal_m) or 'queen' (royal_f): the keyword decides."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            label = rng.choice(["royal_m", "royal_f"])
            words.insert(rng.randrange(len(words) + 1), "king" if label == "royal_m" else "queen")
            rows.append(f"{' '.join(words)}.\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return {"name": "keyword", "train_file": str(folder / "train.tsv"), "dev_file": str(folder / "dev.tsv"),
            "text_columns": ["sentence"], "max_seq_len": 32}


def recipe(tmp_path, tokenizer_dir, vocab_size):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "teacher": {"config": tiny_teacher(vocab_size, layers=2)},
        "data": {"tokenizer": tokenizer_dir},
        "task": keyword_task(tmp_path / "task"),
        "finetune": {"epochs": 4, "lr": 3e-3, "micro_batch_size": 16, "warmup_ratio": 0.1, "seed": 1},
        "train": {"dist_timeout_s": 120},
    }))
    return path


def dev_accuracy_by_hand(folder, task_folder):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [line.split("\t") for line in (task_folder / "dev.tsv").read_text().splitlines()[1:]]
    correct = 0
    with torch.no_grad():
        for sentence, label in rows:
            logits = model(**tokenizer(sentence, return_tensors="pt")).logits[0]
            correct += model.config.id2label[int(logits.argmax())] == label
    return correct / len(rows)


def test_two_ranks_finetune_a_teacher_that_learns_and_is_reused(tmp_path, tokenizer_dir, vocab_size):
    path = recipe(tmp_path, tokenizer_dir, vocab_size)
    proc = run_ranks(["finetune-teacher", "--config", str(path), "deepspeed.config=zero3"])
    assert "32 steps of 16 x 2 rank(s), ZeRO-3" in proc.stdout  # 4 epochs of 256 // (16 x 2) batches
    out = tmp_path / "out/teacher_finetuned"
    done = json.loads((out / "finetune_done.json").read_text())
    assert done["labels"] == ["royal_f", "royal_m"] and done["world_size"] == 2 and done["steps"] == 32
    # the printed/recorded metrics agree with an independent per-example evaluation of the saved folder
    accuracy = dev_accuracy_by_hand(out, tmp_path / "task")
    assert accuracy >= 0.9, accuracy  # chance is 0.5
    assert done["dev_metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["problem_type"] == "single_label_classification"
    assert config["id2label"] == {"0": "royal_f", "1": "royal_m"}
    assert not (tmp_path / "out/teacher_finetuned.tmp").exists()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = run_ranks(["finetune-teacher", "--config", str(path), "deepspeed.config=zero3"])
    assert "reusing it" in again.stdout and "finetune step" not in again.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_classifier_starts_from_the_pretrained_encoder(tmp_path, tokenizer_dir, vocab_size):
    from ernie_tiny_ds.distill.models import load_teacher

    r = load_recipe(recipe(tmp_path, tokenizer_dir, vocab_size))
    task = load_task(r.task)
    model = build_classifier(r, task)
    encoder = load_teacher(r.teacher, finetuned=False, seed=r.train.seed)  # what stage 1 distils from
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name
    assert model.config.num_labels == 2 and model.config.id2label == {0: "royal_f", 1: "royal_m"}
    # an output finetuned for another task is not silently reused
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / DONE_FILE).write_text(json.dumps({"type": "classification", "labels": ["a", "b"]}))
    with pytest.raises(ConfigError, match=r"old holds a teacher finetuned for another task"):
        _reusable(tmp_path / "old", task)


def test_one_process_regression_finetune_matches_evaluate(tmp_path, tokenizer_dir, vocab_size):
    path = recipe(tmp_path, tokenizer_dir, vocab_size)
    out = tmp_path / "similarity_teacher"
    proc = run_cli(["finetune-teacher", "--config", str(path), "--output", str(out), "task={name: similarity}",
                    "finetune.epochs=0.1", "finetune.micro_batch_size=32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 steps of 32 x 1 rank(s), ZeRO-1" in proc.stdout  # ceil(0.1 x 2000 // 32)
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["architectures"] == ["BertForSequenceClassification"]
    done = json.loads((out / DONE_FILE).read_text())
    metrics = evaluate_model(out, load_recipe(path, ["task={name: similarity}"]).task)
    assert metrics.pop("examples") == 400
    # 7 steps leave a regression head near the labels' mean: when they do, both name it alike
    assert metrics.pop(CONSTANT, None) == done["dev_metrics"].pop(CONSTANT, None)
    assert set(metrics) == {"pearson", "spearman"}
    assert done["dev_metrics"] == pytest.approx(metrics, abs=1e-6)


def test_a_pretrained_masked_lm_folder_gives_its_encoder_to_the_classifier(tmp_path, tokenizer_dir, vocab_size):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(**{k: v for k, v in tiny_teacher(vocab_size, layers=2).items() if k != "model_type"})
    torch.manual_seed(0)
    pretrained = BertForMaskedLM(config)
    pretrained.save_pretrained(tmp_path / "bert")
    path = recipe(tmp_path, tokenizer_dir, vocab_size)
    r = load_recipe(path, ["teacher.config=null", f"teacher.path={tmp_path / 'bert'}"])
    model = build_classifier(r, load_task(r.task))
    encoder = pretrained.bert.state_dict()  # a masked-LM checkpoint has no pooler: it starts fresh
    for name, value in model.bert.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(value, encoder[name]), name
    assert model.classifier.out_features == 2 and model.dtype == torch.float32


def test_a_stopped_finetune_resumes_to_the_uninterrupted_weights(tmp_path, tokenizer_dir, vocab_size):
    """STOP file -> checkpoint at step 1 and exit; the same command resumes and ends on the weights
    of a run that was never stopped (2 ranks, dropout on, periodic checkpoints every 3 steps)."""
    from safetensors.torch import load_file

    path = recipe(tmp_path, tokenizer_dir, vocab_size)
    common = ["finetune-teacher", "--config", str(path), "finetune.epochs=1", "train.save_every=3",
              "teacher.config.hidden_dropout_prob=0.1"]  # dropout: the resumed run needs the saved RNG state
    run_ranks(common + ["--output", str(tmp_path / "straight")])

    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "STOP").touch()
    first = run_ranks(common + ["--output", str(tmp_path / "resumed")])
    assert "stopped at step 1 of 8" in first.stdout
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoints").is_dir()
    assert not (tmp_path / "out" / "STOP").exists()  # the request is consumed
    second = run_ranks(common + ["--output", str(tmp_path / "resumed")])
    assert "resumed finetuning from" in second.stdout and "at step 1" in second.stdout
    assert not (tmp_path / "resumed.checkpoints").exists()  # removed once the output is in place

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, rtol=1e-5, atol=1e-6), name
    # and finetuning moved the weights: the comparison is not between two untouched models
    encoder = build_classifier(load_recipe(path), load_task(load_recipe(path).task)).state_dict()
    assert not torch.allclose(straight["bert.encoder.layer.0.attention.self.query.weight"],
                              encoder["bert.encoder.layer.0.attention.self.query.weight"])
