"""Every exported student folder is a release: a README.md model card built from report.json, a
config.json with model_type, and it loads with transformers' pipeline and Auto classes."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from distributed import run_cli

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.errors import UserError
from ernie_tiny_ds.runtime.export import save_model_folder
from ernie_tiny_ds.workflows.model_card import CARD, check_loadable, write_cards

STAGES = ["general", "general_enhanced", "task_adaptive", "task_specific"]


def export_student(folder, tokenizer_dir, vocab_size, head: bool):
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    model = cls(config)
    model.config.architectures = [cls.__name__]
    return save_model_folder(model.eval(), tokenizer_dir, folder)


def fake_report(out, teacher_dir):
    stages = [{"name": s, "title": s, "steps": 10 * (i + 1), "final_loss": 1.0 / (i + 1), "first_loss": 3.0,
               "teacher": "t", "student_init": "fresh", "loss_terms": ["hidden", "attention"] +
               (["soft_label", "hard_label"] if s == "task_specific" else [])} for i, s in enumerate(STAGES)]
    speed = {"latency_ms_batch1": 2.0, "throughput_batch32": 500.0, "seq_len": 32, "threads": 2, "repeats": 3}
    return {"task": "sentiment", "main_metric": "accuracy", "stages": stages,
            "teacher": {"path": str(teacher_dir), "metrics": {"accuracy": 0.9, "f1": 0.88}, "params": 22_700_000,
                        **speed, "latency_ms_batch1": 8.0},
            "student": {"path": str(out / "task_specific" / "student"), "metrics": {"accuracy": 0.87, "f1": 0.85},
                        "params": 4_400_000, **speed},
            "retained": 0.87 / 0.9, "speedup": 4.0, "throughput_ratio": 3.5,
            "machine": {"platform": "Linux", "processor": "x86_64", "torch_threads": 2, "seq_len": 32},
            "onnx": {"teacher": {"latency_ms_batch1": 6.0, "throughput_batch32": 700.0, "max_abs_diff": 1e-6},
                     "student": {"latency_ms_batch1": 1.0, "throughput_batch32": 3000.0, "max_abs_diff": 1e-6},
                     "speedup": 6.0, "pytorch_same_run": {}, "opset": 18}}


def split_card(text):
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_every_stage_student_gets_a_card_and_the_release_loads(tmp_path, tokenizer_dir, vocab_size):
    out = tmp_path / "out"
    for stage in STAGES:
        export_student(out / stage / "student", tokenizer_dir, vocab_size, head=stage == "task_specific")
    teacher = export_student(tmp_path / "teacher", tokenizer_dir, vocab_size, head=True)
    recipe = load_recipe(None, ["teacher.path=bert-base-uncased", f"output_dir={out}", "release.license=mit",
                                "release.language=[en]", "release.model_name=tiny-sentiment",
                                "task.name=sentiment"])
    report = fake_report(out, teacher)
    written = write_cards(report, recipe, out)
    assert [p.parent.parent.name for p in written] == STAGES

    final = out / "task_specific" / "student"
    meta, body = split_card((final / CARD).read_text())
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-classification", "license": "mit",
                    "tags": ["ernie-tiny-ds", "knowledge-distillation", "bert"], "language": ["en"],
                    "base_model": "bert-base-uncased"}
    assert body.lstrip().startswith("# tiny-sentiment")
    for text in ("**bert-base-uncased**", "2 layers, hidden 32, 4 heads, FFN 64", "keeps **96.7%** of the teacher's "
                 "accuracy", "4.00× faster", "| teacher (finetuned) | 22,700,000 | 0.9 | 0.88 |",
                 "| student | 4,400,000 | 0.87 | 0.85 |", "| ONNX Runtime (CPU) | 6.00 | 1.00 | 6.00× |",
                 "| PyTorch | 8.00 | 2.00 | 4.00× |", 'pipeline("text-classification"',
                 "AutoModelForSequenceClassification.from_pretrained", "general corpus", "task data (sentiment)",
                 "soft_label, hard_label"):
        assert text in body, text
    assert body.count("| General") + body.count("| general") >= 2  # one row per stage
    meta1, body1 = split_card((out / "general" / "student" / CARD).read_text())
    assert meta1["pipeline_tag"] == "feature-extraction" and "without a task head" in body1

    # the release loads the way the card says
    assert json.loads((final / "config.json").read_text())["model_type"] == "bert"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    classifier = transformers.pipeline("text-classification", model=str(final))
    result = classifier("the river town market")
    assert result[0]["label"] in ("negative", "positive") and 0 <= result[0]["score"] <= 1


def test_a_config_without_model_type_is_refused(tmp_path, tokenizer_dir, vocab_size):
    folder = export_student(tmp_path / "s", tokenizer_dir, vocab_size, head=True)
    config = json.loads((folder / "config.json").read_text())
    assert check_loadable(folder)["model_type"] == "bert"
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no model_type"):
        check_loadable(folder)


class HubStub:
    """The four Hub endpoints an upload_folder commit uses (repo create, card YAML check, preupload,
    NDJSON commit) on 127.0.0.1; it answers 'regular' upload mode for every file, so files travel
    base64 inside the commit (the LFS/Xet path of large files is not exercised)."""
    def __init__(self, root):
        self.root = Path(root)
        self.requests = []
        self.repos = {}
        self.validated = []
        hub = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def do_POST(self):
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                if parts[:2] == ["api", "validate-yaml"]:
                    import yaml  # the Hub reads the card's front matter; bad YAML is a 400 with errors
                    text = json.loads(body)["content"]
                    hub.validated.append(text)
                    try:
                        meta = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else {}
                        assert isinstance(meta, dict)
                    except Exception as exc:
                        return self._send(400, {"errors": [{"message": str(exc)}]})
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos[rid] = req
                    return self._send(200, {"url": f"{hub.url}/{rid}"})
                if parts[0] == "api" and parts[1] == "models" and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if parts[0] == "api" and parts[1] == "models" and parts[4] == "commit":
                    rid = f"{parts[2]}/{parts[3]}"
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            dest = hub.root / rid / item["value"]["path"]
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(base64.b64decode(item["value"]["content"]))
                        elif item["key"] == "header":
                            hub.header = item["value"]
                    return self._send(200, {"commitUrl": f"{hub.url}/{rid}/commit/{'c'*40}", "commitOid": "c" * 40,
                                            "pullRequestUrl": None})
                self._send(404, {"error": f"stub: unknown {self.path}"})
            def do_GET(self):
                hub.requests.append(("GET", self.path, None))
                self._send(404, {"error": f"stub: unknown {self.path}"})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_push_uploads_the_release_with_huggingface_hub(tmp_path, tokenizer_dir, vocab_size):
    folder = export_student(tmp_path / "student", tokenizer_dir, vocab_size, head=True)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / ".model.safetensors.123.tmp").write_text("a durable write in progress")
    hub = HubStub(tmp_path / "hub")
    online = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli(["push", "--model", str(folder), "--repo-id", "me/tiny-student", "--endpoint", hub.url,
                    "--private"], extra_env=online)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"pushed {folder} to me/tiny-student: {hub.url}/me/tiny-student/commit/" in proc.stdout
    assert [r[:2] for r in hub.requests] == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                                             ("POST", "/api/models/me/tiny-student/preupload/main"),
                                             ("POST", "/api/models/me/tiny-student/commit/main")]
    assert all(r[2] == "Bearer hf_test_token" for r in hub.requests)
    assert hub.repos["me/tiny-student"]["visibility"] == "private"
    uploaded = tmp_path / "hub" / "me" / "tiny-student"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in folder.iterdir()
                                                                if not p.name.startswith("."))
    for f in folder.iterdir():
        if not f.name.startswith("."):
            assert (uploaded / f.name).read_bytes() == f.read_bytes(), f.name
    assert transformers.AutoModelForSequenceClassification.from_pretrained(uploaded).config.model_type == "bert"

    # offline: one line, exit 2, nothing sent
    before = len(hub.requests)
    proc = run_cli(["push", "--model", str(folder), "--repo-id", "me/tiny-student", "--endpoint", hub.url],
                   extra_env={**online, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and len(hub.requests) == before
    assert "error: push needs the network but HF_HUB_OFFLINE=1" in proc.stdout + proc.stderr
