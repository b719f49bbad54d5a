"""Security (issue 13 items 17-20): pickles in checkpoints, DeepSpeed overrides that re-enable
pickle loading, shell input through the multi-node launcher, temporary files."""
import os
import re
import shutil

import pytest
import torch

from ernie_tiny_ds.errors import ConfigError, UserError

from distributed import run_cli, tiny_recipe


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- 17: pickles in checkpoints
def test_a_pickle_in_a_checkpoint_file_is_refused_in_one_line(tmp_path):
    from ernie_tiny_ds.runtime import safe_load
    marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _RunsCode(marker)}, tmp_path / "states.pt")
    with pytest.raises(UserError, match=r"states.pt: refused to load: .*GLOBAL posix.system.*could run code"):
        safe_load.load(tmp_path / "states.pt")
    assert not marker.exists()
    torch.save({"module": {"w": torch.zeros(2)}, "step": 3}, tmp_path / "fine.pt")
    assert safe_load.load(tmp_path / "fine.pt")["step"] == 3


@pytest.mark.slow
def test_resuming_from_a_checkpoint_with_a_pickle_is_one_line_and_runs_nothing(tmp_path, tokenizer_dir, vocab_size):
    from ernie_tiny_ds.runtime.checkpoint import write_manifest
    recipe = str(tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 4, "save_every": 2}))
    first = run_cli(["distill", "--config", recipe, "--stage", "general", "train.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    tag = tmp_path / "out/general/checkpoints/step_00000002"
    marker = tmp_path / "ran"
    for victim in ("trainer_state_rank0.pt", "mp_rank_00_model_states.pt"):
        saved = tag / victim
        shutil.copy(saved, tmp_path / "saved.pt")
        torch.save({"module": _RunsCode(marker)}, saved)
        write_manifest(tag)  # a crafted checkpoint: its checksums match
        proc = run_cli(["distill", "--config", recipe, "--stage", "general"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.search(rf"{victim}: refused to load: .*could run code", errors[0]), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and not marker.exists()
        shutil.copy(tmp_path / "saved.pt", saved)
