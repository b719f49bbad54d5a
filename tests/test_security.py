"""Security (issue 13 items 17-20): pickles in checkpoints, DeepSpeed overrides that re-enable
pickle loading, shell input through the multi-node launcher, temporary files."""
import os
import re
import shutil

import pytest
import torch
from distributed import run_cli, tiny_recipe

from ernie_tiny_ds.errors import ConfigError, UserError


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
def test_resuming_from_a_checkpoint_with_a_pickle_is_one_line_and_runs_nothing(tmp_path, stopped_run, in_process):
    from ernie_tiny_ds.runtime.checkpoint import write_manifest
    recipe = str(stopped_run)  # stage 1 stopped at step 2, its checkpoint step_00000002
    tag = tmp_path / "out/general/checkpoints/step_00000002"
    marker = tmp_path / "ran"
    for victim in ("trainer_state_rank0.pt", "mp_rank_00_model_states.pt"):
        saved = tag / victim
        shutil.copy(saved, tmp_path / "saved.pt")
        torch.save({"module": _RunsCode(marker)}, saved)
        write_manifest(tag)  # a crafted checkpoint: its checksums match
        # the refusal, in this process: an uncaught exception (a traceback) fails the test by itself
        code, lines = in_process(["distill", "--config", recipe, "--stage", "general"])
        assert code == 2, lines
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and re.search(rf"{victim}: refused to load: .*could run code", errors[0]), lines
        assert not any("Traceback" in line for line in lines) and not marker.exists()
        shutil.copy(tmp_path / "saved.pt", saved)


# --------------------------------------------------------------------------- 18: deepspeed.overrides
def _ds_config(tmp_path, tokenizer_dir, vocab_size, *overrides, **sections):
    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.runtime.ds_config import build_ds_config
    from ernie_tiny_ds.runtime.engine_settings import EngineSettings
    recipe = load_recipe(str(tiny_recipe(tmp_path, tokenizer_dir, vocab_size, **sections)), list(overrides))
    return build_ds_config(recipe.deepspeed, EngineSettings.of_stage(recipe), world_size=2)


REFUSED_OVERRIDES = {
    "deepspeed.overrides.checkpoint.load_universal=true": r"overrides.checkpoint.load_universal: refused: .*pickle",
    "deepspeed.overrides.checkpoint={}": r"overrides.checkpoint: refused",
    "deepspeed.overrides.load_universal_checkpoint=true": r"overrides.load_universal_checkpoint: refused",
    "deepspeed.overrides.nebula.enabled=true": r"overrides.nebula.enabled: refused",
    "deepspeed.overrides.autotuning.enabled=true": r"overrides.autotuning.enabled: refused",
    "deepspeed.overrides.train_micro_batch_size_per_gpu=64": r"set train.micro_batch_size in the recipe",
    "deepspeed.overrides.flops_profiler.output_file=/etc/passwd":
        r"overrides.flops_profiler.output_file: not an override",
    "deepspeed.overrides.optimizer.fused=true": r"overrides.optimizer.fused: not an override",
}


@pytest.mark.parametrize("override", sorted(REFUSED_OVERRIDES))
def test_overrides_outside_the_allow_list_are_refused(tmp_path, tokenizer_dir, vocab_size, override):
    with pytest.raises(ConfigError, match=REFUSED_OVERRIDES[override]):
        _ds_config(tmp_path, tokenizer_dir, vocab_size, override)


def test_allowed_overrides_reach_the_deepspeed_config(tmp_path, tokenizer_dir, vocab_size):
    config = _ds_config(tmp_path, tokenizer_dir, vocab_size, "deepspeed.overrides.zero_optimization.stage=2",
                        "deepspeed.overrides.zero_optimization.reduce_bucket_size=1000",
                        "deepspeed.overrides.optimizer.params.foreach=true",
                        "deepspeed.overrides.gradient_clipping=0.5",
                        "deepspeed.overrides.bf16.enabled=false", "deepspeed.overrides.wall_clock_breakdown=true",
                        "deepspeed.overrides.communication_data_type=fp32")
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["optimizer"]["params"]["foreach"] is True and config["gradient_clipping"] == 0.5


def test_a_deepspeed_config_file_that_loads_pickles_is_refused(tmp_path, tokenizer_dir, vocab_size):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "checkpoint": {"load_universal": True}}))
    with pytest.raises(ConfigError, match=r"deepspeed.config .*ds.json: key 'checkpoint' refused"):
        _ds_config(tmp_path, tokenizer_dir, vocab_size, deepspeed={"config": str(path)})


def test_a_pickle_loading_override_is_one_line_on_the_command_line(tmp_path, tokenizer_dir, vocab_size, in_process):
    recipe = str(tiny_recipe(tmp_path, tokenizer_dir, vocab_size))
    code, lines = in_process(["distill", "--config", recipe, "--stage", "general",
                              "deepspeed.overrides.checkpoint.load_universal=true"])
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "deepspeed.overrides.checkpoint.load_universal: refused" in errors[0], lines
    assert not any("Traceback" in line for line in lines) and not (tmp_path / "out/general/checkpoints").exists()


# --------------------------------------------------------------------------- 19: the ssh launch
def _fake_pdsh(tmp_path):
    """pdsh and ssh stood in for (test_launch.fake_pdsh): each "remote" node runs the setup part of the
    line deepspeed's runner hands pdsh (exports and cd) in bash, as a remote shell would."""
    from test_launch import fake_pdsh
    bin_dir = fake_pdsh(tmp_path / "bin", '"$setup true"')
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return bin_dir, hostfile


@pytest.mark.slow
@pytest.mark.parametrize("where", ["exported by deepspeed", ".deepspeed_env key"])
def test_nothing_from_the_environment_runs_in_the_remote_shell(tmp_path, where):
    bin_dir, hostfile = _fake_pdsh(tmp_path)
    marker = tmp_path / "ran"
    workdir = tmp_path / "work"
    workdir.mkdir()
    extra = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    if where == "exported by deepspeed":
        extra["PYTHONWARNINGS"] = f"$(touch {marker})"  # deepspeed exports PYTHON* itself, in double quotes
    else:
        (workdir / ".deepspeed_env").write_text(f"$(touch {marker})X=1\n")
    proc = run_cli(["launch", "--hostfile", str(hostfile), "--num_gpus", "1", "--master_addr", "node-a", "--",
                    "distill", "--config", "r.yaml"], cwd=workdir, extra_env=extra, timeout=120)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "$(touch" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_check_ssh_safe_covers_every_part_of_the_remote_line(tmp_path, monkeypatch):
    from ernie_tiny_ds.launch.runner import check_ssh_safe
    monkeypatch.chdir(tmp_path)
    ok_env = {"ETS_PROBE": "two words; it's fine", "NCCL_SOCKET_IFNAME": "^docker0,lo"}
    check_ssh_safe(["distill", "--config", "a recipe.yaml"], ok_env, "node-a", {"PYTHONPATH": "/opt/x y"})
    refused = [
        ({"X": "`id`"}, "node-a", {}), ({"X": 'a"b'}, "node-a", {}), ({"X": "a\\b"}, "node-a", {}),
        ({"X": "%h"}, "node-a", {}), ({"A;B": "1"}, "node-a", {}),
        ({}, "node-a;touch x", {}), ({}, "-oProxyCommand=x", {}), ({}, "node a", {}),
        ({}, "node-a", {"PYTHONSTARTUP": "$(id)"}), ({}, "node-a", {"NCCL_DEBUG": "`id`"}),
        ({}, "node-a", {"LD_LIBRARY_PATH": "/lib\"; id; \""}), ({}, "node-a", {"PYTHON$(id)": "1"}),
    ]
    for env, addr, launch_env in refused:
        with pytest.raises(UserError, match="remote shell"):
            check_ssh_safe(["distill"], env, addr, launch_env)
    check_ssh_safe(["distill"], {}, "node-a", {"HOME_DIR": "$(id)"})  # not exported by the runner: not checked


def test_the_runner_exports_no_prefix_we_do_not_check():
    from deepspeed.launcher.runner import EXPORT_ENVS

    from ernie_tiny_ds.launch.runner import RUNNER_EXPORTED_PREFIXES
    assert set(EXPORT_ENVS) <= set(RUNNER_EXPORTED_PREFIXES)


def test_master_addr_and_hostfile_names_are_host_names(tmp_path):
    from test_launch import user_error
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\n")
    message = user_error(["launch", "--hostfile", str(hostfile), "--no-ssh", "--node_rank", "0", "--master_addr",
                          "node-a;id", "--dry-run", "--", "export", "--checkpoint", "c", "--output", "o"])
    assert "--master_addr 'node-a;id' is not a host name" in message
    hostfile.write_text("node-a slots=1\n-oProxyCommand=id slots=1\n")
    message = user_error(["launch", "--hostfile", str(hostfile), "--dry-run", "--", "export", "--checkpoint", "c",
                          "--output", "o"])
    assert "line 2: '-oProxyCommand=id' is not a host name" in message


# --------------------------------------------------------------------------- 20: temporary files
def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    return victim


def test_preprocess_never_writes_through_a_planted_temp_name(tmp_path, tokenizer_dir):
    from distributed import write_corpus

    from ernie_tiny_ds.config import DataConfig
    from ernie_tiny_ds.data.preprocess import preprocess
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    victim = _victim(tmp_path)
    out = tmp_path / "shards"
    # the names the old code used, planted as symlinks by someone who can write to the folder
    for name in (f".shards.tmp-{os.getpid()}", f".shards.old-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim, target_is_directory=True)
    cfg = DataConfig(corpus=str(write_corpus(tmp_path / "corpus", documents=16)), max_seq_len=32)
    tokenizer = load_tokenizer(tokenizer_dir)
    meta = preprocess(cfg, tokenizer, tokenizer_dir, out, workers=1, progress=False)
    again = preprocess(cfg, tokenizer, tokenizer_dir, out, workers=1, overwrite=True, progress=False)
    assert meta["documents"] == again["documents"] == 16 and (out / "meta.json").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert not list(tmp_path.glob(".shards.tmp-*-*"))  # its own temp folder is gone


def test_a_checkpoint_save_never_writes_through_a_planted_partial_folder(tmp_path):
    from ernie_tiny_ds.runtime import checkpoint
    victim = _victim(tmp_path)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_00000002.partial").symlink_to(victim, target_is_directory=True)

    class Engine:  # writes as DeepSpeed's save_checkpoint does: makedirs(exist_ok=True), then files
        def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=False):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            torch.save({"w": torch.zeros(1)}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    from ernie_tiny_ds.outputs import exclusive
    with exclusive(root):  # a job's save: under its output_dir's lock
        final = checkpoint.save(Engine(), root, 2, {"step": 2})
    assert final == root / "step_00000002" and not final.is_symlink()
    assert (final / "mp_rank_00_model_states.pt").is_file() and checkpoint.verify(final) is None
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def test_onnx_export_never_writes_through_a_planted_temp_name(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    from ernie_tiny_ds.workflows import onnx_export
    victim = _victim(tmp_path) / "precious.txt"
    out = tmp_path / "model.onnx"
    (tmp_path / f".model.onnx.{os.getpid()}.tmp").symlink_to(victim)  # the old predictable name

    def fake_export(_module, _args, path, **_kw):  # opens the path as the real exporter does
        with open(path, "wb") as handle:
            handle.write(b"onnx graph")
    monkeypatch.setattr(torch.onnx, "export", fake_export)
    monkeypatch.setattr(onnx_export, "check_against_pytorch", lambda path, module: 0.0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32))
    onnx_export.export_onnx(model, out)
    assert out.read_bytes() == b"onnx graph" and not out.is_symlink()
    assert victim.read_text() == "keep me\n"
