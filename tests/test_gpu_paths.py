"""The code paths only a GPU job takes, reached from a CPU-only machine wherever that is possible.

Audit of every path that differs on CUDA/NCCL, and what covers it:

1. Control-plane collectives (finite flags, loss means, stop requests, the checkpoint choice,
   gathered values) under an NCCL-only default group: `test_control_plane_under_a_group_without_cpu_backend`
   builds that situation on CPU ("cuda:gloo": the group's only backend serves CUDA) on 2 real
   processes and runs every helper. The rank registry uses files, no collective. The best-checkpoint
   Selector of stage 4 and teacher finetuning runs whole under that group too
   (`test_best_checkpoint_selection_under_a_group_without_cpu_backend`).
2. LOCAL_RANK -> the rank's CUDA device, ranks sharing a GPU (gloo) and NCCL's refusal of that:
   `test_local_rank_picks_the_cuda_device` (torch.cuda faked: the mapping is pure arithmetic).
3. Dead-rank detection under NCCL: NCCL raises nothing while it waits for a dead peer (its watchdog
   aborts the process after the timeout, naming no rank).
   `test_a_rank_stuck_where_nccl_leaves_it_is_ended_with_one_line` kills a peer of a rank that is stuck
   with no error coming, as under NCCL; the peer watch must end it with the same line as gloo's path.
   NCCL's own error texts: `test_nccl_error_texts_are_a_lost_peer`.
4. Device placement of batches (labels included), teacher, captured features: the teacher goes
   to `device()` in its dtype and the batch with every key (`test_teacher_and_batch_go_to_the_rank_device`);
   on a real GPU, bench/gpu_acceptance.sh trains every precision (tests/test_gpu.py).
5. A bf16 teacher with an fp32 or a bf16 student: `test_bf16_teacher_with_fp32_and_bf16_student`
   (CPU computes bf16 natively; the losses run in fp32 whatever the inputs).
6. Kernel dispatch on CUDA for every dtype a recipe allows:
   `test_dispatch_picks_triton_for_cuda_tensors_of_each_precision` (the choice reads only device and dtype);
   the compiled kernels themselves: tests/test_gpu.py.
7. DeepSpeed's bf16 optimizer wrapper with ZeRO 1/2/3: `test_bf16_training_under_each_zero_stage` on 2
   real ranks. fp16: DeepSpeed's CPU accelerator has no fp16 training (its loss scaler and fused
   kernels are CUDA-only), so fp16 runs in tests/test_gpu.py only.
8. The ZeRO-3 teacher inference engine: on CPU in test_distill_multirank (two ZeRO-3 engines in one
   process); its CUDA placement: engine_args() hands DeepSpeed device_index() (item 2); run on a
   GPU by bench/gpu_acceptance.sh.
9. Q/K capture hooks and SDPA's flash / memory-efficient kernels: the hooks sit on the query/key
   Linear layers and never ask for attention weights, so SDPA's choice is untouched
   (`test_capture_leaves_sdpa_in_charge`); tests/test_gpu.py runs the capture under an sdpa_kernel
   guard that forbids the math path.
10. CUDA RNG state in checkpoints: `test_cuda_rng_state_round_trips` (torch.cuda faked).
11. Synchronisation before every timing: the speed report synchronises after each forward
    (speed._alternating_medians), bench/step.py at every phase end; the training log's rates are
    taken after the loss has been read on the host (a sync). Read, not testable without a GPU.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed import REPO, env, read_metrics, run_ranks, tiny_recipe


# --------------------------------------------------------------------------- 1. NCCL situation
def _control_plane_worker(rank: int, store_path: str, out_dir: str) -> None:
    import json

    from ernie_tiny_ds.runtime import checkpoint
    from ernie_tiny_ds.runtime import stop as stop_module
    from ernie_tiny_ds.runtime.collectives import all_gather_objects, broadcast_object, control_group, wait_for_rank0
    from ernie_tiny_ds.runtime.rank_registry import describe_peer_loss
    from ernie_tiny_ds.runtime.step import Window
    from ernie_tiny_ds.runtime.stop import StopRequest
    from ernie_tiny_ds.runtime.trainer import PendingStep, reduce_pending

    dist.init_process_group("cuda:gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    results = {}
    try:
        dist.all_reduce(torch.tensor([1.0]))
        results["plain_cpu_all_reduce"] = "accepted"
    except RuntimeError as exc:
        results["plain_cpu_all_reduce"] = str(exc)
    results["separate_group"] = control_group() is not None
    kept = PendingStep(1, ["hidden", "loss"], torch.tensor([float(rank), 1.0 + 2 * rank, 10.0 + rank]),
                       positions=20 + rank, flops=0.0, lr=0.1, skipped=0, at=0.0)
    ((_, results["mean"], *results["tokens_positions"]),) = reduce_pending([kept])  # what the loop logs
    for name, loss in (("finite_all", 0.5), ("finite_one_nan", float("nan") if rank == 1 else 0.5)):
        window = Window()  # the step's finite check, as train_step agrees it at a boundary
        window.add(torch.tensor(loss), {})
        results[name] = window.agreed_finite()
    stop = StopRequest(Path(out_dir) / f"nowhere{rank}")
    results["stop_none"] = stop.requested()
    stop_module._signalled = rank == 1  # SIGUSR1 reached rank 1 only (a process-wide flag)
    results["stop_one"] = stop.requested()
    results["broadcast"] = broadcast_object({"from": rank})
    results["gathered"] = all_gather_objects(rank * 10)
    results["checkpoint_choice"] = checkpoint.agreed_tag(f"step_{rank}")
    wait_for_rank0()  # the rank-0-work wait: a gloo barrier too, so it must not touch the default group
    results["waited_for_rank0"] = True
    results["nccl_abort"] = describe_peer_loss(dist.DistBackendError("NCCL communicator was aborted on rank 0."))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier(group=control_group())
    dist.destroy_process_group()


@pytest.mark.slow
def test_control_plane_under_a_group_without_cpu_backend(tmp_path):
    import json

    mp.start_processes(_control_plane_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(results):
        # the situation is the real one: a CPU tensor on the default group is refused, as under NCCL
        assert "No backend type associated with device type cpu" in got["plain_cpu_all_reduce"]
        assert got["separate_group"] is True
        assert got["mean"] == {"hidden": 0.5, "loss": 2.0} and got["tokens_positions"] == [21.0, 41.0]
        assert got["finite_all"] is True and got["finite_one_nan"] is False
        assert got["stop_none"] is False and got["stop_one"] is True
        assert got["broadcast"] == {"from": 0}
        assert got["gathered"] == [0, 10]
        assert got["waited_for_rank0"] is True
        assert got["checkpoint_choice"] == "step_0"  # rank 0 chooses, every rank follows
        assert got["nccl_abort"].startswith(f"[rank {r}] error: another rank left the job")


def _selector_worker(rank: int, store_path: str, out_dir: str, model_dir: str) -> None:
    import json

    import transformers

    from ernie_tiny_ds.config import TaskConfig
    from ernie_tiny_ds.data.tasks import load_task
    from ernie_tiny_ds.runtime.selection import EvalPlan, Ranks, Selector

    dist.init_process_group("cuda:gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    task = load_task(TaskConfig(name="sentiment", max_seq_len=32, selection_split=0.05))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)  # the same weights on both
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # what teacher finetuning and stage 4 build: scores gathered over ranks, the best exported by rank 0
    selector = Selector(model, tokenizer, Path(out_dir) / "best", EvalPlan(task, 1, 1, "finetune.eval_every"),
                        Ranks(rank, 2, torch.device("cpu"), zero=1), resumed=False)
    selector(1)
    Path(out_dir, f"selector{rank}.json").write_text(json.dumps({"best_score": selector.best_score}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_best_checkpoint_selection_under_a_group_without_cpu_backend(tmp_path, tokenizer_dir, vocab_size):
    """The Selector (stage 4's and teacher finetuning's best checkpoint) gathers its scores and agrees on the
    best through the control plane, so it works under NCCL; its score is the exported model's own."""
    import json

    import transformers

    from ernie_tiny_ds.config import TaskConfig
    from ernie_tiny_ds.data.benchmarks import compute_metrics
    from ernie_tiny_ds.data.tasks import iter_dev_batches, load_task
    from ernie_tiny_ds.workflows.evaluate import predict

    torch.manual_seed(int(time.time_ns() % 2**31))
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "model")
    mp.start_processes(_selector_worker, args=(str(tmp_path / "store"), str(tmp_path), str(tmp_path / "model")),
                       nprocs=2, start_method="spawn")
    scores = [json.loads((tmp_path / f"selector{r}.json").read_text())["best_score"] for r in (0, 1)]
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert scores[0] == scores[1] == best["score"] and best["step"] == 1 and best["split"] == "selection"
    task = load_task(TaskConfig(name="sentiment", max_seq_len=32, selection_split=0.05))
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "best")
    logits, labels = predict(exported, iter_dev_batches(task, tokenizer, 8, task.selection))
    assert compute_metrics("classification", logits, labels)["accuracy"] == pytest.approx(best["score"], abs=1e-12)


def test_a_gloo_default_group_carries_the_control_plane_itself(tmp_path):
    from ernie_tiny_ds.runtime.collectives import _serves_cpu

    assert _serves_cpu("gloo") and _serves_cpu("cpu:gloo,cuda:nccl") and _serves_cpu("GLOO")
    assert not _serves_cpu("nccl") and not _serves_cpu("cuda:gloo") and not _serves_cpu("cuda:nccl")


# --------------------------------------------------------------------------- 2. device mapping
def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("local_rank,count,expected", [(0, 8, 0), (5, 8, 5), (1, 1, 0), (3, 2, 1)])
def test_local_rank_picks_the_cuda_device(monkeypatch, local_rank, count, expected):
    from ernie_tiny_ds.errors import ConfigError
    from ernie_tiny_ds.runtime import engines, process_group

    _fake_cuda(monkeypatch, count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert process_group.device_index() == expected
    assert engines.engine_args().device_rank == expected  # what DeepSpeed's engines are placed on
    monkeypatch.setenv("LOCAL_SIZE", str(local_rank + 1))
    assert process_group.process_group_backend("gloo") == "gloo"
    assert process_group.process_group_backend("auto") is None  # DeepSpeed's choice: NCCL on CUDA
    if local_rank + 1 > count:  # ranks share a GPU: NCCL would fail with "Duplicate GPU detected"
        with pytest.raises(ConfigError, match="train.dist_backend=gloo"):
            process_group.process_group_backend("nccl")
    else:
        assert process_group.process_group_backend("nccl") == "nccl"


def test_nccl_without_cuda_is_one_clear_error(monkeypatch):
    from ernie_tiny_ds.errors import ConfigError
    from ernie_tiny_ds.runtime import process_group

    _fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match="'nccl' needs CUDA"):
        process_group.process_group_backend("nccl")


# --------------------------------------------------------------------------- 3. dead rank under NCCL
STUCK_RANK = """
import sys, time
from pathlib import Path
from ernie_tiny_ds.runtime import rank_registry
rank_registry.register(Path(sys.argv[1]), int(sys.argv[2]), 2)
print("registered", flush=True)
time.sleep(600)  # where NCCL leaves a rank whose peer died: waiting, no error ever raised
"""


@pytest.mark.slow
def test_a_rank_stuck_where_nccl_leaves_it_is_ended_with_one_line(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", STUCK_RANK, str(tmp_path / ".ranks"), str(r)], env=env(),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "registered"
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.time()
        code = procs[0].wait(timeout=30)
        assert time.time() - killed < 10
        err = procs[0].stderr.read()
        assert code == 1
        assert re.fullmatch(rf"\[rank 0\] error: rank 1 \(pid {procs[1].pid}\) left the job [^\n]*\n", err), err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_nccl_error_texts_are_a_lost_peer(monkeypatch):
    from ernie_tiny_ds.runtime import rank_registry

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(rank_registry, "gone_ranks", lambda me, wait_s=2.0: ["rank 0 (pid 77)"])
    for text in ("NCCL communicator was aborted on rank 1.",
                 "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"):
        line = rank_registry.describe_peer_loss(dist.DistBackendError(text))
        assert line.startswith("[rank 1] error: rank 0 (pid 77) left the job"), line
        assert "\n" not in line
    assert rank_registry.describe_peer_loss(RuntimeError("CUDA out of memory")) is None


# --------------------------------------------------------------------------- 4-6, 9, 10 in process
def _tiny_bert(hidden: int, layers: int, labels: int | None = None):
    import transformers

    cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=labels or 2)
    torch.manual_seed(int(time.time_ns() % 2**31))
    if labels is None:
        return transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    return transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")


def _batch(n: int = 3, length: int = 16) -> dict:
    ids = torch.randint(5, 120, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 3, (n,))}


def test_teacher_and_batch_go_to_the_rank_device(monkeypatch):
    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.runtime import engines
    from ernie_tiny_ds.runtime.trainer import on_device

    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", "teacher.dtype=bf16"])
    moved = {}

    class Spy(torch.nn.Module):
        def to(self, *args, **kwargs):
            moved.update(kwargs)
            return self

    monkeypatch.setattr(engines, "device", lambda: torch.device("cpu"))
    assert engines.prepare_teacher(Spy(), recipe, 4) is not None
    assert moved == {"device": torch.device("cpu"), "dtype": torch.bfloat16}
    (batch,) = on_device([_batch()], torch.device("cpu"))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


@pytest.mark.slow
def test_bf16_teacher_with_fp32_and_bf16_student():
    from ernie_tiny_ds.config import LossConfig
    from ernie_tiny_ds.distill.loss_terms import stage_terms
    from ernie_tiny_ds.distill.models import FeatureCapture
    from ernie_tiny_ds.distill.objective import DistillationObjective, TeacherOutput
    from ernie_tiny_ds.stages import STAGE_SPECS

    teacher = _tiny_bert(64, 4, labels=3).eval()
    capture = FeatureCapture(teacher, layers=[2, 4])
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    outs = {}
    for teacher_dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), capture.recording() as features:
            logits = teacher.to(teacher_dtype)(**inputs).logits
        outs[teacher_dtype] = TeacherOutput(features, logits)
        assert outs[teacher_dtype].features.hidden[2].dtype == teacher_dtype
    student = _tiny_bert(32, 2, labels=3)
    objective = DistillationObjective(student, 64, [2, 4], LossConfig(),
                                      terms=stage_terms(STAGE_SPECS["task_specific"]))
    reference, _ = objective(**inputs, teacher=outs[torch.float32], labels=batch["labels"])
    for student_dtype in (torch.float32, torch.bfloat16):
        objective.to(student_dtype).zero_grad()
        total, terms = objective(**inputs, teacher=outs[torch.bfloat16], labels=batch["labels"])
        assert total.dtype == torch.float32  # the loss math runs in fp32 whatever the inputs
        assert set(terms) == {"embedding", "hidden", "attention", "soft_label", "hard_label"}
        total.backward()
        assert torch.isfinite(total)
        assert total.item() == pytest.approx(reference.item(), rel=0.05)
        grads = [p.grad for p in objective.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert {g.dtype for g in grads} == {student_dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatch_picks_triton_for_cuda_tensors_of_each_precision(monkeypatch, dtype):
    from ernie_tiny_ds.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    cuda = types.SimpleNamespace(is_cuda=True, dtype=dtype, device="cuda:0")
    cpu = types.SimpleNamespace(is_cuda=False, dtype=dtype, device="cpu")
    assert dispatch.select_backend("auto", cuda, cuda) == "triton"
    assert dispatch.select_backend("triton", cuda, cuda) == "triton"
    assert dispatch.select_backend("auto", cuda, cpu) == "torch"  # mixed devices never reach a kernel
    assert dispatch.select_backend("torch", cuda, cuda) == "torch"
    f64 = types.SimpleNamespace(is_cuda=True, dtype=torch.float64, device="cuda:0")
    assert dispatch.select_backend("auto", f64, f64) == "torch"  # the float64 reference stays in torch


def test_capture_leaves_sdpa_in_charge():
    from ernie_tiny_ds.distill.models import FeatureCapture

    model = _tiny_bert(32, 2)
    capture = FeatureCapture(model, layers=[1, 2])
    batch = _batch()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None or len(args) > 3)
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), capture.recording() as features:
            out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert len(calls) == 2  # every layer went through SDPA
    assert out.attentions is None and model.config._attn_implementation == "sdpa"
    assert features.q[1].shape == (3, 4, 16, 8) and features.k[2].shape == (3, 4, 16, 8)


def test_cuda_rng_state_round_trips(monkeypatch, tmp_path):
    from ernie_tiny_ds.runtime import checkpoint

    state = {"cuda": torch.randint(0, 255, (16,), dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state["cuda"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.setdefault("cuda", s))
    saved = checkpoint.rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(restored["cuda"], state["cuda"])


# --------------------------------------------------------------------------- 7. DeepSpeed bf16 + ZeRO
@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_bf16_training_under_each_zero_stage(tmp_path, tokenizer_dir, vocab_size, zero):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 4, "save_every": 4})
    run_ranks(["distill", "--config", str(recipe), "--stage", "general", f"deepspeed.config={zero}",
               "train.precision=bf16", "teacher.dtype=bf16", "train.dist_backend=gloo"])
    metrics = read_metrics(tmp_path / "out/general/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert (tmp_path / "out/general/student/model.safetensors").is_file()
    done = json.loads((tmp_path / "out/general/stage_done.json").read_text())  # the export check fit for bf16
    assert 0 <= done["export_error"] <= done["export_error_allowed"] < 0.1, done
    assert done["export_max_abs_diff"] > 0, done  # bf16 engine against the fp32 export: never bit-equal
