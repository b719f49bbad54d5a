"""`python bench/X.py` puts bench/ first on sys.path, so a bench script named like an installed
package hides it from every library the script imports. transformers imports the `kernels` package
since it depends on it, and a `bench/kernels.py` broke every bench script that loads a BERT."""
import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_no_bench_script_shadows_an_installed_or_standard_module():
    search_path = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCH]
    shadowing = [script.name for script in sorted(BENCH.glob("*.py"))
                 if script.stem in sys.stdlib_module_names
                 or importlib.machinery.PathFinder.find_spec(script.stem, search_path) is not None]
    assert shadowing == [], f"rename these bench scripts, they hide modules of the same name: {shadowing}"


@pytest.mark.slow
def test_transformers_bert_imports_with_bench_first_on_the_path():
    # what every bench script that builds a teacher or student does, from the bench folder
    done = subprocess.run([sys.executable, "-c", "from transformers import BertModel; print('ok')"],
                          cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
