"""Chinese end to end: a character-level WordPiece vocabulary made here from the test's own text, a small
randomly initialised ERNIE teacher, a ChnSentiCorp-style task, all four stages on 2 ranks through
the `pipeline` command, then the release (model card, model.onnx) and the shipped ernie_tiny_zh recipe."""
import json
import random

import pytest
import transformers
import yaml
from distributed import run_cli, run_ranks

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.packing import TokenEncoder, pack_pieces, sentence_final_ids
from ernie_tiny_ds.data.tokenizer import load_tokenizer

POSITIVE = "好 喜欢 满意 推荐 舒服 干净 热情 方便 划算 值得".split()
NEGATIVE = "差 失望 糟糕 退货 吵闹 脏 冷淡 麻烦 贵 后悔".split()
NEUTRAL = ("酒店 房间 服务 早餐 位置 前台 价格 环境 这本书 手机 我们 他们 今天 昨天 城市 河边 学校 "
           "朋友 老师 孩子 晚上 早上 觉得 非常 有点 真的 还是 已经 一直 附近 地铁 窗户 床 电视").split()
FINAL = "。！？"


def sentence(rng: random.Random, words: list[str]) -> str:
    return "".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + rng.choice(FINAL)


def write_texts(tmp_path, seed: int = 0):
    rng = random.Random(seed)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "zh.txt", "w", encoding="utf-8") as f:
        for _ in range(80):  # one document per line, sentences ended by 。！？ (a ， inside)
            f.write("".join(sentence(rng, NEUTRAL + POSITIVE + NEGATIVE).replace("觉得", "觉得，")
                            for _ in range(rng.randint(2, 6))) + "\n")
    for split, n in (("train", 160), ("dev", 60)):
        with open(tmp_path / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("label\ttext_a\n")
            for i in range(n):
                label = i % 2
                words = NEUTRAL + (POSITIVE if label else NEGATIVE) * 3
                f.write(f"{label}\t{sentence(rng, words)}{sentence(rng, words)}\n")
    return corpus


def make_vocab_tokenizer(tmp_path):
    """[PAD] [UNK] [CLS] [SEP] [MASK] + every character of the test's text + ，。！？: a char-level BERT vocabulary."""
    chars = sorted(set("".join(NEUTRAL + POSITIVE + NEGATIVE)) | set("，" + FINAL))
    folder = tmp_path / "zh_tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n",
                                      encoding="utf-8")
    # transformers 5 reads the vocabulary from `vocab` (vocab_file alone leaves it empty)
    tokenizer = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"), tokenize_chinese_chars=True,
                                               do_lower_case=False)
    tokenizer.save_pretrained(folder)
    return folder, len(chars) + 5


def test_tokenizer_round_trip_and_packing_on_chinese_punctuation(tmp_path):
    folder, vocab_size = make_vocab_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(folder))  # the recipe's loader: a Chinese-only vocabulary is accepted
    assert len(tokenizer) == vocab_size
    text = "酒店房间非常干净！前台服务热情，早餐真的好。我们还是觉得有点贵？"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids  # one id per character
    assert "".join(tokenizer.decode(ids).split()) == text

    ends = sentence_final_ids(tokenizer)
    assert {tokenizer.convert_ids_to_tokens(i) for i in ends} == set(FINAL)
    # room for two short sentences per sequence: sequences end at 。！？, never inside a sentence
    (sequences,) = pack_pieces([text], TokenEncoder(tokenizer), max_seq_len=2 + 18)
    decoded = ["".join(tokenizer.decode(seq[1:-1]).split()) for seq in sequences]
    assert decoded == ["酒店房间非常干净！", "前台服务热情，早餐真的好。", "我们还是觉得有点贵？"]
    assert all(seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id for seq in sequences)


@pytest.mark.slow
def test_pipeline_distils_an_ernie_teacher_on_chinese_text_on_two_ranks(tmp_path):
    corpus = write_texts(tmp_path)
    tokenizer_dir, vocab_size = make_vocab_tokenizer(tmp_path)
    out = tmp_path / "out"
    # the shipped recipe with the user's files filled in; the Hub teacher swapped for a tiny inline ERNIE
    values = yaml.safe_load(load_recipe_text())
    values.update(output_dir=str(out), stages={"task_adaptive": {"train": {"max_steps": 4}},
                                               "task_specific": {"train": {"max_steps": 6}}})
    values["teacher"] = {"config": {"model_type": "ernie", "vocab_size": vocab_size, "hidden_size": 64,
                                    "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
                                    "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                                    "attention_probs_dropout_prob": 0.0}}
    values["student"] = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    values["data"] = {"corpus": str(corpus), "tokenizer": str(tokenizer_dir), "max_seq_len": 32, "shuffle_buffer": 64}
    values["task"].update(train_file=str(tmp_path / "train.tsv"), dev_file=str(tmp_path / "dev.tsv"), max_seq_len=32)
    values["train"] = {"max_steps": 4, "micro_batch_size": 8, "log_every": 1, "save_every": 4, "progress_bar": False,
                       "dist_timeout_s": 300, "precision": "fp32"}
    values["optim"] = {"lr": 1e-3, "warmup_ratio": 0.0}
    values["finetune"] = {"epochs": 1, "lr": 1e-3, "micro_batch_size": 16}
    values["teacher"]["dtype"] = "fp32"
    recipe = tmp_path / "zh.yaml"
    recipe.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")

    proc = run_ranks(["pipeline", "--config", str(recipe)], timeout=1500)
    assert "pipeline: done" in proc.stdout, proc.stdout[-4000:]
    stages = ["general", "general_enhanced", "task_adaptive", "task_specific"]
    for stage in stages:
        assert json.loads((out / stage / "stage_done.json").read_text())["steps"] == (6 if stage == "task_specific"
                                                                                        else 4)
    student = out / "task_specific" / "student"
    config = json.loads((student / "config.json").read_text())
    assert config["model_type"] == "ernie" and config["architectures"] == ["ErnieForSequenceClassification"]

    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "chnsenticorp" and report["student"]["metrics"]["accuracy"] is not None
    card = (student / "README.md").read_text(encoding="utf-8")
    assert "language:\n- zh" in card and "license: apache-2.0" in card and "chnsenticorp" in card
    for stage in stages[:3]:
        assert "pipeline_tag: feature-extraction" in (out / stage / "student" / "README.md").read_text()
    if "onnx" in report:  # the onnx extra is installed (CI: the test extra): the release carries model.onnx
        assert (student / "model.onnx").is_file()
        assert max(report["onnx"]["teacher"]["max_abs_diff"], report["onnx"]["student"]["max_abs_diff"]) <= 1e-4
        assert "## ONNX Runtime (CPU)" in (out / "report.md").read_text()

    classifier = transformers.pipeline("text-classification", model=str(student))
    assert classifier("房间干净，服务热情。")[0]["label"] in ("0", "1")


def load_recipe_text() -> str:
    from pathlib import Path

    import ernie_tiny_ds
    return (Path(ernie_tiny_ds.__file__).parent / "recipes" / "ernie_tiny_zh.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_shipped_recipe_names_its_teacher_by_hub_id(tmp_path):
    recipe = load_recipe("ernie_tiny_zh", [f"task.train_file={tmp_path / 'train.tsv'}"])
    assert recipe.teacher.path == "nghuyong/ernie-3.0-base-zh" and recipe.release.language == ["zh"]
    assert recipe.task.text_columns == ["text_a"] and recipe.data.tokenizer is None
    # offline with an empty cache: one line that says how to get the teacher
    proc = run_cli(["distill", "--config", "ernie_tiny_zh", "--stage", "general", f"output_dir={tmp_path / 'o'}"],
                   extra_env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "huggingface-cli download nghuyong/ernie-3.0-base-zh" in errors[0], errors
