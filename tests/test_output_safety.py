"""Never destroy what the user brought, one job per output folder (issue 24 items 1, 2 and the
output-path cases of 4).

The table runs every writing command in-process (ernie_tiny_ds.cli.main) against four overlaps:
the output is an input, lies inside one, contains one, or is a model folder this tool did not
write. Each must end in one line and exit code 2 before any work, with every input byte-identical.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from distributed import REPO, deepspeed_cmd, env, tiny_recipe, tiny_teacher, write_corpus

from ernie_tiny_ds import outputs
from ernie_tiny_ds.runtime import checkpoint


# --------------------------------------------------------------------------- helpers
def tree_digest(path: Path) -> str:
    """Every name, symlink target and byte under `path` (a file or a folder)."""
    digest = hashlib.sha256()
    items = [path] if not path.is_dir() else sorted(path.rglob("*"))
    for item in items:
        digest.update(str(item.relative_to(path.parent)).encode())
        if item.is_symlink():
            digest.update(os.readlink(item).encode())
        elif item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def foreign_model(folder: Path, vocab_size: int, tokenizer_dir: str) -> Path:
    """A Hugging Face model folder (config.json + model.safetensors + tokenizer) this tool did not write."""
    import transformers

    config = transformers.BertConfig(**{k: v for k, v in tiny_teacher(vocab_size, layers=1, hidden=16, heads=2).items()
                                        if k != "model_type"})
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir, vocab_size):
    """The inputs every command reads: a teacher folder, a corpus, task files, a checkpoint folder; plus
    a foreign model folder no command reads, and a folder that holds each kind of input."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "tokenizer": tokenizer_dir}
    w["teacher"] = foreign_model(root / "holds_teacher" / "teacher", vocab_size, tokenizer_dir)
    w["foreign"] = foreign_model(root / "someone_elses_model", vocab_size, tokenizer_dir)
    w["corpus"] = write_corpus(root / "holds_corpus" / "corpus", documents=8)
    tasks = root / "holds_task" / "task"
    tasks.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (tasks / f"{split}.tsv").write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\nfine day\tpos\n")
    w["task"] = tasks
    ckpt = root / "holds_checkpoints" / "checkpoints"
    (ckpt / "step_00000001").mkdir(parents=True)
    (ckpt / "step_00000001" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (ckpt / "latest").write_text("step_00000001")
    w["checkpoint"] = ckpt
    return w


def recipe_for(w: dict, tmp: Path, output_dir: Path, vocab_size: int) -> str:
    task = w["task"]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(output_dir), "teacher": {"path": str(w["teacher"])},
        "data": {"corpus": str(w["corpus"]), "tokenizer": w["tokenizer"], "max_seq_len": 32},
        "task": {"train_file": str(task / "train.tsv"), "dev_file": str(task / "dev.tsv"),
                 "test_file": str(task / "test.tsv"), "text_columns": ["sentence"], "max_seq_len": 32},
        "train": {"max_steps": 2, "micro_batch_size": 2, "progress_bar": False}}))
    return str(path)


# (command, the input the overlap cases use) -> argv builder: (output, recipe, world) -> argv
COMMANDS = {
    "preprocess": ("corpus", lambda out, r, w: ["preprocess", "--input", str(w["corpus"]), "--tokenizer",
                                                w["tokenizer"], "--output", str(out), "--overwrite"]),
    "finetune-teacher": ("teacher", lambda out, r, w: ["finetune-teacher", "--config", r, "--output", str(out),
                                                       "--overwrite"]),
    "export": ("checkpoint", lambda out, r, w: ["export", "--checkpoint", str(w["checkpoint"]), "--output", str(out),
                                                "--overwrite"]),
    "onnx": ("teacher", lambda out, r, w: ["onnx", "--model", str(w["teacher"]), "--output", str(out)]),
    "augment": ("task", lambda out, r, w: ["augment", "--config", r, "--output", str(out)]),
    "predict": ("teacher", lambda out, r, w: ["predict", "--model", str(w["teacher"]), "--config", r,
                                              "--output", str(out)]),
    "evaluate": ("teacher", lambda out, r, w: ["evaluate", "--model", str(w["teacher"]), "--config", r,
                                               "--output", str(out)]),
    "pipeline": ("corpus", lambda out, r, w: ["pipeline", "--config", r, f"output_dir={out}"]),
    "distill": ("corpus", lambda out, r, w: ["distill", "--config", r, "--stage", "general", f"output_dir={out}"]),
}


def overlap_output(case: str, w: dict, command: str) -> Path:
    source = w[COMMANDS[command][0]]
    if case == "output is the input":
        return source / "train.tsv" if command == "augment" else source  # augment's input is the train file
    if case == "output inside the input":  # augment writes beside the train file by design: its folder input
        return w["teacher"] / "aug.tsv" if command == "augment" else source / "new_output"
    if case == "input inside the output":
        return source.parent  # holds_<input>/
    return w["foreign"]


CASES = ["output is the input", "output inside the input", "input inside the output", "a foreign model folder"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_output_overlaps_an_input_or_replaces_a_foreign_folder(command, case, world, in_process, tmp_path,
                                                                   vocab_size):
    out = overlap_output(case, world, command)
    if command == "onnx" and case == "output inside the input":
        out = world["teacher"] / "model.safetensors"  # MODEL/new.onnx is onnx's own home; its weights are not
    recipe = recipe_for(world, tmp_path, tmp_path / "run", vocab_size)
    before = tree_digest(world["root"])
    code, lines = in_process(COMMANDS[command][1](out, recipe, world))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], lines
    assert tree_digest(world["root"]) == before
    assert not (tmp_path / "run").exists()  # refused before any work: not even the output_dir was made


def test_the_three_reported_cases_are_one_line(world, in_process, tmp_path, vocab_size):
    """The issue's own examples, literally."""
    before = tree_digest(world["root"])
    pc = world["corpus"]
    code, lines = in_process(["preprocess", "--input", str(pc), "--tokenizer", world["tokenizer"], "--output", str(pc),
                              "--overwrite"])
    assert code == 2 and lines == [f"error: --output {pc} is the input --input ({pc}); an output never overlaps "
                                   "an input of the same command: name another output"]
    teacher = world["teacher"]
    recipe = recipe_for(world, tmp_path, tmp_path / "run", vocab_size)
    code, lines = in_process(["finetune-teacher", "--config", recipe, "--output", str(teacher),
                              f"teacher.path={teacher}"])
    assert code == 2 and lines[0].startswith(f"error: --output {teacher} is the input teacher.path")
    code, lines = in_process(["export", "--checkpoint", str(world["checkpoint"]), "--output", str(teacher)])
    assert code == 2 and lines == [f"error: --output {teacher} exists and was not written by ernie-tiny-ds (no "
                                   f"{outputs.MARKER}); it is never replaced by this command's output (export): "
                                   "remove it yourself or name a new folder"]
    assert tree_digest(world["root"]) == before


def test_a_symlink_does_not_hide_an_overlap(world, in_process, tmp_path):
    link = tmp_path / "corpus_link"
    link.symlink_to(world["corpus"], target_is_directory=True)
    code, lines = in_process(["preprocess", "--input", str(link), "--tokenizer", world["tokenizer"],
                              "--output", str(world["corpus"] / "shards")])
    assert code == 2 and "lies inside the input --input" in lines[0]


def test_preprocess_replaces_only_its_own_corpus_and_only_with_overwrite(world, in_process, tmp_path):
    out = tmp_path / "shards"
    argv = ["preprocess", "--input", str(world["corpus"]), "--tokenizer", world["tokenizer"], "--output", str(out),
            "--no-progress"]
    assert in_process(argv)[0] == 0
    assert outputs.marker_kind(out) == "preprocessed_corpus"
    code, lines = in_process(argv)
    assert code == 2 and lines == [f"error: --output {out} already holds this command's earlier output "
                                   "(preprocessed_corpus); pass --overwrite to replace it"]
    assert in_process([*argv, "--overwrite"])[0] == 0
    # another kind of output of this tool is no corpus either
    outputs.write_marker(out, "export")
    code, lines = in_process([*argv, "--overwrite"])
    assert code == 2 and "was written by ernie-tiny-ds as export" in lines[0]


# --------------------------------------------------------------------------- item 4: output paths
def test_output_paths_that_cannot_be_written_are_one_line(world, in_process, tmp_path, vocab_size):
    recipe = recipe_for(world, tmp_path, tmp_path / "run", vocab_size)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    # evaluate --output onto an existing folder
    code, lines = in_process(["evaluate", "--model", str(world["teacher"]), "--config", recipe,
                              "--output", str(tmp_path)])
    assert code == 2 and lines == [f"error: --output {tmp_path} is a folder; name a file"]
    # predict --output onto an existing file
    code, lines = in_process(["predict", "--model", str(world["teacher"]), "--config", recipe, "--output", str(a_file)])
    assert code == 2 and lines == [f"error: --output {a_file} is a file, not a folder; name a new folder"]
    # output_dir that is an existing file
    for command in (["distill", "--stage", "general"], ["pipeline"]):
        code, lines = in_process([command[0], "--config", recipe, *command[1:], f"output_dir={a_file}"])
        assert code == 2 and lines == [f"error: output_dir {a_file} is a file, not a folder; name a folder"]
    assert a_file.read_text() == "mine"


@contextlib.contextmanager
def as_nobody():
    """Root writes anywhere: act as an unprivileged user, as the reported case did."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_read_only_output_dir_is_one_line(world, in_process, vocab_size):
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp())  # readable by the unprivileged user (pytest's tmp_path is not)
    base.chmod(0o755)
    read_only = base / "read_only"
    read_only.mkdir()
    recipe = recipe_for(world, base, read_only, vocab_size)
    os.chmod(recipe, 0o644)
    read_only.chmod(0o555)
    try:
        with as_nobody():
            for argv in (["distill", "--config", recipe, "--stage", "general"], ["pipeline", "--config", recipe]):
                code, lines = in_process(argv)
                assert code == 2 and lines == [f"error: output_dir {read_only}: {read_only} is not writable; "
                                               "name a folder you can write to"], lines
        assert list(read_only.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- the output_dir of a training job
def test_output_dir_reuse_marked_or_in_the_projects_layout(tmp_path):
    inputs = {"student.path": str(tmp_path / "run" / "general" / "student")}
    (tmp_path / "run" / "general" / "student").mkdir(parents=True)
    # an output_dir of an earlier version (stage folders, no marker): ours, and an input inside it is allowed
    assert outputs.claim_output_dir(tmp_path / "run", inputs) == tmp_path / "run"
    mine = tmp_path / "mine"
    (mine / "student").mkdir(parents=True)
    with pytest.raises(outputs.UserError, match="contains the input student.path"):
        outputs.claim_output_dir(mine, {"student.path": str(mine / "student")})
    outputs.write_marker(mine, outputs.OUTPUT_DIR)
    assert outputs.claim_output_dir(mine, {"student.path": str(mine / "student")}) == mine
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    with pytest.raises(outputs.UserError, match="is not empty and was not written by ernie-tiny-ds"):
        outputs.claim_output_dir(tmp_path / "notes", {})


def test_cleanup_of_leftovers_happens_only_under_the_lock(tmp_path):
    root = tmp_path / "out" / "general" / "checkpoints"
    stale = root / "step_00000002.partial"
    stale.mkdir(parents=True)
    (stale / "half.pt").write_bytes(b"x")
    checkpoint.remove_stale_partials(root)  # no lock: it may be another live job's save in progress
    assert (stale / "half.pt").is_file()
    with outputs.exclusive(tmp_path / "out"):
        checkpoint.remove_stale_partials(root)
    assert not stale.exists()


# --------------------------------------------------------------------------- item 2: one job per output_dir
HOLDER = ("import sys, time; from ernie_tiny_ds.outputs import exclusive\n"
          "with exclusive(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")


@pytest.mark.slow
def test_one_job_per_output_dir_and_a_dead_holders_lock_never_blocks(tmp_path, tokenizer_dir, vocab_size,
                                                                       in_process):
    """A killed holder's lock file does not block a 2-rank distill; while that distill holds the
    folder, a second job is refused in one line naming its host and pid; the first then finishes."""
    recipe = str(tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 2, "save_every": 1}))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env={**env(), "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert f"pid {holder.pid}" in (out / outputs.LOCK_FILE).read_text()  # left behind by the dead holder

    first = subprocess.Popen(deepspeed_cmd(["distill", "--config", recipe, "--stage", "general"]), env=env(),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        pid = None
        for line in first.stdout:  # rank 0 prints its pid once its parts are built: it holds the lock by then
            if line.startswith("[rank 0] pid "):
                pid = int(line.split()[3])
                break
        assert pid is not None, "the first job ended before it trained"
        os.kill(pid, signal.SIGSTOP)  # hold it still while the second job tries: no race with its end
        try:
            assert f"pid {pid} " in (out / outputs.LOCK_FILE).read_text()
            code, lines = in_process(["distill", "--config", recipe, "--stage", "general"])
        finally:
            os.kill(pid, signal.SIGCONT)
        rest = first.stdout.read()
        assert first.wait(timeout=300) == 0, rest[-4000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    import socket
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: output_dir {out} is in use by another job (host {socket.gethostname()} "
                               f"pid {pid} since "), lines
    assert (out / "general" / "stage_done.json").is_file() and (out / "general" / "student" / outputs.MARKER).is_file()
    assert outputs.marker_kind(out) == outputs.OUTPUT_DIR


def test_a_students_folder_never_takes_a_users_folder_inside_a_reused_output_dir(world, in_process, tmp_path,
                                                                                 vocab_size):
    """`students:` gives each student OUT/<name>. In an output_dir of an earlier run (where inputs may lie:
    its exports), a folder the user keeps there is refused as a student's folder before any work, whether a
    command reads it (the corpus) or not."""
    out = tmp_path / "run"
    out.mkdir()
    outputs.write_marker(out, outputs.OUTPUT_DIR)  # an output_dir this tool made earlier
    mine = write_corpus(out / "mine", documents=8)  # the user's corpus, kept in it
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("the user's")
    recipe = recipe_for(world, tmp_path, out, vocab_size)
    before = tree_digest(out)
    cases = [("mine", [f"data.corpus={mine}"], f"{mine} is the input data.corpus"),
             ("notes", [], "is not empty and was not written by ernie-tiny-ds")]
    for command in (["pipeline", "--config", recipe], ["distill", "--config", recipe, "--stage", "general"]):
        for name, overrides, expected in cases:
            code, lines = in_process([*command, f"students=[{{name: {name}, num_hidden_layers: 1}}]", *overrides])
            assert code == 2, lines
            assert len(lines) == 1 and f"students[0].name: '{name}':" in lines[0] and expected in lines[0], lines
    assert tree_digest(out) == before
