"""Durability of what a later run trusts: checkpoints (pruning, damaged ones, full disk, stale
partial folders, injected fsync/rename faults), exports and their stage markers, --output folders."""
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from ernie_tiny_ds import files
from ernie_tiny_ds.errors import UserError
from ernie_tiny_ds.outputs import exclusive
from ernie_tiny_ds.runtime import checkpoint


class FakeEngine:
    """What checkpoint.save asks of a DeepSpeed engine: one model-states file per save."""

    def __init__(self, size: int = 1000):
        self.size, self.lr_scheduler = size, None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.zeros(self.size), **client_state}, folder / "mp_rank_00_model_states.pt")


def save(root: Path, step: int, keep: int = 2, engine=None) -> Path:
    return checkpoint.save(engine or FakeEngine(), root, step, {"step": step}, keep=keep)


def damage(folder: Path) -> None:
    victim = folder / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


# --------------------------------------------------------------------------- item 1: pruning
def test_pruning_keeps_the_checkpoint_latest_names_not_a_damaged_newer_one(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 100, keep=1)
    save(root, 500, keep=1)
    shutil.copytree(root / "step_00000500", tmp_path / "good_500")
    damage(root / "step_00000500")
    # the run resumes from an older intact checkpoint: here step_100 comes back from a copy
    shutil.rmtree(root / "step_00000500")
    save(root, 100, keep=3)
    shutil.copytree(tmp_path / "good_500", root / "step_00000500")
    damage(root / "step_00000500")
    (root / "latest").write_text("step_00000100")
    assert checkpoint.find_resumable(root, log=lambda m: None) == "step_00000100"
    save(root, 200, keep=1)  # the next save after resuming at step 100
    assert (root / "latest").read_text() == "step_00000200"
    assert (root / "step_00000200").is_dir()  # old code deleted it and kept the damaged step_500
    assert not (root / "step_00000500").exists()
    assert checkpoint.find_resumable(root, log=lambda m: None) == "step_00000200"


def test_pruning_keeps_the_newest_older_ones_too(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(root, step, keep=3)
    assert checkpoint.complete_tags(root) == ["step_00000002", "step_00000003", "step_00000004"]


def test_every_checkpoint_damaged_is_one_line_not_a_silent_restart(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    for tag in ("step_00000001", "step_00000002"):
        damage(root / tag)
    with pytest.raises(UserError, match=r"every checkpoint in .*checkpoints is damaged \(step_00000002: .*\); "):
        checkpoint.find_resumable(root, log=lambda m: None)
    # `latest` names a folder that is gone and nothing else is left: the same
    for tag in ("step_00000001", "step_00000002"):
        shutil.rmtree(root / tag)
    with pytest.raises(UserError, match=r"`latest` names step_00000002, which is missing"):
        checkpoint.find_resumable(root, log=lambda m: None)
    assert checkpoint.find_resumable(tmp_path / "never_saved") is None


# --------------------------------------------------------------------------- item 6: full disk, stale partials
def test_stale_partial_folders_are_removed_before_a_save(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    stale = root / "step_00000003.partial"
    stale.mkdir()
    (stale / "half.pt").write_bytes(b"x" * 100)
    with exclusive(tmp_path):  # leftovers are removed only under the job's lock
        save(root, 2)
    assert not stale.exists()
    assert checkpoint.find_resumable(root) == "step_00000002"


def test_a_full_disk_is_one_line_naming_the_folder_and_the_bytes_needed(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    needed = checkpoint.checkpoint_bytes(root / "step_00000001")

    class FullDisk(FakeEngine):
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "part.pt").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as info:
        save(root, 2, engine=FullDisk())
    line = str(info.value)
    assert "\n" not in line
    assert f"no space left on the disk holding {root}" in line
    assert f"about {needed:,} bytes (the size of step_00000001)" in line
    assert not (root / "step_00000002.partial").exists()
    assert (root / "latest").read_text() == "step_00000001"
    save(root, 2)  # once there is room again the next save just works
    assert (root / "latest").read_text() == "step_00000002"


# --------------------------------------------------------------------------- item 2: injected faults
@pytest.mark.parametrize("fault", ["fsync", "replace"])
def test_an_fsync_or_rename_fault_during_a_save_leaves_the_previous_checkpoint_trusted(tmp_path, monkeypatch, fault):
    root = tmp_path / "checkpoints"
    save(root, 1)
    real = {"fsync": os.fsync, "replace": os.replace}[fault]
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, f"injected {fault} failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fault, failing)
    with pytest.raises(OSError, match="injected"):
        save(root, 2)
    monkeypatch.setattr(os, fault, real)
    assert (root / "latest").read_text() == "step_00000001"
    assert checkpoint.find_resumable(root) == "step_00000001"
    assert not (root / "step_00000002").exists() or checkpoint.verify(root / "step_00000002") is None


@pytest.mark.parametrize("fault", ["fsync", "replace"])
def test_a_fault_while_replacing_a_folder_keeps_the_old_one_in_place(tmp_path, monkeypatch, fault):
    final = tmp_path / "student"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    tmp = files.temp_dir_beside(final)
    (tmp / "model.safetensors").write_text("new")
    real = {"fsync": os.fsync, "replace": os.replace}[fault]

    def failing(*args, **kwargs):
        # the fsync of the new files, or the rename of the new folder into place
        if fault == "fsync" or Path(args[0]) == tmp:
            raise OSError(errno.EIO, f"injected {fault} failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fault, failing)
    with pytest.raises(OSError, match="injected"):
        files.replace_dir(tmp, final)
    monkeypatch.setattr(os, fault, real)
    assert (final / "model.safetensors").read_text() == "old"  # old code left no folder at all
    assert [p.name for p in tmp_path.iterdir() if p.name != tmp.name] == ["student"]


def test_a_fault_while_writing_a_marker_keeps_the_old_marker(tmp_path, monkeypatch):
    marker = tmp_path / "stage_done.json"
    files.atomic_write_text(marker, json.dumps({"steps": 1}))

    def failing(_fd):
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        files.atomic_write_text(marker, json.dumps({"steps": 2}))
    assert json.loads(marker.read_text()) == {"steps": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stage_done.json"]


# --------------------------------------------------------------------------- item 5: --output folders
@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, stage1_stopped_at_step_2):
    """A checkpoints folder of this module's own (a copy of the shared stage-1 run's)."""
    from shared_runs import copy_of_run

    tmp = tmp_path_factory.mktemp("ckpt")
    copy_of_run(stage1_stopped_at_step_2, tmp)
    return tmp / "out/general/checkpoints"


@pytest.fixture
def export(in_process, monkeypatch):
    """`export(checkpoint_dir, output, *extra, cwd=None)`: the export command, in this process."""
    def run(checkpoint_dir, output, *extra, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        return in_process(["export", "--checkpoint", str(checkpoint_dir), "--output", str(output), *extra])
    return run


def one_error_line(result) -> str:
    code, lines = result
    assert code == 2, lines
    assert not any("Traceback" in line for line in lines)
    (line,) = lines
    return line


@pytest.mark.slow  # the shared checkpoint comes from a distill process
def test_export_refuses_a_folder_that_is_not_an_earlier_export(one_checkpoint, tmp_path, export):
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):  # a folder this tool did not write is never replaced
        line = one_error_line(export(one_checkpoint, mine, *extra))
        assert re.search(r"error: --output .*my_notes exists and was not written by ernie-tiny-ds .*remove it "
                         r"yourself or name a new folder", line)
    assert (mine / "thesis.tex").read_text() == "years of work"
    # an earlier export is replaced with --overwrite only
    assert export(one_checkpoint, tmp_path / "student")[0] == 0
    assert "pass --overwrite" in one_error_line(export(one_checkpoint, tmp_path / "student"))
    assert export(one_checkpoint, tmp_path / "student", "--overwrite")[0] == 0


@pytest.mark.slow  # the shared checkpoint comes from a distill process
def test_export_output_dot_is_one_line_even_with_overwrite(one_checkpoint, tmp_path, export):
    (tmp_path / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        line = one_error_line(export(one_checkpoint, ".", *extra, cwd=tmp_path))
        assert line == "error: --output .: refusing to replace the current folder; name a new folder"
    line = one_error_line(export(one_checkpoint, one_checkpoint.parent, "--overwrite"))
    assert "contains the input --checkpoint" in line
    assert (tmp_path / "keep.txt").is_file() and (one_checkpoint / "latest").is_file()


def test_finetune_teacher_refuses_an_output_that_is_not_a_finetuned_teacher(tmp_path, tokenizer_dir, vocab_size,
                                                                             in_process, monkeypatch):
    import yaml
    from distributed import tiny_teacher

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "table.csv").write_text("1,2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "data": {"tokenizer": tokenizer_dir},
                                      "teacher": {"config": tiny_teacher(vocab_size, layers=2)},
                                      "task": {"name": "sentiment", "max_seq_len": 32}}))
    line = one_error_line(in_process(["finetune-teacher", "--config", str(recipe), "--output", str(mine)]))
    assert re.search(r"error: --output .*results exists and was not written by ernie-tiny-ds", line)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(in_process(["finetune-teacher", "--config", str(recipe), "--output", "."]))
    assert "refusing to replace the current folder" in line
    assert (mine / "table.csv").read_text() == "1,2"


def test_a_fault_while_trimming_metrics_on_resume_keeps_every_row(tmp_path, monkeypatch):
    from ernie_tiny_ds.runtime.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    path.write_text(rows)

    def failing(*_args):
        raise OSError(errno.EIO, "injected replace failure")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):  # old code truncated the file in place, then wrote
        MetricsLogger._truncate(path, start_step=2)
    monkeypatch.undo()
    assert path.read_text() == rows
    MetricsLogger._truncate(path, start_step=2).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_every_rank_with_one_line(tmp_path, stage1_on_two_ranks_stopped_at_step_4):
    """Rank 0 alone reads the checksums; its verdict reaches rank 1 too (no rank starts over at step 0,
    none waits for a broadcast that never comes)."""
    from distributed import run_ranks
    from shared_runs import copy_of_run

    recipe = copy_of_run(stage1_on_two_ranks_stopped_at_step_4, tmp_path)  # checkpoints at steps 2 and 4
    root = tmp_path / "out/general/checkpoints"
    for victim in root.glob("step_*/*optim_states.pt"):
        victim.write_bytes(victim.read_bytes()[:100])
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general"], check=False, runner="deepspeed")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    # every rank raises the same line; the launcher may end the others once the first has exited
    assert re.search(r"(\[rank 1\] )?error: every checkpoint in .*checkpoints is damaged \(step_00000004: .*; "
                     r"step_00000002: ", proc.stderr), proc.stderr[-3000:]
    assert "left the job" not in out
    assert not (tmp_path / "out/general/stage_done.json").exists()


def test_an_interrupted_export_leaves_nothing_the_next_one_keeps(tmp_path):
    """A full disk during an export leaves its temporary folder; the next export removes it."""
    import transformers

    from ernie_tiny_ds.runtime.export import export_problem, save_model_folder

    output = tmp_path / "student"
    stale = tmp_path / ".student.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    planted = tmp_path / ".student.link.tmp"
    planted.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious").write_text("x")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    with exclusive(tmp_path, "student"):  # leftovers are removed only under the job's lock
        save_model_folder(transformers.BertModel(config), None, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".student.lock", "elsewhere", "student"]
    assert (tmp_path / "elsewhere" / "precious").is_file()  # a planted link is removed, not followed
    assert export_problem(output) is None
    # readable by whoever reads the folder: transformers writes model.safetensors 0600
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in output.iterdir()} == \
        {p.name: oct(0o666 & ~umask) for p in output.iterdir()}


def test_a_full_disk_during_an_export_is_one_line(tmp_path, monkeypatch):
    import transformers

    from ernie_tiny_ds.runtime.export import save_model_folder

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config)
    needed = sum(p.numel() * 4 for p in model.parameters())

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(UserError) as info:
        save_model_folder(model, None, tmp_path / "student")
    assert str(info.value).startswith(f"no space left on the disk holding {tmp_path} (")
    assert f"the weights of student need about {needed:,} bytes" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


# what safetensors raises when the OS says the disk is full: its own error class, no errno, the OS's words inside
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')


class SafetensorFull(Exception):
    pass


@pytest.mark.parametrize("writer", ["export", "checkpoint"])
def test_a_full_disk_reported_without_an_errno_is_one_line_at_both_writers(tmp_path, monkeypatch, writer):
    """Both writers share one check: an error that only says so (safetensors' for an export, torch.save's
    RuntimeError for a checkpoint) is a full disk when the disk has less room than the write needs, and
    passes through unchanged when there is room (then it is some other failure)."""
    import transformers

    from ernie_tiny_ds.runtime.export import save_model_folder

    root = tmp_path / "checkpoints"
    if writer == "checkpoint":
        save(root, 1)

    def write(error: Exception) -> None:
        if writer == "export":
            model = transformers.BertModel(transformers.BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16))

            def full(*_args, **_kwargs):
                raise error
            monkeypatch.setattr(model, "save_pretrained", full)
            save_model_folder(model, None, tmp_path / "student")
            return

        class FullDisk(FakeEngine):
            def save_checkpoint(self, root, tag, client_state, save_latest):
                raise error
        save(root, 2, engine=FullDisk())

    error = SafetensorFull(SAFETENSORS_FULL) if writer == "export" else RuntimeError("[enforce fail] file write failed")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=7))
    with pytest.raises(UserError) as info:
        write(error)
    line = str(info.value)
    disk = tmp_path if writer == "export" else root
    assert "\n" not in line and line.startswith(f"no space left on the disk holding {disk} (7 bytes free)")
    assert not list(tmp_path.glob("*.tmp*")) and not (root / "step_00000002.partial").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 50))
    with pytest.raises(type(error)):  # room enough: not a full disk, the error is the writer's own
        write(error)


def test_stale_partial_folders_and_temporaries_are_removed_at_resume(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    (root / "step_00000002.partial").mkdir()
    (root / "step_00000002.partial" / "half.pt").write_bytes(b"x" * 100)
    (root / ".latest.abc.tmp").write_text("step_00000002")  # a `latest` whose rename never came
    with exclusive(root):  # leftovers are removed only under the job's lock
        choice = checkpoint._choose(root, None, "general", checkpoint.recipe_changes.SAFE_ON_RESUME)
    assert choice["tag"] == "step_00000001"
    assert sorted(p.name for p in root.iterdir()) == [".lock", "latest", "step_00000001"]


def test_durable_writes_keep_the_permissions_a_plain_write_gives(tmp_path):
    """Exclusive temp names (mkstemp 0600, mkdtemp 0700) must not leave exports and reports unreadable
    to the rest of a shared cluster: the final file and folder get 0666/0777 less the umask."""
    from ernie_tiny_ds.files import atomic_write_text, replace_dir, temp_dir_beside

    mask = os.umask(0o022)
    os.umask(mask)
    marker = atomic_write_text(tmp_path / "marker.json", "{}")
    assert stat.S_IMODE(marker.stat().st_mode) == 0o666 & ~mask
    staging = temp_dir_beside(tmp_path / "export")
    (staging / "config.json").write_text("{}")
    export = replace_dir(staging, tmp_path / "export")
    assert stat.S_IMODE(export.stat().st_mode) == 0o777 & ~mask
