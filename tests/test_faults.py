"""Faults on real processes: a dead rank, a damaged checkpoint, a diverging loss, bad input."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml
from distributed import REPO, deepspeed_cmd, env, read_metrics, run_ranks, tiny_recipe
from shared_runs import copy_of_run, corpus_with


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


# each command with the file that shows it is past start-up and inside its training loop, and the
# folder where its ranks record their pids
DEAD_RANK_CASES = {
    "distill": (["distill", "--stage", "general"], {"train": {"max_steps": 100000, "save_every": 100000}},
                "general/metrics.jsonl", "general/.ranks"),
    "finetune-teacher": (["finetune-teacher"], {"task": {"name": "sentiment", "max_seq_len": 32},
                                                "finetune": {"epochs": 100, "micro_batch_size": 8},
                                                "train": {"save_every": 2}},
                         "teacher_finetuned.checkpoints/latest", "teacher_finetuned.checkpoints/.ranks"),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", DEAD_RANK_CASES)
def test_a_dead_rank_ends_the_job_quickly_and_names_it(command, tmp_path, tokenizer_dir, vocab_size):
    args, sections, progress_file, ranks_dir = DEAD_RANK_CASES[command]
    sections = dict(sections, train={**sections["train"], "dist_timeout_s": 30})
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, **sections)
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(deepspeed_cmd([args[0], "--config", str(recipe), *args[1:]]), env=env(),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        progress = tmp_path / "out" / progress_file
        while time.time() < deadline and not progress.is_file():
            assert proc.poll() is None, open(tmp_path / "log.txt").read()[-4000:]
            time.sleep(0.5)
        time.sleep(1)  # a step or two further, inside the loop's collectives
        registry = tmp_path / "out" / ranks_dir
        pids = {str(r): str(json.loads((registry / f"rank{r}.json").read_text())["pid"]) for r in (0, 1)}
        assert {int(p) for p in pids.values()} <= set(_descendants(proc.pid))  # really the launcher's ranks
        os.kill(int(pids["1"]), signal.SIGKILL)
        killed_at = time.time()
        code = proc.wait(timeout=90)
        assert time.time() - killed_at < 60
        assert code != 0
        out = open(tmp_path / "log.txt").read()
        # the survivor names the dead rank (the deepspeed launcher's own line names whichever it polled)
        assert re.search(rf"\[rank 0\] error: rank 1 \(pid {pids['1']}\) left the job", out), out[-3000:]
        assert "Traceback" not in out
        time.sleep(1)
        assert _descendants(proc.pid) == []
        survivors = [p for p in pids.values() if os.path.exists(f"/proc/{p}")]
        assert survivors == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def resumed_past_a_damaged_checkpoint(tmp_path_factory, stage1_on_two_ranks_stopped_at_step_4):
    """Stage 1 on 2 ranks stopped at step 4 (the shared run, copied), its newest checkpoint truncated, then
    run again to the end. Its corpus holds an empty file beside a real one, which the run must skip."""
    tmp_path = tmp_path_factory.mktemp("damaged")
    recipe = copy_of_run(stage1_on_two_ranks_stopped_at_step_4, tmp_path)
    ckpts = tmp_path / "out/general/checkpoints"
    latest_before = (ckpts / "latest").read_text()
    victim = next((ckpts / "step_00000004").glob("zero_pp_rank_0_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated, as by a crash
    return tmp_path, latest_before, run_ranks(["distill", "--config", str(recipe), "--stage", "general"])


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(resumed_past_a_damaged_checkpoint):
    tmp_path, latest_before, proc = resumed_past_a_damaged_checkpoint
    assert latest_before == "step_00000004"
    assert "step_00000004 is damaged" in proc.stdout and "does not match" not in proc.stderr
    assert "resumed general from" in proc.stdout and "at step 2" in proc.stdout
    steps = [m["step"] for m in read_metrics(tmp_path / "out/general/metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_diverging_loss_is_skipped_then_stops_naming_term_and_step(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 50, "max_nonfinite_steps": 2},
                         optim={"lr": 1e30, "grad_clip": 0.0})
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general"], check=False, runner="deepspeed")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"non-finite loss \((attention|embedding|hidden)[^)]*\) at step \d+: micro-batch skipped",
                     out), out[-3000:]
    assert re.search(r"error: 2 consecutive non-finite losses \(term: [a-z_, ]+\) at step \d+ of general", out)
    assert "Traceback" not in out


def _bad_recipe(tmp_path, tokenizer_dir, vocab_size, change):
    path = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values))
    return path


BAD_INPUTS = {
    "unknown key": (lambda v: v["train"].update(max_step=3),
                    r"unknown key 'train.max_step'; did you mean 'train.max_steps'"),
    "wrong type": (lambda v: v["train"].update(micro_batch_size="four"),
                   r"train.micro_batch_size: expected an integer"),
    "negative": (lambda v: v["optim"].update(lr=-1.0), r"optim.lr must be > 0"),
    "missing teacher": (lambda v: v.update(teacher={"path": "/no/such/teacher"}),
                        r"teacher.path: folder not found: /no/such/teacher"),
    "vocab mismatch": (lambda v: v["teacher"]["config"].update(vocab_size=100),
                       r"tokenizer .* has \d+ tokens but the teacher's vocabulary has 100"),
    "heads mismatch": (lambda v: v["student"].update(num_attention_heads=2),
                       r"student.num_attention_heads \(2\) differs .* set losses.relation_heads"),
    "empty glob": (lambda v: v["data"].update(corpus="/no/such/*.txt"), r"/no/such/\*.txt.* matches no file"),
    "bad layer map": (lambda v: v.update(losses={"layer_map": [1, 9]}),
                      r"losses.layer_map: .*outside the teacher's layers 1..4"),
    "contradictory teacher": (lambda v: v["teacher"].update(path="/tmp"), r"teacher.*not both"),
    "relation heads": (lambda v: v.update(losses={"relation_heads": 5}), r"losses.relation_heads \(5\) must divide"),
    "nan float": (lambda v: v["optim"].update(lr=float("nan")), r"optim.lr must be a finite number, got nan"),
    "pickle-loading override": (lambda v: v.update(deepspeed={"overrides": {"checkpoint": {"load_universal": True}}}),
                                r"deepspeed.overrides.checkpoint.load_universal: refused"),
}


# one process, no launcher, so each runs in-process: an uncaught exception (a traceback) fails the test
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, tokenizer_dir, vocab_size, case, in_process):
    change, message = BAD_INPUTS[case]
    recipe = _bad_recipe(tmp_path, tokenizer_dir, vocab_size, change)
    code, lines = in_process(["distill", "--config", str(recipe), "--stage", "general"])
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), lines
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "out/general/stage_done.json").exists()


def test_a_malformed_task_row_names_file_and_line(tmp_path, tokenizer_dir, vocab_size, in_process):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\na fine day\tpos\nthis row\thas\tthree fields\n")
    recipe = _bad_recipe(tmp_path, tokenizer_dir, vocab_size, lambda v: v.update(
        task={"train_file": str(train), "text_columns": ["sentence"]}))
    code, lines = in_process(["finetune-teacher", "--config", str(recipe)])
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"{train}:3" in errors[0], lines
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "out" / "teacher_finetuned").exists()


CORPUS_FAULTS = {
    "binary file": ("weights.bin", bytes(range(256)) * 64, r"odd_corpus/weights.bin is a binary file"),
    "corrupt gzip": ("part.txt.gz", b"\x1f\x8b\x08\x00" + b"not really gzip" * 10, r"cannot decompress .*part.txt.gz"),
    "bad jsonl": ("part.jsonl", b'{"text": "fine"}\n{"text": broken\n', r"part.jsonl: line 2.*not valid JSON"),
}


@pytest.mark.slow  # the first case pays DeepSpeed's start-up in this process
@pytest.mark.parametrize("case", sorted(CORPUS_FAULTS))
def test_a_bad_corpus_file_is_one_line_that_names_it(tmp_path, tokenizer_dir, vocab_size, case, in_process):
    """Each kind of damage, in one process: what the CLI says, and that nothing is saved."""
    name, content, message = CORPUS_FAULTS[case]
    folder = corpus_with(tmp_path, name, content)
    recipe = _bad_recipe(tmp_path, tokenizer_dir, vocab_size, lambda v: v["data"].update(corpus=str(folder)))
    code, lines = in_process(["distill", "--config", str(recipe), "--stage", "general"])
    assert code == 2, lines  # bad input, found by the loader inside the training loop
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), lines
    assert not any("Traceback" in line for line in lines)
    assert (not (tmp_path / "out/general/checkpoints").exists()
            or not any((tmp_path / "out/general/checkpoints").iterdir()))


@pytest.mark.slow
def test_a_bad_corpus_file_is_named_on_real_ranks(tmp_path, tokenizer_dir, vocab_size):
    """On two ranks under the deepspeed runner the rank that read the file names it and its peer's line
    says it lost that rank (one kind of damage: what the other kinds say is checked above)."""
    name, content, message = CORPUS_FAULTS["binary file"]
    folder = corpus_with(tmp_path, name, content)
    recipe = _bad_recipe(tmp_path, tokenizer_dir, vocab_size, lambda v: v["data"].update(corpus=str(folder)))
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general"], check=False, timeout=300,
                     runner="deepspeed")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = {line.split("error: ", 1)[1] for line in out.splitlines() if "error: " in line}
    # the rank that read the file names it; a rank that only lost its peer says so, in one line
    assert any(re.search(message, e) for e in errors), out[-3000:]
    assert all(re.search(message, e) or re.match(r"rank \d \(pid \d+\) left the job", e) for e in errors), out[-3000:]
    assert "Traceback" not in out
    assert (not (tmp_path / "out/general/checkpoints").exists()
            or not any((tmp_path / "out/general/checkpoints").iterdir()))


@pytest.mark.slow
def test_an_empty_corpus_file_is_skipped_and_the_run_completes(resumed_past_a_damaged_checkpoint):
    tmp_path, _, _ = resumed_past_a_damaged_checkpoint
    assert (tmp_path / "out/general/stage_done.json").is_file()
