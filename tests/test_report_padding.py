"""The report gives each stage's padded share: the mean of the `padding` its metrics rows carry."""
from __future__ import annotations

import json
import random

import pytest

from ernie_tiny_ds.runtime.loop import DONE_FILE
from ernie_tiny_ds.workflows.report import render_markdown, stage_section


def _fake_stage(out, name: str, rows: list[dict]) -> None:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / DONE_FILE).write_text(json.dumps({"steps": len(rows), "final_loss": rows[-1]["loss"],
                                                "teacher": "t", "student_init": "fresh", "loss_terms": ["hidden"]}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _model(params: int) -> dict:
    return {"metrics": {"accuracy": 0.8}, "params": params, "latency_ms_batch1": 2.0, "throughput_batch32": 100.0}


def test_each_stage_reports_the_mean_padded_share_of_its_rows(tmp_path):
    rng = random.Random()
    shares = [round(rng.uniform(0.0, 0.4), 4) for _ in range(7)]
    _fake_stage(tmp_path, "general", [{"step": i + 1, "loss": 2.0 - 0.1 * i, "padding": p, "tokens_per_s": 9.0}
                                      for i, p in enumerate(shares)])
    # rows written before the loop logged padding: the share is unknown, not 0
    _fake_stage(tmp_path, "task_specific", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    stages = {s["name"]: s for s in stage_section(tmp_path)}
    assert stages["general"]["padding"] == pytest.approx(sum(shares) / len(shares), abs=1e-4)
    assert stages["task_specific"]["padding"] is None
    report = {"task": "sentiment", "main_metric": "accuracy", "retained": 0.9, "speedup": 3.0,
              "throughput_ratio": 4.0, "stages": list(stages.values()), "teacher": _model(1000),
              "student": _model(100), "machine": {"seq_len": 64, "processor": "cpu", "platform": "x",
                                                  "torch_threads": 1}}
    markdown = render_markdown(report)
    assert "| padded share |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| General Distillation |"))
    assert f"| {stages['general']['padding']:.1%} |" in row
    assert "| n/a |" in next(line for line in markdown.splitlines() if line.startswith("| Task-Specific"))
