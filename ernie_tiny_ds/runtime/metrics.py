"""Rank-0 training log: progress bar, metrics.jsonl (the report reads it) and TensorBoard scalars."""
from __future__ import annotations

import json
import time
from pathlib import Path


# train.report_to: runtime/trackers.activate puts the recipe's trackers here; rank 0's logger opens
# one run per stage through them and forwards every row it writes to metrics.jsonl
TRACKERS: list = []


class MetricsLogger:
    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int, title: str,
                 progress_bar: bool = True, log_every: int = 10):
        self.active = rank == 0
        self.log_every = log_every
        self._last_time = time.perf_counter()
        self._tokens = 0
        self._bar = None
        self._tb = None
        self._runs = []
        if not self.active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._runs = [trackers.open(title, out_dir, start_step) for trackers in TRACKERS]
        self._start = self._last_time = time.perf_counter()  # a tracker's start-up is no step's time
        # a resumed run appends; lines past the checkpoint were never part of the resumed run
        self._lines = self._truncate(out_dir / "metrics.jsonl", start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self._tb = None
        if progress_bar:
            from tqdm import tqdm
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
        path.write_text("".join(k + "\n" for k in kept))
        return open(path, "a", encoding="utf-8")

    def step(self, step: int, values: dict[str, float], tokens: int) -> None:
        self._tokens += tokens
        if not self.active:
            return
        now = time.perf_counter()
        record = {"step": step, **{k: round(v, 7) if isinstance(v, float) else v for k, v in values.items()}}
        if step % self.log_every == 0:
            record["tokens_per_s"] = round(self._tokens / max(now - self._last_time, 1e-9), 1)
            self._tokens, self._last_time = 0, now
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()
        for run in self._runs:
            run.log(step, record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "lr")}
            self._bar.set_postfix(shown, refresh=False)

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
