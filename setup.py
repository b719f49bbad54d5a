"""The metadata is in setup.cfg. This file only ships the top-level ds_configs/ and the Slurm template
inside built wheels (as ernie_tiny_ds/shipped/), so that an installed package finds what a source
checkout has; `ernie_tiny_ds.assets.shipped` looks there first, then in the checkout."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ["ds_configs/*.json", "launcher/slurm/job.sbatch"]  # kept in sync with MANIFEST.in for sdists


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout itself
        target = Path(self.build_lib) / "ernie_tiny_ds" / "shipped"
        for pattern in SHIPPED:
            matches = sorted(ROOT.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"setup.py: nothing matches {pattern} under {ROOT}")
            for path in matches:
                destination = target / path.relative_to(ROOT)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
