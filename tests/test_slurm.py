"""`ernie-tiny-ds submit slurm` on a real one-node Slurm: a 2-rank General Distillation runs to its export, and a
job asked to stop (USR1, as before a time limit) checkpoints, requeues itself and resumes where it stopped. Both
are one job: a Slurm job's start-up costs more than its steps."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import REPO, read_metrics, tiny_recipe
from slurm_cluster import FINAL_STATES, SlurmUnavailable, start_cluster, stop_cluster

pytestmark = pytest.mark.slow

# the job's paths carry what a shell would expand or split: they must reach the ranks as written
HOSTILE = "run $HOME `touch pwned`; 'q\" %j"


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_cluster()
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm here: {exc}")
    yield cluster
    stop_cluster(cluster)


def submit(slurm, args: list[str]) -> tuple[str, Path]:
    proc = subprocess.run([sys.executable, "-m", "ernie_tiny_ds.cli", "submit", "slurm", *args], env=slurm.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"^submitted batch job (\d+)$", proc.stdout, re.M)[1]
    log = Path(re.search(r"^log: (.*)$", proc.stdout, re.M)[1])
    return job_id, log


def test_a_job_trains_on_two_ranks_stops_on_usr1_requeues_resumes_and_exports(slurm, tmp_path, tokenizer_dir,
                                                                             vocab_size):
    """One job shows both: a 2-rank run to its export, and a stop (USR1, as before a time limit) that
    checkpoints, requeues the job and resumes where it stopped; its paths carry shell syntax throughout."""
    from transformers import AutoModel

    steps = 200  # ~40 ms each here: seconds of training left after the first two, for USR1 to land in
    recipe = tiny_recipe(tmp_path / HOSTILE, tokenizer_dir, vocab_size, train={"max_steps": steps, "save_every": 1000})
    out = tmp_path / HOSTILE / "out"
    job_id, log = submit(slurm, ["--nodes", "1", "--gpus-per-node", "2", "--", "distill", "--config", str(recipe),
                                 "--stage", "general"])
    assert log.parent == out / "slurm"
    metrics = out / "general/metrics.jsonl"
    job = slurm.wait_for(job_id, lambda j: j.get("JobState") in FINAL_STATES or (
        metrics.is_file() and metrics.read_text().count("\n") >= 2), "training steps", 300, log, poll_s=0.5)
    assert job["JobState"] == "RUNNING", log.read_text()[-6000:]  # not ended before it could be stopped
    # what Slurm sends --signal-seconds before the time limit: USR1 to the batch shell
    sent = slurm.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert sent.returncode == 0, sent.stderr
    job = slurm.wait_for(job_id, lambda j: int(j.get("Restarts", "0")) >= 1, "the requeue", 300, log)
    job = slurm.wait_finished(job_id, timeout=420, log=log)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-6000:]
    ranks = re.findall(r"\[rank (\d)\] pid \d+ General Distillation: ZeRO-\d", text)
    assert sorted(ranks) == ["0", "0", "1", "1"], text[-6000:]  # each run of the job: one world of two ranks
    stopped = re.search(rf"stopped at step (\d+) of {steps}", text)
    assert stopped, text[-6000:]
    assert f"requeueing job {job_id} to resume" in text
    resumed = re.search(r"resumed general from .*step_0*(\d+) at step (\d+)", text)
    assert resumed and resumed[1] == resumed[2] == stopped[1], text[-6000:]
    assert 2 <= int(stopped[1]) < steps
    assert text.index(stopped[0]) < text.index(resumed[0]) < text.index(f"General Distillation done: {steps} steps")
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, steps + 1))
    assert int(job["Restarts"]) == 1
    assert (out / f"general/checkpoints/step_{steps:08d}").is_dir()
    done = json.loads((out / "general/stage_done.json").read_text())
    assert done["steps"] == steps
    student = AutoModel.from_pretrained(out / "general/student")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 32
    assert not (out / "STOP").exists()  # consumed, so the next run is not stopped at once
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
    assert list((out / "slurm").glob("ernie-tiny-ds-distill-*.sbatch"))  # the script sits beside its log
