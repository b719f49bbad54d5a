"""OUT/report.md, OUT/report.json and loss plots: what the student kept of the teacher, and how much
faster it runs, measured side by side on this machine."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Recipe
from ..data.constant_predictions import KEY as CONSTANT
from ..data.memorisation import KEY as MEMORISATION
from ..data.memorisation import TRAINING_ROWS, memorisation
from ..files import atomic_write_text, write_atomic
from ..runtime.loop import DONE_FILE
from ..runtime.metrics import RATE_FIELDS
from ..stages import STAGE_SPECS, shipping_stage

if TYPE_CHECKING:
    from ..data.tasks import TaskData


def read_curve(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(curve: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    names = [k for k in curve[0] if k not in RATE_FIELDS]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in curve]
    for name in names:
        ax.plot(steps, [row.get(name) for row in curve], label=name, linewidth=2 if name == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, dpi=100, format="png"))
    plt.close(fig)


def mean_padding(curve: list[dict]) -> float | None:
    """The stage's padded share: the mean over its metrics rows that carry one (None: no row does)."""
    shares = [row["padding"] for row in curve if row.get("padding") is not None]
    return round(sum(shares) / len(shares), 4) if shares else None


def stage_section(out: Path, skipped: tuple[str, ...] = ()) -> list[dict]:
    """Each finished stage in OUT, in pipeline order; `skipped` (pipeline --skip-stage) are left out even
    when an earlier run left their folder there, since the shipped student never passed through them."""
    stages = []
    for name, spec in STAGE_SPECS.items():
        done_file = out / name / DONE_FILE
        if name in skipped or not done_file.is_file():
            continue
        done = json.loads(done_file.read_text())
        curve = read_curve(out / name)
        entry = {"name": name, "title": spec.title, "steps": done["steps"],
                 "final_loss": done["final_loss"], "teacher": done.get("teacher"),
                 "student_init": done.get("student_init"), "loss_terms": done.get("loss_terms", []),
                 "first_loss": curve[0]["loss"] if curve else None, "padding": mean_padding(curve)}
        if curve:
            entry["plot"] = f"loss_{name}.png"
            plot_curve(curve, spec.title, out / entry["plot"])
        stages.append(entry)
    return stages


def build_report(recipe: Recipe, out: Path, skipped: tuple[str, ...] = ()) -> dict:
    """Evaluate the finetuned teacher and the final student on the task's dev split, time both, write the report
    (`skipped`: stages the pipeline left out, not listed among the stages)."""
    from ..data.tasks import load_task

    task = load_task(recipe.task)
    seq_len = recipe.task.max_seq_len
    from ..data.hub import resolve as resolve_hub
    from .evaluate import dev_metrics, load_classifier
    from .speed import compare_inference
    finetuned = resolve_hub(recipe.teacher.finetuned_path, "teacher.finetuned_path", recipe.teacher.finetuned_revision)
    models = {"teacher": finetuned, "student": recipe.student.path}
    loaded = {who: load_classifier(path, task) for who, path in models.items()}  # (model, tokenizer), once each
    # timed as loaded for scoring (the classifiers both folders hold), same threads, one process
    speed = compare_inference(loaded["teacher"][0], loaded["student"][0], seq_len=seq_len)
    teacher, student = ({"path": str(path), "metrics": dev_metrics(*loaded[who], task), **speed[who]}
                        for who, path in models.items())
    main = task.main_metric
    teacher_score, student_score = teacher["metrics"][main], student["metrics"][main]
    report = {
        "task": recipe.task.name or recipe.task.train_file,
        "main_metric": main,
        "stages": stage_section(out, skipped),
        "teacher": teacher,
        "student": student,
        "selection": selection_section(recipe, out, Path(models["student"]), student["metrics"]),
        "teacher_selection": teacher_selection_section(recipe, Path(models["teacher"]), teacher["metrics"]),
        "retained": student_score / teacher_score if teacher_score else None,
        "training_rows": training_rows_section(loaded, task, main, teacher_score, student_score),
        "speedup": teacher["latency_ms_batch1"] / student["latency_ms_batch1"],
        "throughput_ratio": student["throughput_batch32"] / teacher["throughput_batch32"],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": __import__("torch").get_num_threads(), "seq_len": seq_len},
    }
    from .onnx_export import onnx_available, report_section
    release = recipe.release
    if release.onnx is True or release.int8 or (release.onnx == "auto" and onnx_available()):
        # model.onnx (and model.int8.onnx) ship in the student's folder; all graphs timed beside PyTorch in one run
        report["onnx"] = report_section(models["teacher"], models["student"], out, seq_len, int8=release.int8)
    if release.int8:
        from .onnx_int8 import release_section
        report["int8"] = release_section(report["onnx"], student, recipe.task, main)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_markdown(report))
    from .model_card import write_cards
    write_cards(report, recipe, out)  # README.md in every stage's student folder: the export is a release
    from ..runtime.trackers import recipe_trackers
    trackers = recipe_trackers(recipe)
    if trackers is not None:  # train.report_to (the report runs on rank 0 only)
        trackers.log_report(report, out, [out / "report.json", out / "report.md"])
    for who in ("teacher", "student"):
        if CONSTANT in report[who]["metrics"]:
            print(f"warning: the {who} in {report[who]['path']}: {report[who]['metrics'][CONSTANT]}", flush=True)
    if MEMORISATION in report["training_rows"]:
        print(f"warning: {report['training_rows'][MEMORISATION]}", flush=True)
    print(f"report: student keeps {report['retained']:.1%} of the teacher's {main} "
          f"({student_score:.4g} vs {teacher_score:.4g}), {report['speedup']:.2f}x faster at batch 1; "
          f"{out / 'report.md'}", flush=True)
    return report


def training_rows_section(loaded: dict, task: TaskData, main: str, teacher_dev: float, student_dev: float) -> dict:
    """Both loaded models' main metric on training rows, with the memorisation line when the student
    keeps far more of the teacher's score there than on dev (data/memorisation.py)."""
    from .evaluate import training_rows_score
    (teacher_train, rows), (student_train, _) = (training_rows_score(*loaded[who], task, TRAINING_ROWS)
                                                 for who in ("teacher", "student"))
    section = {"rows": rows, "teacher": teacher_train, "student": student_train}
    line = memorisation(main, rows, teacher_train, student_train, teacher_dev, student_dev)
    return {**section, MEMORISATION: line} if line else section


def selection_section(recipe: Recipe, out: Path, shipped: Path, shipped_metrics: dict) -> dict | None:
    """The shipping stage's best checkpoint beside its last one (both scored on dev) and which one
    ships; None without train.eval_every's student_best/."""
    from ..runtime.selection import BEST_DIR, ship_choice

    stage = out / shipping_stage().name
    return best_and_last(recipe, stage / BEST_DIR, stage / "student", shipped, shipped_metrics, ship_choice(recipe))


def teacher_selection_section(recipe: Recipe, teacher: Path, teacher_metrics: dict) -> dict | None:
    """Teacher finetuning's best beside its last (both on dev) and which one stages 2-4 distilled from
    (`teacher`); None without finetune.eval_every's best teacher."""
    from .finetune import last_and_best, ship_choice

    last, best = last_and_best(teacher)
    return best_and_last(recipe, best, last, teacher, teacher_metrics, ship_choice(recipe))


def best_and_last(recipe: Recipe, best: Path, last: Path, used: Path, used_metrics: dict, choice: str) -> dict | None:
    """Both folders scored on dev (the used one's metrics reused), the best's step and selection score;
    None when `best` holds no best.json."""
    from ..runtime.selection import read_best
    from .evaluate import evaluate_model

    info = read_best(best)
    if info is None:
        return None
    used = used.resolve()
    section = {"ships": "best" if used == best.resolve() else "last", "choice": choice, "best_step": info["step"],
               "selected_on": info["split"], "selection_score": info["score"]}
    for who, folder in (("best", best), ("last", last)):
        section[who] = {"path": str(folder), "metrics": used_metrics if folder.resolve() == used
                        else evaluate_model(folder, recipe.task)}
    return section


def selection_lines(sel: dict | None, main: str, title: str = "checkpoint (task-specific stage)",
                    verdict: str = "**{}** ships.") -> list[str]:
    if sel is None:
        return []
    return ["", f"## Best and last {title}", "",
            f"The best by {main} on the {sel['selected_on']} split (step {sel['best_step']}, "
            f"{_fmt(sel['selection_score'])}) and the last, both on dev; {verdict.format(sel['ships'])}", "",
            f"| {title.split()[0]} | dev {main} |", "|---|---|",
            f"| best (step {sel['best_step']}) | {_fmt(sel['best']['metrics'].get(main))} |",
            f"| last | {_fmt(sel['last']['metrics'].get(main))} |"]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(r: dict) -> str:
    t, s = r["teacher"], r["student"]
    lines = ["# ernie-tiny-ds report", "",
             f"Task **{r['task']}**, main metric **{r['main_metric']}**: the student keeps "
             f"**{r['retained']:.1%}** of the teacher's score and runs **{r['speedup']:.2f}×** faster "
             f"at batch 1 ({r['throughput_ratio']:.2f}× the throughput at batch 32).", "",
             "## Stages", "", "| stage | steps | first loss | final loss | padded share | teacher | started from "
             "| loss terms |", "|---|---|---|---|---|---|---|---|"]
    for st in r["stages"]:
        padding = "n/a" if st.get("padding") is None else f"{st['padding']:.1%}"
        lines.append(f"| {st['title']} | {st['steps']} | {_fmt(st['first_loss'])} | {_fmt(st['final_loss'])} | "
                     f"{padding} | {st['teacher']} | {st['student_init']} | {', '.join(st['loss_terms'])} |")
    lines += ["", "Padded share: the mean over the stage's logged steps of the padded positions in rank 0's "
              "micro-batches."]
    lines += ["", "### Loss curves", ""]
    lines += [f"![{st['title']}]({st['plot']})" for st in r["stages"] if "plot" in st]
    metric_names = [k for k in t["metrics"] if k != CONSTANT]
    lines += ["", "## Quality (dev split)", "", "| model | " + " | ".join(metric_names) + " |",
              "|---|" + "---|" * len(metric_names)]
    for who, m in (("teacher", t), ("student", s)):
        lines.append(f"| {who} | " + " | ".join(_fmt(m["metrics"].get(k)) for k in metric_names) + " |")
    lines += [f"\n**Warning, the {who}: {m['metrics'][CONSTANT]}**" for who, m in (("teacher", t), ("student", s))
              if CONSTANT in m["metrics"]]
    fit = r.get("training_rows")
    if fit:  # what tells a student that memorised its rows from one that did not train long enough
        lines += ["", f"On {fit['rows']} training rows ({r['main_metric']}): teacher {_fmt(fit['teacher'])}, "
                  f"student {_fmt(fit['student'])}."]
        if MEMORISATION in fit:
            lines.append(f"\n**Warning, the student: {fit[MEMORISATION]}**")
    lines += selection_lines(r.get("teacher_selection"), r["main_metric"], "teacher (finetuning)",
                             "stages 2-4 distilled from the **{}** one.")
    lines += selection_lines(r.get("selection"), r["main_metric"])
    lines += ["", "## Size and speed", "",
              "| model | parameters | latency, batch 1 (ms) | throughput, batch 32 (seq/s) |", "|---|---|---|---|",
              f"| teacher | {t['params']:,} | {t['latency_ms_batch1']:.2f} | {t['throughput_batch32']:.1f} |",
              f"| student | {s['params']:,} | {s['latency_ms_batch1']:.2f} | {s['throughput_batch32']:.1f} |",
              "", f"Size ratio {t['params'] / s['params']:.2f}×, speed-up {r['speedup']:.2f}× (batch 1), "
              f"sequence length {r['machine']['seq_len']}, measured in turns (teacher, student, …) in one process on "
              f"{r['machine']['processor']} ({r['machine']['platform']}), {r['machine']['torch_threads']} torch "
              "threads.", ""]
    onnx = r.get("onnx")
    if onnx:
        same = onnx["pytorch_same_run"]
        lines += ["## ONNX Runtime (CPU)", "",
                  "| model | runtime | latency, batch 1 (ms) | throughput, batch 32 (seq/s) "
                  "| max abs diff vs PyTorch |",
                  "|---|---|---|---|---|"]
        for who in ("teacher", "student"):
            lines += [f"| {who} | PyTorch | {same[who]['latency_ms_batch1']:.2f} | "
                      f"{same[who]['throughput_batch32']:.1f} | |",
                      f"| {who} | ONNX Runtime | {onnx[who]['latency_ms_batch1']:.2f} | "
                      f"{onnx[who]['throughput_batch32']:.1f} | {onnx[who]['max_abs_diff']:.2g} |"]
        lines += ["", f"Speed-up under ONNX Runtime {onnx['speedup']:.2f}× (PyTorch in the same run "
                  f"{same['speedup']:.2f}×), opset {onnx['opset']}, all four timed in turns in one process. "
                  f"The student's graph: `{onnx['student']['path']}`.", ""]
    lines += int8_lines(r.get("int8"), r["main_metric"])
    return "\n".join(lines)


def int8_lines(r: dict | None, main_metric: str) -> list[str]:
    """The int8 graph beside the fp32 one (release.int8)."""
    if r is None:
        return []
    lines = ["## int8 release (ONNX Runtime, CPU)", "",
             f"| graph | size (MiB) | dev {main_metric} | latency, batch 1 (ms) | latency, batch 32 (ms) |",
             "|---|---|---|---|---|"]
    for name in ("fp32", "int8"):
        g = r[name]
        lines.append(f"| {name} | {g['size_mib']:.1f} | {g['metrics'][main_metric]:.4g} | "
                     f"{g['latency_ms_batch1']:.2f} | {g['latency_ms_batch32']:.1f} |")
    retained = "n/a" if r["retained"] is None else f"{r['retained']:.1%}"
    return lines + ["", f"The int8 student keeps **{retained}** of the fp32 student's {main_metric} and runs "
                    f"**{r['speedup_batch1']:.2f}×** faster at batch 1 ({r['speedup_batch32']:.2f}× at batch 32), "
                    f"{r['size_ratio']:.2f}× smaller (ONNX Runtime's dynamic quantisation, int8 weights; both graphs "
                    f"timed in turns in the run above). The graph: `{r['int8']['path']}`.", ""]


def build_students_report(recipe: Recipe, out: Path) -> dict:
    """OUT/report.md|json for a recipe with `students:`: one row per student, from each student's own
    report (OUT/<name>/report.json) and its stages' stage_done.json."""
    rows = []
    for shape in recipe.students:
        folder = out / shape.name
        report_file = folder / "report.json"
        own = json.loads(report_file.read_text()) if report_file.is_file() else {}
        student = shape.shaped(recipe.student)
        row = {"name": shape.name, "folder": str(folder),
               "shape": f"{student.num_hidden_layers}L-{student.hidden_size}",
               "stages": {st["name"]: st["final_loss"] for st in stage_section(folder)}}
        if own:
            main = own["main_metric"]
            row.update(main_metric=main, score=own["student"]["metrics"][main], retained=own["retained"],
                       speedup=own["speedup"], params=own["student"]["params"], student=own["student"]["path"])
        rows.append(row)
    report = {"students": rows}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_students_markdown(rows))
    return report


def render_students_markdown(rows: list[dict]) -> str:
    stages = [name for name in STAGE_SPECS if any(name in row["stages"] for row in rows)]
    lines = ["# ernie-tiny-ds report: several students from one teacher", "",
             "The general-corpus stages trained every student on one teacher pass per batch; the task stages ran "
             "per student. Each student's own report: `<name>/report.md`.", "",
             "| student | shape | parameters | dev score | retained | speed-up (batch 1) | "
             + " | ".join(f"{name} final loss" for name in stages) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(stages)]
    for row in rows:
        score = f"{_fmt(row['score'])} ({row['main_metric']})" if "score" in row else "n/a"
        retained = f"{row['retained']:.1%}" if row.get("retained") is not None else "n/a"
        speedup = f"{row['speedup']:.2f}×" if "speedup" in row else "n/a"
        params = f"{row['params']:,}" if "params" in row else "n/a"
        losses = " | ".join(_fmt(row["stages"].get(name, "n/a")) for name in stages)
        lines.append(f"| [{row['name']}]({row['name']}/report.md) | {row['shape']} | {params} | {score} | "
                     f"{retained} | {speedup} | {losses} |")
    return "\n".join(lines) + "\n"
