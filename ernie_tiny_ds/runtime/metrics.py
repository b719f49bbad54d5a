"""Rank-0 training log: progress bar, metrics.jsonl (the report reads it) and TensorBoard scalars.

Every row (and every printed line) carries the step, the loss terms, lr and the rates:
  tokens_per_s   non-padding tokens of all ranks per second of this step
  step_time_s    wall time of this step: from the previous step's end to this one's, as the loop
                 clocked them (each step waits once for the device, in its finite check, so in
                 steady state the interval holds one step's device work)
  elapsed_s      wall time since this run's loop started
  tflops, mfu    this rank's matrix-product FLOP/s (runtime/flops.py) and its share of the device's peak
  padding        share of padded positions in this rank's micro-batches of the step, when the loop gives it
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ..files import atomic_write_text

# row fields that are not loss terms (the report plots the others as losses)
RATE_FIELDS = ("step", "lr", "tokens_per_s", "step_time_s", "elapsed_s", "tflops", "mfu", "skipped_nonfinite",
               "padding")


class MetricsLogger:
    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int, title: str,
                 progress_bar: bool = True, log_every: int = 10, peak_flops: float | None = None,
                 trackers=None):
        self.active = rank == 0
        self.log_every = log_every
        self.title, self.total_steps = title, total_steps
        self.peak_flops = peak_flops  # FLOP/s of this device (the MFU denominator); None: no mfu
        self._start = self._last_time = time.perf_counter()
        self._bar = None
        self._tb = None
        self._runs = []
        if not self.active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # train.report_to (runtime/trackers.py): one run per stage, every row of metrics.jsonl goes to it too;
        # none for a log with no stage of its own (teacher finetuning's, beside its checkpoints)
        self._runs = [trackers.open(title, out_dir, start_step)] if trackers is not None else []
        self._start = self._last_time = time.perf_counter()  # a tracker's start-up is no step's time
        # a resumed run appends; lines past the checkpoint were never part of the resumed run
        self._lines = self._truncate(out_dir / "metrics.jsonl", start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self._tb = None
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=title, dynamic_ncols=True)

    @staticmethod
    def _truncate(path: Path, start_step: int):
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except ValueError:
                    continue
        # replaced durably: a crash here must not cost the rows of the steps before the resumed one
        atomic_write_text(path, "".join(k + "\n" for k in kept))
        return open(path, "a", encoding="utf-8")

    def step(self, step: int, values: dict[str, float], tokens: int, flops: float | None = None,
             at: float | None = None) -> None:
        """One optimizer step: `values` the loss terms and lr, `tokens` of all ranks, `flops` of this rank,
        `at` the perf_counter time the step ended (default: now; the loop logs several steps at once).
        Rows reach metrics.jsonl on flush()."""
        if not self.active:
            return
        now = time.perf_counter() if at is None else at
        seconds = max(now - self._last_time, 1e-9)
        self._last_time = now
        record = {"step": step, **{k: round(v, 7) if isinstance(v, float) else v for k, v in values.items()},
                  "tokens_per_s": round(tokens / seconds, 1), "step_time_s": round(seconds, 4),
                  "elapsed_s": round(now - self._start, 2)}
        if flops is not None:  # 4 significant digits: a CPU test run reaches 1e-4 TFLOP/s
            record["tflops"] = float(f"{flops / seconds / 1e12:.4g}")
            if self.peak_flops:
                record["mfu"] = float(f"{flops / seconds / self.peak_flops:.4g}")
        self._lines.write(json.dumps(record) + "\n")
        for run in self._runs:
            run.log(step, record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: f"{v:.4g}" for k, v in record.items() if k not in RATE_FIELDS}
            shown["tok/s"] = f"{record['tokens_per_s']:,.0f}"
            if "padding" in record:
                shown["pad"] = f"{record['padding']:.0%}"
            if "mfu" in record:
                shown["MFU"] = f"{record['mfu']:.1%}"
            self._bar.set_postfix(shown, refresh=False)
        elif step % self.log_every == 0 or step == self.total_steps:
            print(self.line(record), flush=True)

    def line(self, record: dict) -> str:
        """A row as one log line: step, losses, lr, then the rates."""
        parts = [f"{self.title} step {record['step']}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in record.items() if k not in RATE_FIELDS]
        parts += [f"lr {record['lr']:.3g}"] if "lr" in record else []
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts += [f"{record['padding']:.1%} padding"] if "padding" in record else []
        parts.append(f"{record['step_time_s']:.3f} s/step")
        if "tflops" in record:
            parts.append(f"{record['tflops']:.3g} TFLOP/s")
        if "mfu" in record:
            parts.append(f"MFU {record['mfu']:.2%}")
        parts.append(f"{record['elapsed_s']:.0f} s elapsed")
        if "skipped_nonfinite" in record:
            parts.append(f"{record['skipped_nonfinite']} skipped (non-finite)")
        return " | ".join(parts)

    def flush(self) -> None:
        """The rows so far on disk (the loop calls it on each logging step, before a checkpoint)."""
        if self.active:
            self._lines.flush()

    def message(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._lines.close()
        for run in self._runs:
            run.close()
