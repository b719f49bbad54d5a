"""Experiment trackers (`train.report_to: [tensorboard, wandb, mlflow]`): every metrics.jsonl row of a
stage and the final report, logged by rank 0 only.

Each tracker is driven through its own client (wandb, mlflow's MlflowClient, torch's SummaryWriter),
not through accelerate.tracking: accelerate's tracker classes log through accelerate.logging, which
raises unless an Accelerator's PartialState exists, and creating one inside DeepSpeed's ranks would put
a second process-state manager over our process group. (accelerate is no longer a dependency.)

Runs: one per stage, named `<project>/<stage>` and grouped by the output folder (a resumed stage
opens a new run), and one `<project>/report` with the report's figures and report.json/md attached.
TensorBoard rows are written by MetricsLogger itself (OUT/<stage>/tensorboard, always); naming
tensorboard here adds the report's figures under OUT/tensorboard/report.
Nothing here picks a server: W&B follows WANDB_MODE / WANDB_DIR / `wandb login`, MLflow follows
MLFLOW_TRACKING_URI (e.g. file:///path/mlruns for a local store).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import to_dict
from ..config.dotted import flatten
from ..errors import UserError
from .deepspeed_startup import restore_mlflow

ROW_TRACKERS = ("wandb", "mlflow")  # tensorboard rows: MetricsLogger already writes them


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(values).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _WandbRun:
    def __init__(self, project: str, name: str, group: str, config: dict, folder: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("train.report_to: wandb needs the wandb package: pip install 'ernie-tiny-ds[trackers]'") \
                from None
        folder.mkdir(parents=True, exist_ok=True)
        try:
            # WANDB_DIR wins when set; else the run's files stay beside the stage's outputs
            # no reinit option (its values changed across wandb versions): every run is finished before the next
            self.run = wandb.init(project=project, name=name, group=group, config=config,
                                  dir=None if os.environ.get("WANDB_DIR") else str(folder))
        except Exception as exc:  # wandb raises its own UsageError/CommError: no API key, no network
            raise UserError(f"train.report_to: wandb could not start a run: {' '.join(str(exc).split())} "
                            "(log in with `wandb login`, or set WANDB_MODE=offline)") from None

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def attach(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class _MlflowRun:
    def __init__(self, project: str, name: str, group: str, config: dict, folder: Path):
        restore_mlflow()  # the CLI hides it from DeepSpeed's import (runtime/deepspeed_startup.py)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("train.report_to: mlflow needs mlflow: pip install 'ernie-tiny-ds[trackers]' "
                            "(mlflow-skinny)") from None
        self.client = None
        try:
            # the client, not mlflow's module-level active run: nothing global to leak between stages
            self.client = MlflowClient()
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            self.run_id = self.client.create_run(experiment_id, run_name=name,
                                                 tags={"ernie_tiny_ds.group": group}).info.run_id
            params = {k: str(v)[:500] for k, v in flatten(config).items()}  # MLflow's value limit
            from mlflow.entities import Param
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as exc:  # MlflowException, connection errors
            where = self.client.tracking_uri if self.client is not None else (
                os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default store")
            text = " ".join(str(exc).split())
            hint = " (a file:// store needs MLFLOW_ALLOW_FILE_STORE=true)" if "MLFLOW_ALLOW_FILE_STORE" in text else ""
            raise UserError(f"train.report_to: mlflow could not start a run at {where}: "
                            f"{text.split('. ')[0][:200]}{hint}") from None

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _numbers(values).items()])

    def summary(self, values: dict) -> None:
        self.log(0, values)

    def attach(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _TensorBoardRun:
    """Only for the report (stage rows are MetricsLogger's own TensorBoard scalars)."""

    def __init__(self, project: str, name: str, group: str, config: dict, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder / "tensorboard" / name.rsplit("/", 1)[-1]))

    def log(self, step: int, values: dict) -> None:
        for key, value in _numbers(values).items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict) -> None:
        self.log(0, values)

    def attach(self, path: Path) -> None:
        if path.suffix == ".md":
            self.writer.add_text("report", path.read_text())

    def close(self) -> None:
        self.writer.close()


_KINDS = {"wandb": _WandbRun, "mlflow": _MlflowRun, "tensorboard": _TensorBoardRun}


class StageRuns:
    """One stage's runs; MetricsLogger forwards each row to log() and calls close() at the end."""

    def __init__(self, runs: list):
        self.runs = runs

    def log(self, step: int, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step"}
        for run in self.runs:
            run.log(step, values)

    def close(self) -> None:
        for run in self.runs:
            run.close()


class Trackers:
    """The recipe's trackers. MetricsLogger calls open() on rank 0 when a stage's log starts."""

    def __init__(self, recipe):
        self.names = list(dict.fromkeys(recipe.train.report_to))
        out = Path(recipe.output_dir)
        self.project = recipe.train.tracker_project or out.resolve().name
        self.group = str(out.resolve())
        self.config = to_dict(recipe)

    def open(self, title: str, out_dir: Path, start_step: int) -> StageRuns:
        stage = Path(out_dir).name
        name = f"{self.project}/{stage}"
        config = {**self.config, "stage": stage, "start_step": start_step}
        runs = []
        try:
            for kind in self.names:
                if kind in ROW_TRACKERS:
                    runs.append(_KINDS[kind](self.project, name, self.group, config, Path(out_dir)))
        except BaseException:
            StageRuns(runs).close()  # no run left open when a later tracker cannot start
            raise
        return StageRuns(runs)

    def log_report(self, report: dict, out: Path, files: list[Path]) -> None:
        """The report's figures (and report.json/md attached) as a run of its own."""
        figures = {k: report[k] for k in ("retained", "speedup", "throughput_ratio") if report.get(k) is not None}
        for who in ("teacher", "student"):
            figures[who] = {k: v for k, v in report[who].items() if k != "path"}
        if report.get("onnx"):
            figures["onnx"] = {k: v for k, v in report["onnx"].items() if k in ("speedup", "teacher", "student")}
        flat = _numbers(figures)
        for kind in self.names:
            run = _KINDS[kind](self.project, f"{self.project}/report", self.group, self.config, out)
            try:
                run.summary(flat)
                for path in files:
                    run.attach(path)
            finally:
                run.close()


def recipe_trackers(recipe) -> Trackers | None:
    """The trackers train.report_to names (None when it names none): a stage passes them to its
    MetricsLogger, the report logs through them. Nothing opens a run until one of those asks."""
    return Trackers(recipe) if recipe.train.report_to else None
