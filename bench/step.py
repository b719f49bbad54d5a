"""One General Distillation step: ernie-tiny-ds against the way common recipes write it.

    python bench/step.py --size tiny  --seq-len 128                      # CPU, bundled corpus
    python bench/step.py --size tiny  --seq-len 128 --text /usr/share/doc  # CPU, real English prose
    python bench/step.py --size base  --seq-len 512 --precision bf16     # GPU: BERT-base -> 4L-312

ours      the real stage-1 parts of ernie-tiny-ds (train.build_parts: SDPA models with capture hooks,
          the DeepSpeed engine over student + projections with torch's fused AdamW, attention
          transfer from Q/K through the kernel dispatch: fused Triton on CUDA, elsewhere the torch
          path with its closed-form backward) and the trainer's step (runtime.step.train_step), on
          the batches its loader makes with the recipe's defaults (length-grouped within the
          shuffle window, padded to the batch's longest row rounded up to 8, data.packing).
baseline  the common recipe: the same weights as Hugging Face models run with output_attentions=True
          and output_hidden_states=True (eager attention, the whole teacher with its pooler, in
          fp32 whatever the student's precision), the same latent loss computed on the
          materialised attention maps, a plain torch AdamW, and batches of one document piece per
          row in the plain shuffle order, padded to max_seq_len.

Batches are real (--batches corpus, the default): both sides read the same text (the bundled corpus,
or --text prose, e.g. /usr/share/doc) through the project's tokenizer and streaming reader, so they
carry about the same content tokens, and the comparison that counts is time per content (non-pad)
token; per step is shown too. --batches random keeps the synthetic lengths (50-100% of L) that the
GPU memory searches use. With --batch auto (GPU) each side runs the largest power-of-two batch it
fits, and content tokens/s is the comparison. Steps are timed alternately in this process (rounds of
--steps each, the median round counts). Peak memory: CUDA max_memory_allocated on GPU; on CPU each side
runs again in its own subprocess and reports its peak resident set during the steps (VmHWM, reset
just before) above the resident set before them.
MFU counts the teacher forward and the student forward + backward matrix products (the trainer's
count, runtime/flops.py) of the content tokens only (padding is not useful work) against the
measured dense matmul rate of this device. --max-seq also
searches, on GPU, the longest sequence each side fits at batch 8 within the memory the baseline
needs at --seq-len. --phases adds, per side, the median time of each phase of a step and the
profiler's time in matrix products.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # teacher, student (hidden, layers, heads, ffn)
    "tiny": ((256, 4, 4, 1024), (128, 2, 4, 512)),
    "small": ((384, 6, 12, 1536), (312, 4, 12, 1200)),  # MiniLM-L6-H384 -> ERNIE-Tiny
    "base": ((768, 12, 12, 3072), (312, 4, 12, 1200)),  # BERT-base -> ERNIE-Tiny
}


def recipe_for(args, max_positions: int, corpus: str | None):
    import yaml

    from ernie_tiny_ds.config import from_dict

    (th, tl, tH, tf), (sh, sl, sH, sf) = SIZES[args.size]
    values = {
        "output_dir": str(Path(args.workdir)),
        "teacher": {"config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": th, "num_hidden_layers": tl,
                               "num_attention_heads": tH, "intermediate_size": tf,
                               "max_position_embeddings": max_positions, "hidden_dropout_prob": 0.0,
                               "attention_probs_dropout_prob": 0.0}},
        "student": {"hidden_size": sh, "num_hidden_layers": sl, "num_attention_heads": sH, "intermediate_size": sf},
        "data": {"max_seq_len": args.seq_len, "corpus": corpus},
        "losses": {"kernels": "auto"},
        "train": {"max_steps": 10 ** 6, "micro_batch_size": 8 if args.batch == "auto" else int(args.batch),
                  "precision": args.precision,
                  "progress_bar": False},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0},
        "deepspeed": {"config": args.zero_config},
    }
    for item in args.set:  # recipe keys beyond the defaults, for our side: e.g. teacher.dtype=bf16
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes section.key=value, got {item!r}")
        *sections, leaf = key.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(values)


def random_batches(n: int, batch: int, seq_len: int, device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
        for row, length in enumerate(lengths.tolist()):
            mask[row, length:] = 0
            ids[row, length:] = 0
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "token_type_ids": torch.zeros_like(ids).to(device)})
    return out


def prose_corpus(args) -> str | None:
    """--text as a corpus file of one prose paragraph per line (None: the recipe's default corpus)."""
    if args.text is None:
        return None
    from teacher_precision import documents

    path = Path(args.workdir) / "prose.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d + "\n" for d in documents(Path(args.text), args.chars)), encoding="utf-8")
    return str(path)


def corpus_batches(recipe, tokenizer, side: str, count: int, batch: int, device) -> list[dict]:
    """`count` real batches: ours as the recipe's loader makes them, the baseline's padded to max_seq_len."""
    from padding import batches

    mode = recipe.data.packing if side == "ours" else "before"
    return [{k: v.to(device) for k, v in b.items()} for b in batches(recipe.data, tokenizer, mode, batch, count)]


def content_tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


class Ours:
    def __init__(self, args, max_positions: int, corpus: str | None):
        from ernie_tiny_ds.runtime.device_defaults import prepare_for_device
        from ernie_tiny_ds.runtime.loop import build_parts
        from ernie_tiny_ds.runtime.process_group import device, init_distributed
        from ernie_tiny_ds.stages import STAGE_SPECS

        init_distributed(600)
        # the `auto` keys resolved for the device, with TF32 set as a run there sets it (runtime/loop.run_stage)
        self.recipe = prepare_for_device(recipe_for(args, max_positions, corpus), device())
        self.parts = build_parts(self.recipe, STAGE_SPECS["general"], rank=0, world=1)

    def step(self, batch: dict, mark=lambda phase: None) -> float:
        from ernie_tiny_ds.runtime.step import train_step

        return float(train_step(self.parts, batch, mark).total)  # the trainer's own step, finite check included

    def zero_grad(self) -> None:
        self.parts.engine.optimizer.zero_grad()


class Baseline:
    """What a user writes without this project: eager HF models, materialised maps, plain AdamW."""

    def __init__(self, ours: Ours, args):
        parts = ours.parts
        dev = next(parts.student.parameters()).device
        teacher_module = getattr(parts.teacher, "module", parts.teacher)
        self.teacher = self._eager_copy(teacher_module, pooler=True).to(dev, torch.float32).eval()
        self.student = self._eager_copy(parts.student, pooler=getattr(parts.student, "pooler", None) is not None)
        self.student.to(dev).train()
        # fp32 masters, as a plain AMP recipe keeps them (our engine may hold them in bf16)
        self.hidden_proj = copy.deepcopy(parts.objective.hidden_proj).to(dev, torch.float32)
        self.embedding_proj = copy.deepcopy(parts.objective.embedding_proj).to(dev, torch.float32)
        self.mapping = parts.mapping
        params = [*self.student.parameters(), *self.hidden_proj.parameters(), *self.embedding_proj.parameters()]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)  # the student's autocast

    @staticmethod
    def _eager_copy(model, pooler: bool):
        """The same model with eager attention. The teacher gets a pooler back (the common recipe runs
        AutoModel whole; stage 1 drops it, distill.models.encoder_up_to). Its layers are the ones ours
        keeps: the bench's layer maps read the teacher's last layer, so that is all of them."""
        import transformers
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = len(model.encoder.layer)
        clone = transformers.AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=pooler)
        missing, unexpected = clone.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
        return clone

    def step(self, batch: dict, mark=lambda phase: None) -> float:
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], output_attentions=True, output_hidden_states=True)
        with torch.no_grad():
            t = self.teacher(**kwargs)
        mark("teacher forward")
        autocast = torch.autocast(batch["input_ids"].device.type, dtype=self.dtype, enabled=self.dtype is not None)
        with autocast:
            s = self.student(**kwargs)
        mask = batch["attention_mask"]
        token = mask.unsqueeze(-1).float()
        denom = token.sum() * t.hidden_states[0].shape[-1]
        loss = (((self.embedding_proj(s.hidden_states[0].float()) - t.hidden_states[0].float()) ** 2)
                * token).sum() / denom
        key_valid = mask[:, None, None, :].bool()
        rows = mask.sum() * s.attentions[0].shape[1]
        for i, g in enumerate(self.mapping, start=1):
            loss = loss + (((self.hidden_proj(s.hidden_states[i].float()) - t.hidden_states[g].float()) ** 2)
                           * token).sum() / denom
            p_t, p_s = t.attentions[g - 1].float(), s.attentions[i - 1].float()
            kl = torch.where(key_valid, p_t * (torch.log(p_t + 1e-12) - torch.log(p_s + 1e-12)), 0.0)
            loss = loss + (kl * mask[:, None, :, None]).sum() / rows
        mark("student forward + loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        return float(loss)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(side, batches: list[dict], device) -> float:
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        side.step(batch)
    sync(device)
    return time.perf_counter() - start


PHASES = ("teacher forward", "student forward + loss", "backward", "optimizer")


def phase_medians(side, batches: list[dict], device, rounds: int) -> dict[str, float]:
    """Median ms of each phase of a step over rounds x batches (synchronised at every phase end)."""
    durations: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(rounds):
        for batch in batches:
            sync(device)
            last = [time.perf_counter()]

            def mark(phase: str) -> None:
                sync(device)
                now = time.perf_counter()
                durations[phase].append((now - last[0]) * 1000)
                last[0] = now
            side.step(batch, mark)
    return {phase: statistics.median(values) for phase, values in durations.items()}


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "scaled_dot_product")  # SDPA: its own QK^T and PV


def matmul_share(side, batches: list[dict], device) -> tuple[float, float]:
    """(ms in matrix products incl. SDPA, ms in all ops) per step, from torch.profiler self times."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        time_steps(side, batches, device)
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, field) for e in events)
    matmul = sum(getattr(e, field) for e in events if any(op in e.key for op in MATMUL_OPS))
    return matmul / 1000 / len(batches), total / 1000 / len(batches)


def memory_in_subprocess(args, side: str) -> float:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-side", side]
    # the child builds its own one-process group: drop the parent's rendezvous variables
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def vm_hwm_mb() -> float:
    """Peak resident set since the last reset through /proc/self/clear_refs."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", default="8",
                        help="sequences per step, or 'auto' (GPU): each side at the largest power of two it fits")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--zero-config", default="zero0",
                        help="ds_configs/ name for our side; one process has nothing to partition, so zero0")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/ernie-tiny-ds-bench-step")
    parser.add_argument("--batches", choices=["corpus", "random"], default="corpus",
                        help="corpus: real batches from the bundled corpus or --text; random: synthetic lengths")
    parser.add_argument("--text", default=None, help="file or folder of prose as the corpus (e.g. /usr/share/doc)")
    parser.add_argument("--chars", type=int, default=2_000_000, help="--text: characters to read")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a recipe key for our side beyond its defaults (repeatable), e.g. losses.query_chunk=128")
    parser.add_argument("--max-seq", action="store_true", help="GPU: longest sequence each side fits")
    parser.add_argument("--phases", action="store_true",
                        help="also: median ms of each phase of a step, and the time in matrix products (profiler)")
    parser.add_argument("--memory-side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch != "auto" and not args.batch.isdigit():
        parser.error(f"--batch must be a positive integer or 'auto', got {args.batch!r}")
    torch.manual_seed(0)

    max_positions = 32768 if args.max_seq else max(512, args.seq_len)
    ours = Ours(args, max_positions, prose_corpus(args))
    device = next(ours.parts.student.parameters()).device
    baseline = Baseline(ours, args)
    if args.batch == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch auto searches for the largest batch before running out of GPU memory: CUDA only")
        batch_of = {"ours": largest_batch(ours, args, device), "baseline": largest_batch(baseline, args, device)}
    else:
        batch_of = {"ours": int(args.batch), "baseline": int(args.batch)}
    if args.batches == "corpus":
        batches_of = {name: corpus_batches(ours.recipe, ours.parts.tokenizer, name, args.steps, b, device)
                      for name, b in batch_of.items()}
    else:  # the same seed: at equal batch sizes both sides see the same sequences
        batches_of = {name: random_batches(args.steps, b, args.seq_len, device, seed=1)
                      for name, b in batch_of.items()}

    if args.memory_side:  # child process: one side only, peak RSS above the built models
        side = ours if args.memory_side == "ours" else baseline
        batches = batches_of[args.memory_side]
        time_steps(side, batches[:1], device)  # optimizer state and allocator warm, as in the timed runs
        before = rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        time_steps(side, batches, device)
        print(json.dumps({"peak_mb": max(0.0, vm_hwm_mb() - before)}))
        return

    sides = (("ours", ours), ("baseline", baseline))
    for name, side in sides:  # warm-up (allocator, kernels, optimizer state)
        time_steps(side, batches_of[name][:2], device)
    times = {"ours": [], "baseline": []}
    peaks = {}
    for _ in range(args.rounds):
        for name, side in sides:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(time_steps(side, batches_of[name], device))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 20
    if device.type != "cuda":
        peaks = {name: memory_in_subprocess(args, name) for name in ("ours", "baseline")}

    median = {k: statistics.median(v) for k, v in times.items()}
    content = {name: content_tokens(batches_of[name]) for name in batch_of}
    positions = {name: sum(b["input_ids"].numel() for b in batches_of[name]) for name in batch_of}
    per_token = {name: median[name] / content[name] for name in batch_of}  # seconds per content token
    # the MFU denominator is the matmul rate in the step's precision (bf16 also on CPUs with native bf16)
    from ernie_tiny_ds.runtime.flops import distill_step_flops, measured_matmul_flops

    rate = measured_matmul_flops(device.type, torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                 device.index)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    text = {"random": "random lengths", "corpus": args.text or "bundled corpus"}[args.batches]
    print(f"\n{args.size} teacher {SIZES[args.size][0]} -> student {SIZES[args.size][1]}, L={args.seq_len}, "
          f"batch {args.batch}, {args.precision}, {text}, data.packing {ours.recipe.data.packing}, "
          f"{' '.join(args.set) or 'recipe defaults'}, {name}, "
          f"torch threads {torch.get_num_threads()}; median of {args.rounds} alternating rounds of {args.steps} "
          "steps\n")
    print("| side | batch | mean width | padded | step (ms) | content tokens/step | us per content token "
          "| content tokens/s | peak memory (MiB) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in ("ours", "baseline"):
        seconds = median[side] / args.steps
        width = statistics.mean(b["input_ids"].shape[1] for b in batches_of[side])
        flops = sum(distill_step_flops(ours.parts, 1, n) for b in batches_of[side]  # each row at its own length
                    for n in b["attention_mask"].sum(1).tolist())
        mfu = flops / median[side] / rate
        print(f"| {side} | {batch_of[side]} | {width:.1f} | {1 - content[side] / positions[side]:.1%} "
              f"| {seconds * 1000:.1f} | {content[side] / args.steps:,.0f} | {per_token[side] * 1e6:.1f} "
              f"| {1 / per_token[side]:,.0f} | {peaks[side]:.0f} | {mfu:.1%} |")
    per_round = sorted((o / content["ours"]) / (b / content["baseline"])
                       for o, b in zip(times["ours"], times["baseline"]))
    print(f"\nratio ours/baseline per content token: {per_token['ours'] / per_token['baseline']:.3f} "
          f"(per round {per_round[0]:.2f}-{per_round[-1]:.2f}); per step: {median['ours'] / median['baseline']:.3f}; "
          f"content tokens/s: {per_token['baseline'] / per_token['ours']:.2f}x; "
          f"peak memory: {peaks['ours'] / max(peaks['baseline'], 1e-9):.2f}; "
          f"matmul rate {rate / 1e12:.2f} TFLOP/s")
    if args.phases:
        print_phases(sides, batches_of, device, args.rounds)
    if args.max_seq and device.type == "cuda":
        print(json.dumps(max_sequence(args, ours, baseline, device, budget=peaks["baseline"])))


def print_phases(sides, batches_of: dict, device, rounds: int) -> None:
    print("\n| side | " + " | ".join(PHASES) + " | matrix products | all ops (profiler) |")
    print("|---|" + "---|" * (len(PHASES) + 2))
    for name, side in sides:
        medians = phase_medians(side, batches_of[name], device, rounds)
        matmul, total = matmul_share(side, batches_of[name], device)
        print(f"| {name} | " + " | ".join(f"{medians[p]:.1f}" for p in PHASES) + f" | {matmul:.1f} | {total:.1f} |")
    print("(ms per step: phase medians, then profiler self time of addmm/mm/bmm/SDPA and of every op)")


def largest_batch(side, args, device, start: int = 8, limit: int = 4096) -> int:
    """Largest power-of-two batch (from `start`) for which one step of `side` runs without running
    out of GPU memory at --seq-len. A step cut short by the error leaves partial gradients behind:
    they are dropped before the next try."""
    best, batch = None, start
    while batch <= limit:
        try:
            torch.cuda.empty_cache()
            side.step(random_batches(1, batch, args.seq_len, device, seed=3)[0])
            sync(device)
            best = batch
        except torch.OutOfMemoryError:
            side.zero_grad()
            break
        batch *= 2
    torch.cuda.empty_cache()
    if best is None:
        raise SystemExit(f"not even a batch of {start} fits at L={args.seq_len}")
    return best


def max_sequence(args, ours: Ours, baseline: Baseline, device, budget: float) -> dict:
    """Longest L (doubling, batch 8) each side runs within `budget` MiB of peak memory."""
    found = {}
    for name, side in (("ours", ours), ("baseline", baseline)):
        length, best = 256, None
        while length <= 32768:
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                side.step(random_batches(1, 8, length, device, seed=2)[0])
                if torch.cuda.max_memory_allocated() / 2 ** 20 > budget:
                    break
                best = length
            except torch.OutOfMemoryError:
                side.zero_grad()
                break
            length *= 2
        found[name] = best
    return {"max_seq_len_at_equal_memory_mib": budget, **found}


if __name__ == "__main__":
    from ernie_tiny_ds.runtime.deepspeed_startup import skip_mlflow_in_deepspeed_import
    skip_mlflow_in_deepspeed_import()  # as the CLI does: DeepSpeed's import then skips mlflow's second
    main()
