"""Fused Triton loss kernels vs an independent float64 reference (and vs losses.py).

On a machine without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET must
be in the environment before the kernel modules are first imported (decoration time), hence
the setdefault above every import of them. Inputs are fresh random tensors on every run.
Errors: |a - b| / |b| for values, ||a - b|| / ||b|| (Frobenius) for gradients.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from attention_reference import (  # noqa: E402
    DEVICE,
    assert_matches_reference,
    qk,
    random_mask,
    ref_attention_fp64,
    ref_soft_label_fp64,
    rel,
)

from ernie_tiny_ds import (
    kernels,  # noqa: E402
    losses,  # noqa: E402
)
from ernie_tiny_ds.kernels import dispatch  # noqa: E402
from ernie_tiny_ds.kernels.attention_transfer_triton import attention_transfer_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

if DEVICE == "cpu" and not dispatch.interpreter_active():
    pytest.fail("no CUDA and the Triton interpreter is off: run with TRITON_INTERPRET=1 "
                "(set before triton kernels are imported)", pytrace=False)


def check_attention(kind, length, hs, ds, ht, dt, relation_heads=None, dtype=torch.float32,
                    teacher_dtype=None, blocks=(None, None), batch=4):
    q_s, k_s = qk(batch, hs, length, ds, dtype, True)
    q_t, k_t = qk(batch, ht, length, dt, teacher_dtype or dtype, False, hf_layout=True)
    mask = random_mask(batch, length)
    out = attention_transfer_triton(q_s, k_s, q_t, k_t, mask, kind, relation_heads, *blocks)
    out.backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    assert q_s.grad.dtype == dtype and k_s.grad.dtype == dtype

    tol = TOL[dtype]
    assert_matches_reference(out, q_s, k_s, q_t, k_t, mask, kind, relation_heads, tol)
    # the package reference (float32 math) agrees too
    ref32 = losses.attention_transfer_loss(q_s.detach(), k_s.detach(), q_t, k_t, mask, kind, relation_heads)
    assert abs(out.item() - ref32.item()) <= tol * abs(ref32.item())


# --------------------------------------------------------------------------- attention transfer
@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_fp32_multi_block_padding_head_dims(kind):
    # L=37 with 16x32 tiles: partial last blocks on both axes; teacher d=16, student d=8
    check_attention(kind, length=37, hs=2, ds=8, ht=2, dt=16, blocks=(16, 32))


@pytest.mark.parametrize("kind, relation_heads, blocks", [("kl", 4, (64, 64)), ("mse", 2, (32, 64))])
def test_attention_fp32_relation_heads(kind, relation_heads, blocks):
    # student 4 heads x d6, teacher 2 heads x d16 (d not a power of 2 on the student side); L=70
    check_attention(kind, length=70, hs=4, ds=6, ht=2, dt=16, relation_heads=relation_heads, blocks=blocks)


@pytest.mark.parametrize("kind, dtype, teacher_dtype", [("kl", torch.bfloat16, torch.bfloat16),
                                                         ("mse", torch.bfloat16, torch.float32),
                                                         ("kl", torch.float16, torch.float16)])
def test_attention_half_precision(kind, dtype, teacher_dtype):
    check_attention(kind, length=37, hs=2, ds=16, ht=2, dt=32, dtype=dtype, teacher_dtype=teacher_dtype,
                    blocks=(32, 16))


def test_small_kl_of_a_near_converged_student_stays_accurate():
    # student = teacher + small noise: KL ~1e-4, where lse_s - lse_t cancels (fp32 noise floor ~1e-4 relative)
    q_t, k_t = qk(2, 2, 64, 16, torch.float32, False)
    q_s, k_s = (x + 0.01 * torch.randn_like(x) for x in (q_t, k_t))
    mask = random_mask(2, 64)
    got = kernels.attention_transfer(q_s, k_s, q_t, k_t, mask, "kl").item()
    want = ref_attention_fp64(q_s, k_s, q_t, k_t, mask, "kl", None).item()
    assert 0 < want < 1e-3 and abs(got - want) <= 1e-3 * want, (got, want)
    t = torch.randn(64, 1000, device=DEVICE) * 3
    s = t + 0.03 * torch.randn_like(t)
    got, want = kernels.soft_label(s, t, 2.0).item(), ref_soft_label_fp64(s, t, 2.0).item()
    assert 0 < want < 1e-3 and abs(got - want) <= 1e-3 * want, (got, want)


def test_attention_teacher_gets_no_grad_and_all_padded_batch_is_zero():
    q_s, k_s = qk(2, 2, 20, 8, torch.float32, True)
    q_t, k_t = qk(2, 2, 20, 8, torch.float32, True)
    mask = torch.zeros(2, 20, dtype=torch.long, device=DEVICE)
    out = kernels.attention_transfer(q_s, k_s, q_t, k_t, mask, "kl")
    out.backward()
    assert out.item() == 0.0 and q_s.grad.abs().max() == 0 and k_s.grad.abs().max() == 0
    assert q_t.grad is None and k_t.grad is None
    mask[:, :13] = 1
    q_s.grad = None
    kernels.attention_transfer(q_s, k_s, q_t, k_t, mask, "mse").backward()
    assert q_s.grad[:, :, :13].abs().max() > 0 and q_s.grad[:, :, 13:].abs().max() == 0


def test_attention_bad_input_errors():
    q_s, k_s = qk(2, 2, 20, 8, torch.float32, False)
    mask = torch.ones(2, 20, device=DEVICE)
    with pytest.raises(ValueError, match="attention kind"):
        kernels.attention_transfer(q_s, k_s, q_s, k_s, mask, "cosine")
    with pytest.raises(ValueError, match="attention_mask must be"):
        kernels.attention_transfer(q_s, k_s, q_s, k_s, mask[:, :5])
    with pytest.raises(ValueError, match="dtype torch.float64"):
        kernels.attention_transfer(q_s.double(), k_s.double(), q_s, k_s, mask)
    with pytest.raises(ValueError, match="does not divide"):
        kernels.attention_transfer(q_s, k_s, q_s, k_s, mask, relation_heads=3)
    with pytest.raises(ValueError, match="power of 2"):
        attention_transfer_triton(q_s, k_s, q_s, k_s, mask, block_m=24)


# --------------------------------------------------------------------------- soft label
@pytest.mark.parametrize("shape, temperature, dtype", [((300, 2), 2.0, torch.float32),
                                                       ((3, 30522), 1.0, torch.float32),
                                                       ((2, 5, 7), 0.5, torch.float32),
                                                       ((4, 1000), 3.0, torch.bfloat16),
                                                       ((64, 3), 1.5, torch.float16)])
def test_soft_label_matches_fp64(shape, temperature, dtype):
    s = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    t = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = kernels.soft_label(s, t, temperature)
    out.backward()
    leaf = s.detach().double().requires_grad_()
    want = ref_soft_label_fp64(leaf, t, temperature)
    want.backward()
    tol = TOL[dtype]
    assert out.dtype == torch.float32 and s.grad.dtype == dtype and s.grad.shape == s.shape
    assert abs(out.item() - want.item()) <= tol * abs(want.item()), (out.item(), want.item())
    assert rel(s.grad, leaf.grad) <= tol
    ref32 = losses.soft_label_loss(s.detach(), t, temperature)
    assert abs(out.item() - ref32.item()) <= tol * abs(ref32.item())


def test_soft_label_bad_input_errors():
    s = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="temperature"):
        kernels.soft_label(s, s, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.soft_label(s, s[:, :2], 1.0)
    with pytest.raises(ValueError, match="at least one row"):
        kernels.soft_label(s[:0], s[:0], 1.0)


def test_every_path_rejects_bad_input_with_the_same_message():
    # the checks live once in dispatch: the kernels and the torch path say the same thing
    from ernie_tiny_ds.kernels.attention_transfer_torch import attention_transfer_torch
    q_s, k_s = qk(2, 2, 12, 8, torch.float32, False)
    mask = torch.ones(2, 12, device=DEVICE)
    for path in (attention_transfer_triton, attention_transfer_torch):
        with pytest.raises(ValueError, match="attention kind must be one of"):
            path(q_s, k_s, q_s, k_s, mask, "cosine")
        with pytest.raises(ValueError, match="differ in batch or length"):
            path(q_s, k_s, q_s[:, :, :5], k_s[:, :, :5], mask)
    with pytest.raises(ValueError, match="same dtype"):
        attention_transfer_triton(q_s, k_s.half(), q_s, k_s, mask)
    logits = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="student_logits has dtype torch.float64"):
        kernels.soft_label(logits.double(), logits, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dispatch.soft_label(logits, logits, -1.0, backend="torch")


# --------------------------------------------------------------------------- dispatch and torch path
def test_dispatch_auto_on_cpu_is_the_torch_path():
    from ernie_tiny_ds.kernels.attention_transfer_torch import attention_transfer_torch
    q_s, k_s = qk(2, 2, 9, 4, torch.float32, False)
    mask = random_mask(2, 9)
    logits = torch.randn(5, 4, device=DEVICE)
    if DEVICE == "cpu":
        assert dispatch.select_backend("auto", q_s, k_s) == "torch"
        want = attention_transfer_torch(q_s, k_s, q_s.flip(0), k_s, mask)
        assert torch.equal(dispatch.attention_transfer(q_s, k_s, q_s.flip(0), k_s, mask), want)
        assert torch.equal(dispatch.soft_label(logits, logits.flip(0), 2.0),
                           losses.soft_label_loss(logits, logits.flip(0), 2.0))
    else:
        assert dispatch.select_backend("auto", q_s, k_s) == "triton"
    # float64 is not a kernel dtype: auto keeps the torch path, on any device
    assert dispatch.select_backend("auto", logits.double()) == "torch"
    assert dispatch.select_backend("torch", logits) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.soft_label(logits, logits, 1.0, backend="cuda")


def test_dispatch_triton_backend_runs_the_kernels():
    q_s, k_s = qk(2, 2, 9, 4, torch.float32, False)
    q_t, k_t = qk(2, 2, 9, 4, torch.float32, False)
    mask = random_mask(2, 9)
    got = dispatch.attention_transfer(q_s, k_s, q_t, k_t, mask, "mse", backend="triton", query_chunk=3)
    assert abs(got.item() - ref_attention_fp64(q_s, k_s, q_t, k_t, mask, "mse", None).item()) <= 1e-5 * got.item()
    logits = torch.randn(5, 4, device=DEVICE)
    got = dispatch.soft_label(logits, logits.flip(0), 2.0, backend="triton")
    assert abs(got.item() - ref_soft_label_fp64(logits, logits.flip(0), 2.0).item()) <= 1e-5 * got.item()


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only error path")
def test_dispatch_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    logits = torch.randn(5, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.soft_label(logits, logits, 1.0, backend="triton")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only error path")
def test_dispatch_triton_when_interpreter_was_set_too_late():
    # kernels decorated before TRITON_INTERPRET was set are compiled code: dispatch must say so, not crash later
    code = ("import os, torch\n"
            "from ernie_tiny_ds.kernels import dispatch\n"
            "import ernie_tiny_ds.kernels.soft_label_triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "x = torch.randn(3, 4)\n"
            "try:\n"
            "    dispatch.soft_label(x, x, 1.0, backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERROR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "before triton is first imported" in out.stdout


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_torch_query_chunk_equals_unchunked(kind):
    q_s, k_s = qk(3, 2, 23, 8, torch.float32, True)
    q_t, k_t = qk(3, 2, 23, 8, torch.float32, False)
    mask = random_mask(3, 23)
    results = []
    for chunk in (None, 5):
        q_s.grad = k_s.grad = None
        value = dispatch.attention_transfer(q_s, k_s, q_t, k_t, mask, kind, backend="torch", query_chunk=chunk)
        value.backward()
        results.append((value.detach(), q_s.grad.clone(), k_s.grad.clone()))
    (v0, dq0, dk0), (v1, dq1, dk1) = results
    assert abs(v1.item() - v0.item()) <= 1e-6 * abs(v0.item())
    assert rel(dq1, dq0) <= 1e-6 and rel(dk1, dk0) <= 1e-6


# --------------------------------------------------------------------------- GPU code path without a GPU
GPU_COMPILE = r'''
import importlib, os, re, subprocess, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
at = importlib.import_module("ernie_tiny_ds.kernels.attention_transfer_triton")
sl = importlib.import_module("ernie_tiny_ds.kernels.soft_label_triton")
assert not at._INTERPRETED
TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def build(kernel, meta, pointers, name):
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps", 4)}
    sig = {n: "constexpr" if n in meta else pointers.get(n, "fp32" if n in ("scale_s", "scale_t", "temperature")
                                                         else "i32") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, meta), target=GPUTarget("cuda", 90, 32), options=options)
    stack = "?"
    if os.path.exists(CUOBJDUMP):
        with open(os.environ["CUBIN_PATH"], "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", os.environ["CUBIN_PATH"]], capture_output=True, text=True)
        stack = re.search(r"STACK:(\d+)", usage.stdout).group(1)
    # stack > 0: registers spilled to local memory
    print(name, "mma" in compiled.asm["ptx"], "stack", stack)

for dtype in (torch.bfloat16, torch.float32):
    q_s, q_t = torch.empty(1, 1, 1, 26, dtype=dtype), torch.empty(1, 1, 1, 64, dtype=dtype)
    pointers = {n: "*" + TY[dtype] for n in ("QS", "KS", "QT", "KT")}
    pointers.update({n: "*fp32" for n in ("ROWS", "LSE_S", "LSE_T", "D_ROWS", "DX")}, MASK="*i32")
    meta = at._meta(q_s, q_t, True, at.default_tiling(512, dtype == torch.float32))
    # the backward kernel compiles once per walk order (KEY_MAJOR is a constexpr)
    for name, kernel, walk in (("fwd", at._attention_transfer_fwd, {}),
                               ("bwd dQ", at._attention_transfer_bwd, {"KEY_MAJOR": False}),
                               ("bwd dK", at._attention_transfer_bwd, {"KEY_MAJOR": True})):
        build(kernel, {**meta, **walk}, pointers, f"_attention_transfer {name} {TY[dtype]}")
for kernel in (sl._soft_label_fwd, sl._soft_label_bwd):
    pointers = {"S": "*bf16", "T": "*bf16", "DS": "*fp32", "ROWS": "*fp32", "LSE_S": "*fp32", "LSE_T": "*fp32",
                "D_ROWS": "*fp32"}
    for rows, classes in ((8, 30522), (1000, 2)):
        block_r, block_c = sl._blocks(rows, classes)
        build(kernel, dict(BLOCK_R=block_r, BLOCK_C=block_c), pointers, f"{kernel.fn.__name__} {block_r}x{block_c}")
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_cuda_sm90_without_a_gpu(tmp_path):
    """The compiled (non-interpreted) path: every kernel lowers to an H100 cubin with the bundled
    toolchain at its default tiling, without register spills; bf16 scores use tensor cores (mma),
    fp32 stays full precision (no TF32 mma)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["CUBIN_PATH"] = str(tmp_path / "kernel.cubin")
    out = subprocess.run([sys.executable, "-c", GPU_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().split("\n")
    assert lines[-1] == "compiled" and len(lines) == 11, out.stdout
    for line in lines[:-1]:
        assert line.endswith(" stack 0") or line.endswith(" stack ?"), out.stdout
    attention = [line for line in lines if line.startswith("_attention")]
    assert [" bf16 True" in line for line in attention] == [True] * 3 + [False] * 3, out.stdout
    assert [" fp32 False" in line for line in attention] == [False] * 3 + [True] * 3, out.stdout
