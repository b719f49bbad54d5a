"""CUDA-only checks: the compiled Triton kernels, the SDPA capture path, one real training run per
precision and the export of a run trained on the GPU.

Run by bench/gpu_acceptance.sh on a GPU machine (`python -m pytest -q -m gpu tests/test_gpu.py`,
TRITON_INTERPRET unset so the kernels are compiled); every test is skipped where
torch.cuda.is_available() is False. Only public import paths of the package are used
(ernie_tiny_ds.losses, ernie_tiny_ds.kernels, the CLI), plus FeatureCapture from wherever it lives.

Kernels are compared with the package's torch reference (ernie_tiny_ds.losses) evaluated in float64
on CPU on the very same (already rounded) inputs, so the tolerance measures the kernel alone.
Inputs are fresh random tensors on every run. Errors: |a - b| / |b| for values, ||a - b|| / ||b||
(Frobenius) for gradients.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import REPO, env, read_metrics, tiny_recipe

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(autouse=True)
def compiled_kernels():
    """The point of these tests is the compiled kernels: the interpreter must be off."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.fail("TRITON_INTERPRET is set: unset it so that the Triton kernels are compiled for the GPU",
                    pytrace=False)
    yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """[B, L] of 1 = token, 0 = padding: one full row, then right padding at random cuts, one row with
    random holes (first token kept); every row keeps at least 2 tokens."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        if row % 3 == 2:
            mask[row] = (torch.rand(length) > 0.35).long()
            mask[row, :2] = 1
        else:
            mask[row, torch.randint(2, length - 1, ()).item():] = 0
    assert mask.sum() < mask.numel()  # some positions are padded
    return mask.cuda()


# --------------------------------------------------------------------------- attention transfer
ATTENTION_SHAPES = [
    # batch, heads (student, teacher), length, head dims (student, teacher), relation heads
    dict(batch=4, hs=4, ht=4, length=100, ds=16, dt=32, relation_heads=None),   # partial tiles, d_s != d_t
    dict(batch=3, hs=12, ht=6, length=77, ds=26, dt=64, relation_heads=6),      # ERNIE-Tiny head width 26
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=["plain", "relation-heads"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_transfer_kernel_matches_float64_reference(kind, dtype, shape):
    from ernie_tiny_ds import kernels, losses

    b, length = shape["batch"], shape["length"]
    q_s, k_s = [(torch.randn(b, shape["hs"], length, shape["ds"], device="cuda") * 1.5).to(dtype).requires_grad_()
                for _ in range(2)]
    # the teacher's Q/K as attention layers make them: [B, L, H, d] viewed as [B, H, L, d]
    q_t, k_t = [(torch.randn(b, length, shape["ht"], shape["dt"], device="cuda") * 1.5).to(dtype).transpose(1, 2)
                for _ in range(2)]
    mask = padding_mask(b, length)

    out = kernels.attention_transfer(q_s, k_s, q_t, k_t, mask, kind, shape["relation_heads"])
    out.backward()
    torch.cuda.synchronize()
    assert out.is_cuda and out.dtype == torch.float32 and out.dim() == 0
    assert q_s.grad.dtype == dtype and k_s.grad.dtype == dtype

    leaves = [x.detach().cpu().double().requires_grad_() for x in (q_s, k_s)]
    want = losses.attention_transfer_loss(*leaves, q_t.detach().cpu().double(), k_t.detach().cpu().double(),
                                          mask.cpu(), kind, shape["relation_heads"])
    want.backward()
    tol = TOL[dtype]
    assert math.isfinite(out.item()) and want.item() > 0
    assert abs(out.item() - want.item()) <= tol * abs(want.item()), (out.item(), want.item())
    assert rel(q_s.grad, leaves[0].grad) <= tol, rel(q_s.grad, leaves[0].grad)
    assert rel(k_s.grad, leaves[1].grad) <= tol, rel(k_s.grad, leaves[1].grad)
    # padded positions take part in no query row and no key column: no gradient there
    padded = ~mask.bool().cpu()
    for grad in (q_s.grad, k_s.grad):
        assert grad.float().cpu().permute(0, 2, 1, 3)[padded].abs().max() == 0


# --------------------------------------------------------------------------- soft label
@pytest.mark.parametrize("shape, temperature", [((512, 2), 2.0), ((64, 30522), 1.0), ((3, 7, 1000), 0.5)],
                         ids=["2-classes", "30k-vocab", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_soft_label_kernel_matches_float64_reference(shape, temperature, dtype):
    from ernie_tiny_ds import kernels, losses

    s = (torch.randn(shape, device="cuda") * 3).to(dtype).requires_grad_()
    t = (torch.randn(shape, device="cuda") * 3).to(dtype)
    out = kernels.soft_label(s, t, temperature)
    out.backward()
    torch.cuda.synchronize()
    assert out.is_cuda and out.dtype == torch.float32
    assert s.grad.dtype == dtype and s.grad.shape == s.shape

    leaf = s.detach().cpu().double().requires_grad_()
    want = losses.soft_label_loss(leaf, t.detach().cpu().double(), temperature)
    want.backward()
    tol = TOL[dtype]
    assert abs(out.item() - want.item()) <= tol * abs(want.item()), (out.item(), want.item())
    assert rel(s.grad, leaf.grad) <= tol, rel(s.grad, leaf.grad)


# --------------------------------------------------------------------------- SDPA capture path
def _feature_capture():
    try:
        from ernie_tiny_ds.distill.models import FeatureCapture
    except ImportError:
        from ernie_tiny_ds.distill.models import FeatureCapture
    return FeatureCapture


def test_capture_hooks_keep_sdpa_on_the_fused_backends():
    """A BERT with SDPA attention in bf16, capture hooks attached, runs forward and backward with only
    the flash / memory-efficient SDPA kernels allowed (the math fallback would raise), and the captured
    Q/K are the [B, H, L, d] projections of each layer's input."""
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    FeatureCapture = _feature_capture()
    config = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=256, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    capture = FeatureCapture(model)
    batch, length, heads, d = 4, 96, 4, 64
    ids = torch.randint(5, 1000, (batch, length), device="cuda")
    mask = padding_mask(batch, length)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with capture.recording() as features:
            out = model(input_ids=ids, attention_mask=mask)
        loss = sum(features.q[i].float().pow(2).mean() + features.k[i].float().pow(2).mean() for i in features.q)
        (loss + out.last_hidden_state.float().pow(2).mean()).backward()
    torch.cuda.synchronize()

    assert set(features.q) == set(features.k) == {1, 2, 3} and set(features.hidden) == {0, 1, 2, 3}
    for layer in (1, 2, 3):
        q, k = features.q[layer], features.k[layer]
        assert q.shape == k.shape == (batch, heads, length, d), q.shape
        assert q.is_cuda and q.dtype == torch.bfloat16
        attention = model.encoder.layer[layer - 1].attention.self
        with torch.no_grad():
            want_q = attention.query(features.hidden[layer - 1]).view(batch, length, heads, d).transpose(1, 2)
        assert torch.allclose(q.float(), want_q.float(), atol=1e-2, rtol=1e-2)
    assert torch.isfinite(out.last_hidden_state.float()).all()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("pooler.")}  # pooler: unused
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g.float()).all()]
    # the fused path computes what eager attention computes (fp32 eager copy, valid tokens only)
    eager = transformers.AutoModel.from_config(config, attn_implementation="eager").cuda()
    eager.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert rel(out.last_hidden_state.float()[valid], want[valid]) <= 3e-2
    del capture  # hooks stay on this model; nothing else runs it


def test_the_ernie_tiny_student_keeps_a_fused_sdpa_backend():
    """Head dim 26 (312 / 12): plain SDPA has no fused kernel for it with a padding mask, the student's
    padded heads do. Only the memory-efficient and cuDNN kernels are allowed (flash refuses a mask, the
    math fallback is the path the padding avoids), so a fallback would raise."""
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ernie_tiny_ds.config import StudentConfig
    from ernie_tiny_ds.distill.models import build_student

    teacher = transformers.BertConfig(vocab_size=1000, hidden_size=768, num_attention_heads=12,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(StudentConfig(), teacher, seed=0).cuda().to(torch.bfloat16)
    ids = torch.randint(5, 1000, (4, 96), device="cuda")
    mask = padding_mask(4, 96)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        out = student(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for n, p in student.named_parameters() if ".query." in n)

    # a config of its own: the attention implementation is stored on the config object
    plain = transformers.AutoModel.from_config(copy.deepcopy(student.config), attn_implementation="sdpa")
    plain = plain.cuda().to(torch.bfloat16)
    plain.load_state_dict(student.state_dict())
    with sdpa_kernel(fused), pytest.raises(RuntimeError):  # what the padding is for
        plain(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # the math path
    valid = mask.bool()
    assert rel(out.float()[valid], want[valid]) <= 2e-2


# --------------------------------------------------------------------------- real training runs
PRECISIONS = ["fp32", "bf16", "fp16"]
# one run per precision, and one with the recipe defaults (train.precision and data.num_workers auto)
# under the bundled ZeRO-3 JSON (overlap_comm on, stage3_param_persistence_threshold 1e5)
RUN_ARGS = {**{precision: [f"train.precision={precision}"] for precision in PRECISIONS},
            "defaults_zero3": ["deepspeed.config=zero3"]}


class Runs:
    """`ernie_tiny_ds.cli distill --stage general` for 2 steps on the GPU, one process per RUN_ARGS entry,
    all started at once when the module's first test starts (they overlap the kernel tests)."""

    def __init__(self, tmp_path_factory, tokenizer_dir: str, vocab_size: int):
        self.procs, self.results = {}, {}
        for name, extra in RUN_ARGS.items():
            tmp = tmp_path_factory.mktemp(f"distill_{name}")
            recipe = tiny_recipe(tmp, tokenizer_dir, vocab_size)
            args = [sys.executable, "-m", "ernie_tiny_ds.cli", "distill", "--config", str(recipe), "--stage",
                    "general", "train.max_steps=2", *extra, "losses.kernels=triton"]
            log = open(tmp / "log.txt", "w+")
            proc = subprocess.Popen(args, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            self.procs[name] = (proc, log, tmp / "out")

    def result(self, name: str, timeout: float = 240) -> tuple[int, str, Path]:
        """(exit code, output, output_dir) of that run (a precision, or defaults_zero3), waiting for it."""
        if name not in self.results:
            proc, log, out = self.procs[name]
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.seek(0)
            self.results[name] = (code, log.read(), out)
            log.close()
        return self.results[name]

    def close(self) -> None:
        for proc, log, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module", autouse=True)
def precision_runs(tmp_path_factory, tokenizer_dir, vocab_size):
    runs = Runs(tmp_path_factory, tokenizer_dir, vocab_size)
    yield runs
    runs.close()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_training_run_per_precision(precision_runs, precision):
    code, output, out = precision_runs.result(precision)
    assert code == 0, f"exit {code}\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    metrics = read_metrics(out / "general" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2], metrics
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics), metrics
    done = json.loads((out / "general" / "stage_done.json").read_text())
    assert done["steps"] == 2


def test_student_trained_on_the_gpu_exports_and_loads(precision_runs):
    import transformers

    code, output, out = precision_runs.result("bf16")
    assert code == 0, f"exit {code}\n{output[-6000:]}"
    student_dir = out / "general" / "student"
    model = transformers.AutoModel.from_pretrained(str(student_dir))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32  # tiny_recipe's student
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(student_dir))
    batch = tokenizer(["the river town market", "a small green island"], padding=True, return_tensors="pt")
    model = model.cuda().eval()
    with torch.no_grad():
        hidden = model(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state
    assert hidden.is_cuda and hidden.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(hidden.float()).all()


# --------------------------------------------------------------------------- GPU defaults (issue 26 item 3)
AMPERE = torch.cuda.get_device_capability() >= (8, 0) if CUDA else False


@pytest.mark.skipif(not AMPERE, reason="train.precision auto is bf16 only on Ampere and newer")
def test_defaults_train_bf16_under_zero3_with_the_new_persistence_threshold(precision_runs):
    """The recipe defaults on an Ampere+ GPU: the stage trains in bf16 (what its fingerprint records),
    its loader has workers, and ZeRO-3 with stage3_param_persistence_threshold 1e5 (every parameter of
    the tiny student stays gathered) and overlap_comm on runs its steps."""
    from ernie_tiny_ds.data.workers import default_num_workers

    code, output, out = precision_runs.result("defaults_zero3")
    assert code == 0, f"exit {code}\n{output[-6000:]}"
    assert "ZeRO-3" in output and "Traceback" not in output, output[-6000:]
    metrics = read_metrics(out / "general" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics), metrics
    recorded = json.loads((out / "general" / "stage_done.json").read_text())["recipe"]
    assert recorded["train"]["precision"] == "bf16"
    assert recorded["data"]["num_workers"] == default_num_workers(torch.device("cuda", 0)) > 0


@pytest.mark.skipif(not AMPERE, reason="train.precision auto is bf16 only on Ampere and newer")
def test_auto_resolves_to_bf16_and_fp32_products_use_tf32():
    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.runtime.device_defaults import prepare_for_device

    dev = torch.device("cuda", 0)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    a, b = torch.randn(1024, 1024, device=dev), torch.randn(1024, 1024, device=dev)
    exact = a.double() @ b.double()
    try:
        resolved = prepare_for_device(load_recipe(None, ["teacher.config={}"]), dev)
        assert resolved.train.precision == "bf16" and torch.backends.cuda.matmul.allow_tf32
        tf32 = rel(a @ b, exact)
        prepare_for_device(load_recipe(None, ["teacher.config={}", "train.precision=fp32"]), dev)
        assert not torch.backends.cuda.matmul.allow_tf32
        fp32 = rel(a @ b, exact)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # TF32 keeps 10 mantissa bits (relative error ~1e-4 here), IEEE fp32 23 (~1e-6)
    assert fp32 < 1e-5 < tf32, (fp32, tf32)


def test_cuda_loaders_have_workers_and_hand_out_pinned_batches(tmp_path, tokenizer_dir):
    """data.num_workers auto on CUDA: DataLoader workers for the general corpus and the task, batches in
    page-locked memory, and on_device's non-blocking copy gives the same values on the GPU."""
    from distributed import write_corpus

    from ernie_tiny_ds.config import DataConfig, TaskConfig
    from ernie_tiny_ds.data.corpus import build_general_loader
    from ernie_tiny_ds.data.tasks import build_task_loader
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    from ernie_tiny_ds.data.workers import Loading
    from ernie_tiny_ds.runtime.trainer import on_device

    dev = torch.device("cuda", 0)
    tokenizer = load_tokenizer(tokenizer_dir)
    loading = Loading.for_device("auto", dev)
    assert loading.num_workers > 0 and loading.pin_memory
    general = build_general_loader(DataConfig(corpus=str(write_corpus(tmp_path / "corpus")), max_seq_len=32),
                                   tokenizer, 4, 0, 1, seed=0, device=dev)
    task = build_task_loader(TaskConfig(name="sentiment", max_seq_len=32), tokenizer, 8, 0, 1, 0,
                             with_labels=True, loading=loading)
    for loader in (general, task):
        assert loader.loading == loading
        it = iter(loader)
        batches = [next(it) for _ in range(3)]
        it.close()
        assert all(value.is_pinned() for batch in batches for value in batch.values())
        moved = list(on_device(batches, dev))
        torch.cuda.synchronize()
        assert all(m[k].is_cuda and torch.equal(m[k].cpu(), b[k]) for m, b in zip(moved, batches) for k in b)
