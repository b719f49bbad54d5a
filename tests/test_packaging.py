"""What `pip install ernie-tiny-ds` gets: the sdist built from this checkout, turned into a wheel and
unpacked outside the checkout, still has the bundled DeepSpeed configs, the Slurm template, the
recipes and the assets, and reads them from its own install folder."""
import json
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from distributed import REPO


def build(tmp_path: Path) -> Path:
    """sdist from the checkout, then a wheel from the unpacked sdist (what pip does with a source release)."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "sdist", filter="data")
    (source,) = (tmp_path / "sdist").iterdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    return wheel


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs_template_recipes_and_assets(tmp_path):
    wheel = build(tmp_path)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    expected = {p.stem: json.loads(p.read_text()) for p in (REPO / "ds_configs").glob("*.json")}
    check = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import ernie_tiny_ds
        from ernie_tiny_ds import assets
        from ernie_tiny_ds.launch import slurm
        from ernie_tiny_ds.runtime import ds_config
        from ernie_tiny_ds.config import load_recipe
        site = Path({str(site)!r})
        assert Path(ernie_tiny_ds.__file__).is_relative_to(site), ernie_tiny_ds.__file__
        configs = {{name: ds_config.read_ds_config(name) for name in {sorted(expected)!r}}}
        demo = Path(ernie_tiny_ds.__file__).parent / "recipes" / "demo.yaml"
        recipe = load_recipe(demo, ["teacher.path=" + str(site)])  # any folder: only the recipe is checked
        print(json.dumps({{"configs": configs, "template": slurm.DEFAULT_TEMPLATE.read_text(),
                           "paths": [str(ds_config.DS_CONFIG_DIR), str(slurm.DEFAULT_TEMPLATE), str(assets.ASSETS_DIR)],
                           "corpus": len(list(assets.DEFAULT_CORPUS_DIR.glob("*.txt"))),
                           "tokenizer": (assets.DEFAULT_TOKENIZER / "tokenizer.json").is_file(),
                           "tasks": [(assets.task_dir(t) / "train.tsv").is_file() for t in assets.BUNDLED_TASKS],
                           "recipe_stages": list(recipe.stages)}}))
    """)
    # outside the checkout, with the unpacked wheel first on the path
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(Path(p).is_relative_to(site) for p in found["paths"]), found["paths"]
    assert found["configs"] == expected and len(expected) >= 5
    assert found["template"] == (REPO / "launcher/slurm/job.sbatch").read_text()
    assert found["corpus"] == 4 and found["tokenizer"] and all(found["tasks"])
    assert found["recipe_stages"]
