"""README.md model cards for exported students, built from OUT/report.json: a folder that is a release.

The card says what the student is (shape, parameters, teacher), how it was made (the four stages:
teacher, data, steps, losses), how good and how fast it is against its teacher (dev metrics, share
retained, speed-up, ONNX Runtime timings when measured) and how to load it with transformers. Its
YAML front matter (library_name, pipeline_tag, license, language, base_model) is what the Hub reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..data.hub import looks_like_hub_id
from ..errors import UserError
from ..files import atomic_write_text
from ..stages import STAGE_SPECS, shipping_stage

CARD = "README.md"


def check_loadable(folder: Path) -> dict:
    """The exported config.json must name its model_type, or AutoModel cannot load the folder
    (the fastformers#11 failure); returns the config as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (not an exported Hugging Face model folder)")
    config = json.loads(path.read_text())
    if not config.get("model_type"):
        raise UserError(f"{path} has no model_type: transformers' Auto classes could not load it")
    return config


def _shape(config: dict) -> str:
    return (f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
            f"{config.get('num_attention_heads')} heads, FFN {config.get('intermediate_size')}, "
            f"vocabulary {config.get('vocab_size')}")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _data_of(stage: str, recipe) -> str:
    if STAGE_SPECS[stage].data == "general":
        corpus = getattr(getattr(recipe, "data", None), "corpus", None)
        return f"general corpus ({Path(corpus).name if corpus else 'bundled sample'})"
    task = getattr(recipe, "task", None)
    return f"task data ({getattr(task, 'name', None) or Path(getattr(task, 'train_file', '') or '?').name})"


def _teacher_config(report: dict) -> dict:
    path = Path(str(report["teacher"]["path"]))
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def render_card(report: dict, recipe, folder: Path, stage: str | None = None, name: str | None = None) -> str:
    """The model card of the student exported by `stage` (default: the shipping stage, the release)."""
    config = check_loadable(folder)
    release = getattr(recipe, "release", None)
    spec = STAGE_SPECS[stage] if stage is not None else shipping_stage()
    final = spec.ships
    teacher_source = getattr(recipe.teacher, "path", None) or "an inline-configured teacher"
    meta = {"library_name": "transformers",
            "pipeline_tag": "text-classification" if spec.task_head else "feature-extraction",
            "license": getattr(release, "license", None) or "apache-2.0",
            "tags": ["ernie-tiny-ds", "knowledge-distillation", config.get("model_type", "bert")]}
    if getattr(release, "language", None):
        meta["language"] = list(release.language)
    if isinstance(teacher_source, str) and looks_like_hub_id(teacher_source) and not Path(teacher_source).exists():
        meta["base_model"] = teacher_source
    name = name or getattr(release, "model_name", None) or Path(recipe.output_dir).name
    t, s = report["teacher"], report["student"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}{'' if final else f' (after stage {spec.title})'}", ""]
    if not final:
        lines += [f"An intermediate student: the encoder after {spec.title}"
                  f"{'' if spec.task_head else ', without a task head'}. The released model is the "
                  f"{shipping_stage().name} stage's student; its figures are below.", ""]
    lines += [f"A {_count(s['params'])}-parameter student ({_shape(config)}) distilled from "
              f"**{teacher_source}** ({_count(t['params'])} parameters"
              + (f"; {_shape(_teacher_config(report))}" if _teacher_config(report) else "") + ") with the "
              "four-stage progressive distillation of ERNIE-Tiny (Su et al., 2021) by ernie-tiny-ds.", ""]
    main = report["main_metric"]
    retained = report.get("retained")
    lines += ["## Results", "",
              f"On the dev split of **{report['task']}** the student keeps "
              f"**{retained:.1%}** of the teacher's {main} and runs {report['speedup']:.2f}× faster at batch 1."
              if retained is not None else
              f"On the dev split of **{report['task']}**:",
              ""]
    names = list(t["metrics"])
    lines += ["| model | parameters | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for who, m in (("teacher (finetuned)", t), ("student", s)):
        lines.append(f"| {who} | {m['params']:,} | " + " | ".join(_fmt(m["metrics"][k]) for k in names) + " |")
    machine = report.get("machine", {})
    lines += ["", "## Speed", "",
              f"Measured side by side in one process (repetitions taking turns), sequence length "
              f"{machine.get('seq_len')}, {machine.get('torch_threads')} threads on {machine.get('processor')}.", "",
              "| runtime | teacher latency, batch 1 (ms) | student latency, batch 1 (ms) | speed-up |",
              "|---|---|---|---|",
              f"| PyTorch | {t['latency_ms_batch1']:.2f} | {s['latency_ms_batch1']:.2f} | {report['speedup']:.2f}× |"]
    onnx = report.get("onnx")
    if onnx:
        lines.append(f"| ONNX Runtime (CPU) | {onnx['teacher']['latency_ms_batch1']:.2f} | "
                     f"{onnx['student']['latency_ms_batch1']:.2f} | {onnx['speedup']:.2f}× |")
    lines += ["", "## Training", "", "| stage | teacher | data | steps | final loss | losses |",
              "|---|---|---|---|---|---|"]
    for st in report.get("stages", []):
        lines.append(f"| {st['title']} | {'finetuned' if STAGE_SPECS[st['name']].finetuned_teacher else 'pretrained'}"
                     f" | {_data_of(st['name'], recipe)} | {st['steps']} | {_fmt(st['final_loss'])} | "
                     f"{', '.join(st.get('loss_terms', []))} |")
    lines += ["", "## How to use", "", "```python"]
    if spec.task_head:
        lines += ["from transformers import pipeline", "",
                  f'classifier = pipeline("text-classification", model="{folder}")  # or its Hub ID once pushed',
                  'print(classifier("..."))', "",
                  "# or", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{folder}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder}")']
    else:
        lines += ["from transformers import AutoModel, AutoTokenizer", "",
                  f'model = AutoModel.from_pretrained("{folder}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder}")']
    lines += ["```", ""]
    if (folder / "model.onnx").is_file():
        lines += ["`model.onnx` (dynamic batch and sequence axes) runs under ONNX Runtime:", "", "```python",
                  "import onnxruntime as ort", "",
                  'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
                  'outputs = session.run(None, dict(tokenizer(["..."], return_tensors="np")))', "```", ""]
    return "\n".join(lines)


def write_cards(report: dict, recipe, out: Path) -> list[Path]:
    """A README.md in every stage's exported student folder that exists; returns the cards written."""
    written = []
    for st in report.get("stages", []):
        folder = out / st["name"] / "student"
        if (folder / "config.json").is_file():
            written.append(atomic_write_text(folder / CARD, render_card(report, recipe, folder, st["name"])))
    return written
