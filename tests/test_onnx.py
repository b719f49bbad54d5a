"""ONNX export of exported models: model.onnx with dynamic batch/sequence axes, opset >= 17, equal
to PyTorch within 1e-4 under ONNX Runtime; the `onnx` command, also timing teacher vs student."""
import json

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from distributed import run_cli  # noqa: E402

from ernie_tiny_ds.runtime.export import save_model_folder  # noqa: E402
from ernie_tiny_ds.workflows.onnx_export import OrtModel, check_against_pytorch, export_onnx  # noqa: E402


def save_model(folder, tokenizer_dir, vocab_size, layers=2, hidden=32, head=True):
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=64,
                                     num_labels=3)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    model = cls(config)
    model.config.architectures = [cls.__name__]
    return save_model_folder(model.eval(), tokenizer_dir, folder)


@pytest.mark.parametrize("head", [True, False], ids=["classifier", "encoder"])
def test_export_matches_pytorch_on_other_shapes(tmp_path, tokenizer_dir, vocab_size, head):
    import onnx

    folder = save_model(tmp_path / "student", tokenizer_dir, vocab_size, head=head)
    result = export_onnx(folder, folder / "model.onnx")
    assert result["max_abs_diff"] <= 1e-4, result
    graph = onnx.load(str(folder / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert set(dims) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values()), dims  # symbolic axes
    # batch sizes and lengths the export never saw, padded rows included
    module = transformers.AutoModelForSequenceClassification.from_pretrained(folder) if head \
        else transformers.AutoModel.from_pretrained(folder)
    for batch, seq in ((1, 5), (7, 40)):
        assert check_against_pytorch(folder / "model.onnx", module.eval(), seq_len=seq, batch=batch) <= 1e-4
    # a real sentence through the shipped tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    x = tokenizer(["the river town market", "a small green stone bridge near the old school"], padding=True,
                  return_tensors="pt")
    got = OrtModel(folder / "model.onnx", module.config)(**x)
    with torch.no_grad():
        out = module(**x)
    expected = (out.logits if head else out.last_hidden_state).numpy()
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_onnx_command_times_teacher_and_student_under_both_runtimes(tmp_path, tokenizer_dir, vocab_size):
    student = save_model(tmp_path / "student", tokenizer_dir, vocab_size, layers=1, hidden=32)
    teacher = save_model(tmp_path / "teacher", tokenizer_dir, vocab_size, layers=4, hidden=64)
    proc = run_cli(["onnx", "--model", str(student), "--teacher", str(teacher), "--seq-len", "16",
                    "--repeats", "3", "--threads", "1"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (student / "model.onnx").is_file() and (student / "teacher.onnx").is_file()
    assert "max abs diff" in proc.stdout
    timing = json.loads(proc.stdout[proc.stdout.index("{"):])
    for runtime in ("pytorch", "onnxruntime"):
        for who in ("teacher", "student"):
            assert timing[runtime][who]["latency_ms_batch1"] > 0 and timing[runtime][who]["throughput_batch32"] > 0
        assert timing[runtime]["speedup"] > 0
    assert max(timing["max_abs_diff"].values()) <= 1e-4


def test_onnx_command_bad_folder_is_one_line(tmp_path, in_process):
    code, lines = in_process(["onnx", "--model", str(tmp_path / "missing")])
    assert code == 2
    assert lines[-1:] == [f"error: --model: {tmp_path / 'missing'} is not an exported "
                          "Hugging Face model folder (no config.json)"], lines


@pytest.mark.slow
def test_export_onnx_writes_the_graph_of_the_checkpoints_student(tmp_path, stopped_run):
    """`export --onnx`: the ZeRO checkpoint becomes a folder with model.onnx, and that graph gives the
    exported PyTorch student's outputs under ONNX Runtime on fresh padded inputs."""
    # stopped_run: a copy of the shared stage-1 run in tmp_path, its checkpoint at step 2
    out = tmp_path / "release"
    proc = run_cli(["export", "--checkpoint", str(tmp_path / "out/general/checkpoints"), "--output", str(out),
                    "--onnx"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out / 'model.onnx'}" in proc.stdout
    module = transformers.AutoModel.from_pretrained(out).eval()
    seed = int(np.random.default_rng().integers(1 << 30))
    assert check_against_pytorch(out / "model.onnx", module, seq_len=19, batch=4, seed=seed) <= 1e-4
