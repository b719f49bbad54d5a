"""Benchmark: the student's attention with the head dim as it is (26 for ERNIE-Tiny) vs zero-padded to a
multiple of 8 (distill.models.padded_head_sdpa), forward + backward of the whole student.

On CUDA the padding is what lets SDPA pick its memory-efficient or cuDNN kernel instead of the math
path; on the CPU every SDPA kernel takes any head dim, so the question there is only what the
padding costs. Both variants share one set of weights and one batch (right padding at random
lengths, as task batches have); the rows are interleaved (plain, padded, plain, ...) so that drift
of a shared machine hits both alike. Two timings: SDPA alone at the student's shapes (5 x --repeats
calls), and a whole student step (--repeats calls, vocabulary 1000 so that the embedding's gradient
does not hide the attention); median and min of each, after 2 warm-ups.

  python bench/student_attention.py                                  # ERNIE-Tiny 4L-312, 12 heads
  python bench/student_attention.py --device cuda --batch 64 --length 128
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie_tiny_ds.distill import models  # noqa: E402

PADDED = "bench_padded_head_sdpa"
transformers.AttentionInterface.register(PADDED, models.padded_head_sdpa)  # the padded path on any device
AttentionMaskInterface.register(PADDED, sdpa_mask)  # without it transformers would build no padding mask


def student(args) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").to(args.device).train()


def batch(args) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (args.batch, args.length), generator=generator)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,), generator=generator)
    lengths[0] = args.length
    mask = (torch.arange(args.length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.to(args.device), "attention_mask": mask.to(args.device)}


def step(model, inputs) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs).last_hidden_state.square().mean().backward()
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()


def time_variants(model, inputs, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"plain": [], "padded": []}
    implementation = {"plain": "sdpa", "padded": PADDED}
    for name in times:  # warm-up, and a check that both give one answer
        model.set_attn_implementation(implementation[name])
        step(model, inputs)
        step(model, inputs)
    for _ in range(repeats):
        for name in times:
            model.set_attn_implementation(implementation[name])
            start = time.perf_counter()
            step(model, inputs)
            times[name].append(time.perf_counter() - start)
    return times


def time_attention_alone(args) -> dict[str, list[float]]:
    """SDPA forward + backward at the student's shapes, without the rest of the model."""
    heads, head = args.heads, args.hidden // args.heads
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(args.batch, heads, args.length, head, generator=generator).to(args.device)
               .requires_grad_() for _ in range(3))
    mask = batch(args)["attention_mask"].bool()[:, None, None, :]
    module = torch.nn.Module()
    module.is_causal = False
    variants = {"plain": models.sdpa_attention_forward, "padded": models.padded_head_sdpa}
    times: dict[str, list[float]] = {"plain": [], "padded": []}
    for _ in range(args.repeats * 5 + 2):
        for name, attention in variants.items():
            start = time.perf_counter()
            attention(module, q, k, v, mask, scaling=head ** -0.5)[0].square().sum().backward()
            if q.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: values[2:] for name, values in times.items()}  # the first two are warm-ups


def summary(times: dict[str, list[float]]) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"median_s": {k: round(v, 5) for k, v in medians.items()},
            "min_s": {k: round(min(v), 5) for k, v in times.items()},
            "padded_over_plain_median": round(medians["padded"] / medians["plain"], 3),
            "padded_over_plain_min": round(min(times["padded"]) / min(times["plain"]), 3)}


def max_output_difference(model, inputs) -> float:
    outputs = []
    with torch.no_grad():
        for implementation in ("sdpa", PADDED):
            model.set_attn_implementation(implementation)
            outputs.append(model(**inputs).last_hidden_state)
    return (outputs[0] - outputs[1]).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=312)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10, help="student steps per variant (5x for attention alone)")
    args = parser.parse_args()
    model, inputs = student(args), batch(args)
    shape = (f"{args.layers}L-{args.hidden}, {args.heads} heads (head dim {args.hidden // args.heads}), "
             f"batch {args.batch} x {args.length}")
    print(json.dumps({
        "device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "shape": shape,
        "attention_alone": summary(time_attention_alone(args)),
        "student_step": summary(time_variants(model, inputs, args.repeats)),
        "max_abs_output_difference": max_output_difference(model, inputs),
    }, indent=1))


if __name__ == "__main__":
    main()
