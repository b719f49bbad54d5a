"""bench/gpu_acceptance.sh --dry-run: the script the first GPU runs, checked on CPU with tiny runs.

Device time is short, so the script must not fail on its own logic there: every part runs here with
tiny models (part 0 checks the wheels only where bench/gpu_wheels.sh has made them), and a budget
that runs out keeps the verdicts of the parts that ran and marks the others "NOT RUN".
"""
from __future__ import annotations

import re
import subprocess

import pytest
from distributed import REPO, env


def _acceptance(tmp_path, budget_s: int, timeout: int):
    run_env = env()
    run_env.update(OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), BUDGET_S=str(budget_s))
    proc = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--dry-run"], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=timeout)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    verdicts = dict(re.findall(r"^(\d)\s+.{24} (PASS|FAIL|SKIP|NOT RUN)", summary, flags=re.M))
    return proc, summary, verdicts


@pytest.mark.slow
def test_dry_run_passes_every_part(tmp_path):
    proc, summary, verdicts = _acceptance(tmp_path, budget_s=1200, timeout=1500)
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-2000:]
    assert verdicts["0"] in ("PASS", "SKIP"), summary
    assert [verdicts[str(i)] for i in range(1, 6)] == ["PASS"] * 5, summary
    assert "overall: PASS" in summary
    out = tmp_path / "out"
    assert (out / "2_stage_done.json").is_file()  # the bf16 step passed the export check
    for stage in ("general", "general_enhanced", "task_adaptive", "task_specific"):
        assert (out / f"4_stage_done_{stage}.json").is_file()


@pytest.mark.slow
def test_a_spent_budget_keeps_what_ran_and_marks_the_rest_not_run(tmp_path):
    proc, summary, verdicts = _acceptance(tmp_path, budget_s=1, timeout=300)
    assert proc.returncode == 1, summary
    assert verdicts["0"] in ("PASS", "SKIP", "FAIL"), summary  # part 0 always runs and records its verdict
    assert [verdicts[str(i)] for i in range(1, 6)] == ["NOT RUN"] * 5, summary
    assert "overall: FAIL" in summary
