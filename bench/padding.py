"""Padding of general-corpus batches (before and after issue 15) and of task batches (before and after
issue 26), and what general-corpus padding does to a distillation step.

Modes, all from the streaming loader (data/stream.py) over the same text:
  before    packing=document, no length grouping, every batch padded to max_seq_len (the old loader)
  document  packing=document, length-grouped windows, padded to the longest row (as for the CPU)
  full      packing=full (sequences filled across documents, [SEP] between), grouped, as for the CPU

For each: the share of padded positions over --pad-batches batches, then content tokens (non-padding)
per CPU-second of a stage-1 distillation step (teacher forward with capture, student forward and
backward through the real DistillationObjective, AdamW step) over --step-batches batches, the modes
taking turns batch by batch so that a slow spell of a shared machine hits all three. CPU-seconds
(time.process_time of this single-threaded process) rather than wall time, because the machine may
be shared. `cuda` is the share the same batches pad when bound for CUDA (widths rounded up to 8,
data/packing.pad_multiple_for).

Task part (--part tasks): for each bundled task, the padded share of one epoch of train batches over
all ranks (what stages 3-4 and teacher finetuning read: data/tasks.TaskLoader) and of the dev batches
(evaluation), `before` as the loader was (the epoch's plain permutation, widths rounded up to 8) and
`after` from the loader as it is. Shapes: the demo (micro-batch 16, 2 ranks, task.max_seq_len 64,
dev batches of 64) or --task-batch/--task-ranks/--task-len for ernie_tiny_en (32, 8, 128).

    python bench/padding.py                                   # bundled corpus, demo shapes (64 x 16)
    python bench/padding.py --part tasks                      # task stages at the demo's shapes
    python bench/padding.py --part tasks --task-batch 32 --task-ranks 8 --task-len 128   # ernie_tiny_en
    python bench/padding.py --seq-len 128 --batch-size 32     # ernie_tiny_en shapes
    python bench/padding.py --text /usr/share/doc
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from teacher_precision import default_teacher, documents  # noqa: E402

from ernie_tiny_ds.config import DataConfig, LossConfig, StudentConfig  # noqa: E402
from ernie_tiny_ds.data.corpus import build_general_loader  # noqa: E402
from ernie_tiny_ds.data.packing import batch_width, collate, pad_multiple_for  # noqa: E402
from ernie_tiny_ds.distill.loss_terms import stage_terms  # noqa: E402
from ernie_tiny_ds.distill.models import FeatureCapture, build_student  # noqa: E402
from ernie_tiny_ds.distill.objective import DistillationObjective, TeacherOutput  # noqa: E402
from ernie_tiny_ds.losses import layer_map  # noqa: E402
from ernie_tiny_ds.stages import STAGE_SPECS  # noqa: E402

MODES = ("before", "document", "full")


def rows(batch) -> list[list[int]]:
    return [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1).tolist())]


def batches(cfg: DataConfig, tokenizer, mode: str, batch_size: int, count: int) -> list[dict]:
    if mode == "before":  # the old loader: the window's plain shuffle (the order for batch size 1), fixed width
        it = iter(build_general_loader(dataclasses.replace(cfg, packing="document"), tokenizer, 1, 0, 1, seed=1))
        return [collate([rows(next(it))[0] for _ in range(batch_size)], cfg.max_seq_len, tokenizer.pad_token_id,
                        multiple=None) for _ in range(count)]
    it = iter(build_general_loader(dataclasses.replace(cfg, packing=mode), tokenizer, batch_size, 0, 1, seed=1))
    return [next(it) for _ in range(count)]


def padded_share(bs) -> float:
    return 1 - sum(int(b["attention_mask"].sum()) for b in bs) / sum(b["attention_mask"].numel() for b in bs)


def cuda_share(bs, max_seq_len: int) -> float:
    """The padded share of the same rows with each batch's width rounded up to 8, as for CUDA."""
    content = sum(int(b["attention_mask"].sum()) for b in bs)
    widths = [batch_width(int(b["attention_mask"].sum(1).max()), max_seq_len, pad_multiple_for("cuda")) for b in bs]
    return 1 - content / sum(w * len(b["attention_mask"]) for w, b in zip(widths, bs))


# --------------------------------------------------------------------------- task batches
def share_of_widths(lengths, batches_of_indices) -> float:
    """Padded share of batches (lists of example indices) padded as the old task loader did: the
    longest row rounded up to 8 (capped at max_seq_len, which the lengths already respect)."""
    content = sum(int(lengths[b].sum()) for b in batches_of_indices)
    positions = sum(len(b) * -(-int(lengths[b].max()) // 8) * 8 for b in batches_of_indices)
    return 1 - content / positions


def task_shares(name: str, tokenizer, batch: int, ranks: int, max_len: int, dev_batch: int) -> dict:
    import numpy as np

    from ernie_tiny_ds.config import TaskConfig
    from ernie_tiny_ds.data.tasks import TaskLoader, iter_dev_batches, load_task, token_lengths

    task = load_task(TaskConfig(name=name, max_seq_len=max_len))
    loaders = [TaskLoader(task, tokenizer, batch, rank, ranks, seed=1, with_labels=True) for rank in range(ranks)]
    per_epoch = loaders[0].batches_per_epoch
    after = [b for loader in loaders for b, _ in zip(iter(loader), range(per_epoch))]
    lengths = loaders[0].lengths
    order = np.random.default_rng([1, 0]).permutation(len(task.train))  # the old loader's epoch 0
    slots = range(per_epoch * ranks)  # batch i of rank r is slot i * ranks + r
    before = [order[slot * batch:(slot + 1) * batch] for slot in slots]
    dev_lengths = token_lengths(task.dev, tokenizer, max_len)
    dev_before = [np.arange(s, min(s + dev_batch, len(task.dev))) for s in range(0, len(task.dev), dev_batch)]
    return {"train_examples": len(task.train), "mean_tokens": round(float(lengths.mean()), 1),
            "train_before": round(share_of_widths(lengths, before), 4), "train_after": round(padded_share(after), 4),
            "dev_before": round(share_of_widths(dev_lengths, dev_before), 4),
            "dev_after": round(padded_share(list(iter_dev_batches(task, tokenizer, dev_batch))), 4)}


def task_part(args, tokenizer) -> None:
    from ernie_tiny_ds.assets import BUNDLED_TASKS

    result = {"batch": args.task_batch, "ranks": args.task_ranks, "max_seq_len": args.task_len,
              "dev_batch": args.dev_batch, "tasks": {}}
    for name in BUNDLED_TASKS:
        result["tasks"][name] = task_shares(name, tokenizer, args.task_batch, args.task_ranks, args.task_len,
                                            args.dev_batch)
    print(json.dumps(result, indent=1))
    print(f"\ntask batches: micro-batch {args.task_batch} x {args.task_ranks} ranks, max_seq_len {args.task_len}, "
          f"dev batches of {args.dev_batch}")
    for name, r in result["tasks"].items():
        print(f"{name:11} train padded {r['train_before']:6.1%} -> {r['train_after']:6.1%}   "
              f"dev padded {r['dev_before']:6.1%} -> {r['dev_after']:6.1%}   ({r['mean_tokens']} tokens/example)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="HF folder (default: the bundled MiniLM-L6-H384)")
    parser.add_argument("--text", default=None, help="file or folder of prose (default: the bundled corpus)")
    parser.add_argument("--chars", type=int, default=2_000_000, help="--text: characters to read")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--pad-batches", type=int, default=200)
    parser.add_argument("--step-batches", type=int, default=12)
    parser.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--part", choices=["general", "tasks"], default="general")
    parser.add_argument("--task-batch", type=int, default=16, help="tasks: micro-batch per rank")
    parser.add_argument("--task-ranks", type=int, default=2)
    parser.add_argument("--task-len", type=int, default=64, help="tasks: task.max_seq_len")
    parser.add_argument("--dev-batch", type=int, default=64, help="tasks: evaluation batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    teacher_dir = args.teacher or default_teacher()
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    if args.part == "tasks":
        task_part(args, tokenizer)
        return
    corpus = None
    if args.text is not None:  # prose documents, one per line, so the loader reads them as the corpus
        work = Path(tempfile.mkdtemp(prefix="padding-bench-"))
        (work / "prose.txt").write_text("".join(d + "\n" for d in documents(Path(args.text), args.chars)))
        corpus = str(work / "prose.txt")
    cfg = DataConfig(corpus=corpus, max_seq_len=args.seq_len, shuffle_buffer=args.shuffle_buffer)

    result = {"text": args.text or "bundled corpus", "seq_len": args.seq_len, "batch_size": args.batch_size,
              "shuffle_buffer": args.shuffle_buffer, "padded_share": {}, "cuda": {}, "mean_width": {}}
    data = {}
    for mode in MODES:
        bs = batches(cfg, tokenizer, mode, args.batch_size, max(args.pad_batches, args.step_batches + 2))
        result["padded_share"][mode] = round(padded_share(bs[:args.pad_batches]), 4)
        # `before` pads every batch to max_seq_len on any device
        result["cuda"][mode] = result["padded_share"][mode] if mode == "before" else \
            round(cuda_share(bs[:args.pad_batches], args.seq_len), 4)
        result["mean_width"][mode] = round(sum(b["input_ids"].shape[1] for b in bs) / len(bs), 1)
        data[mode] = bs

    teacher = transformers.AutoModel.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
    teacher.to(torch.bfloat16 if args.teacher_dtype == "bf16" else torch.float32).requires_grad_(False)
    t_layers = teacher.config.num_hidden_layers
    capture = FeatureCapture(teacher)
    student = build_student(StudentConfig(), teacher.config, seed=0)
    objective = DistillationObjective(student, teacher.config.hidden_size, layer_map(t_layers, 4), LossConfig(),
                                      terms=stage_terms(STAGE_SPECS["general"]))
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> None:
        with torch.no_grad(), capture.recording() as features:
            teacher(**batch)
        total, _ = objective(**batch, teacher=TeacherOutput(features))
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for mode in MODES:  # warm-up: first calls allocate and pick kernels
        step(data[mode][-1])
    cpu = {m: 0.0 for m in MODES}
    content = {m: 0 for m in MODES}
    for i in range(args.step_batches):
        for mode in MODES:
            batch = data[mode][i]
            start = time.process_time()
            step(batch)
            cpu[mode] += time.process_time() - start
            content[mode] += int(batch["attention_mask"].sum())
    result["content_tokens_per_cpu_s"] = {m: round(content[m] / cpu[m], 1) for m in MODES}
    result["step_cpu_s"] = {m: round(cpu[m] / args.step_batches, 4) for m in MODES}
    print(json.dumps(result, indent=1))
    print(f"\n{result['text']}: {args.batch_size} x {args.seq_len}, window {args.shuffle_buffer}, "
          f"teacher {args.teacher_dtype}")
    for m in MODES:
        print(f"{m:9} padded {result['padded_share'][m]:6.1%} (for CUDA {result['cuda'][m]:6.1%})  "
              f"mean width {result['mean_width'][m]:6.1f}  "
              f"{result['content_tokens_per_cpu_s'][m]:8,.0f} content tokens/CPU-s  "
              f"{result['step_cpu_s'][m]:.3f} CPU-s/step")


if __name__ == "__main__":
    main()
