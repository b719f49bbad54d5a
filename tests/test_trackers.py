"""train.report_to: every metrics.jsonl row and the final report go to W&B (offline mode, WANDB_DIR=tmp)
and MLflow (a file:// store in tmp), from rank 0 only. Nothing leaves the machine."""
import glob
import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from distributed import read_metrics, run_ranks, tiny_recipe  # noqa: E402

from ernie_tiny_ds.config import load_recipe  # noqa: E402
from ernie_tiny_ds.errors import UserError  # noqa: E402
from ernie_tiny_ds.runtime import rank_registry  # noqa: E402
from ernie_tiny_ds.runtime.metrics import MetricsLogger  # noqa: E402
from ernie_tiny_ds.runtime.trackers import recipe_trackers  # noqa: E402


def local_only(tmp_path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
            "WANDB_DISABLE_GIT": "true", "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 keeps its file store behind this switch


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    env = local_only(tmp_path)
    (tmp_path / "wandb").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def wandb_runs(wandb_dir: Path) -> list[dict]:
    """The offline runs W&B wrote: name, group and history rows, read from its .wandb files (a
    LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, buf, records = Path(path).read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += room
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):
                records.append(buf)
        run = {"history": [], "summary": {}}
        for raw in records:
            record = pb.Record()
            record.ParseFromString(raw)
            which = record.WhichOneof("record_type")
            if which == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, project=record.run.project)
            elif which == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                run["history"].append({k: v for k, v in items.items() if not k.startswith("_")})
            elif which == "summary":
                run["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in record.summary.update})
        runs.append(run)
    return sorted(runs, key=lambda r: r["name"])


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    return [(run, client) for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def test_rows_and_report_reach_wandb_and_mlflow_from_rank_0_only(tmp_path, offline_trackers):
    out = tmp_path / "out"
    recipe = load_recipe(None, ["teacher.config={}", f"output_dir={out}", "train.report_to=[tensorboard,wandb,mlflow]",
                                "train.tracker_project=ernie-test"])
    trackers = recipe_trackers(recipe)
    for rank in (1, 0):  # rank 1 first: it must open nothing
        log = MetricsLogger(out / "general", rank, 3, 0, "General", progress_bar=False, log_every=1, trackers=trackers)
        for step in (1, 2, 3):
            log.step(step, {"loss": 1.0 / step, "hidden": 0.5 / step, "lr": 0.01}, tokens=64)
        log.close()
    report = {"retained": 0.97, "speedup": 3.5, "throughput_ratio": 3.0,
              "teacher": {"path": "t", "metrics": {"accuracy": 0.9}, "latency_ms_batch1": 7.0, "params": 100},
              "student": {"path": "s", "metrics": {"accuracy": 0.87}, "latency_ms_batch1": 2.0, "params": 10}}
    (out / "report.json").write_text(json.dumps(report))
    (out / "report.md").write_text("# report\n")
    trackers.log_report(report, out, [out / "report.json", out / "report.md"])

    runs = wandb_runs(tmp_path / "wandb")
    assert [r["name"] for r in runs] == ["ernie-test/general", "ernie-test/report"]
    assert all(r["project"] == "ernie-test" and r["group"] == str(out.resolve()) for r in runs)
    rows = read_metrics(out / "general" / "metrics.jsonl")
    assert [h["loss"] for h in runs[0]["history"]] == [row["loss"] for row in rows] == [1.0, 0.5, 0.3333333]
    assert all({"hidden", "lr", "tokens_per_s"} <= set(h) for h in runs[0]["history"])
    assert runs[1]["summary"]["retained"] == 0.97 and runs[1]["summary"]["student.metrics.accuracy"] == 0.87

    found = {run.info.run_name: (run, client) for run, client in mlflow_runs(offline_trackers["MLFLOW_TRACKING_URI"])}
    assert set(found) == {"ernie-test/general", "ernie-test/report"}
    run, client = found["ernie-test/general"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 0.3333333)]
    assert run.data.params["train.report_to"] == "['tensorboard', 'wandb', 'mlflow']" and run.info.status == "FINISHED"
    report_run, _ = found["ernie-test/report"]
    assert report_run.data.metrics["speedup"] == 3.5
    artifacts = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert artifacts == {"report.json", "report.md"}
    assert (out / "tensorboard" / "report").is_dir()  # tensorboard named: the report's figures there too


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run_open(tmp_path, offline_trackers, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    recipe = load_recipe(None, ["teacher.config={}", f"output_dir={tmp_path / 'out'}",
                                "train.report_to=[wandb,mlflow]"])
    with pytest.raises(UserError, match=r"train.report_to: mlflow could not start a run at file://.*"
                                        r"MLFLOW_ALLOW_FILE_STORE=true") as err:
        MetricsLogger(tmp_path / "out" / "general", 0, 3, 0, "General", progress_bar=False,
                      trackers=recipe_trackers(recipe))
    assert "\n" not in str(err.value)
    import wandb
    assert wandb.run is None  # the W&B run opened first was finished


def test_a_cli_call_leaves_no_trackers_behind_for_later_logs(tmp_path, offline_trackers, monkeypatch, capsys):
    """The trackers belong to the run whose recipe names them: a `distill` that stops with one line (its
    output_dir is a file) must not make a later log in the same process open W&B or MLflow runs."""
    from ernie_tiny_ds.cli import main

    def report(line, code=1):  # the one-line exit (os._exit in production) as SystemExit, in this process
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(code)

    monkeypatch.setattr(rank_registry, "report_and_exit", report)
    (tmp_path / "a_file").write_text("not a folder")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"teacher: {{config: {{}}}}\noutput_dir: {tmp_path / 'a_file'}\n"
                      "train: {report_to: [wandb, mlflow], tracker_project: leaked}\n")
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--config", str(recipe)])
    assert stop.value.code == 2 and "output_dir" in capsys.readouterr().err
    log = MetricsLogger(tmp_path / "other" / "general", 0, 1, 0, "General", progress_bar=False)
    log.step(1, {"loss": 1.0}, tokens=8)
    log.close()
    assert wandb_runs(tmp_path / "wandb") == []
    assert mlflow_runs(offline_trackers["MLFLOW_TRACKING_URI"]) == []


@pytest.mark.slow
def test_distill_on_two_ranks_logs_once(tmp_path, tokenizer_dir, vocab_size, offline_trackers):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 3, "save_every": 3})
    env = offline_trackers  # in os.environ, which run_ranks passes on
    run_ranks(["distill", "--config", str(recipe), "--stage", "general", "train.report_to=[wandb,mlflow]",
               "train.tracker_project=two-ranks"], timeout=600)
    runs = wandb_runs(tmp_path / "wandb")
    assert [r["name"] for r in runs] == ["two-ranks/general"]
    assert [h["loss"] for h in runs[0]["history"]] == [r["loss"] for r in read_metrics(tmp_path / "out" / "general" /
                                                                                       "metrics.jsonl")]
    found = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    assert [run.info.run_name for run, _ in found] == ["two-ranks/general"]
    run, client = found[0]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
