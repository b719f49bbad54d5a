"""Files that live at the repository's top level (ds_configs/, launcher/slurm/) but that the package
needs at run time. A built wheel carries copies under ernie_tiny_ds/shipped/ (see setup.py); a
source checkout or an editable install reads the originals."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def shipped(relative: str) -> Path:
    """The installed copy of `relative` (a path from the repository root) if there is one, else the checkout's."""
    installed = PACKAGE_DIR / "shipped" / relative
    return installed if installed.exists() else PACKAGE_DIR.parent / relative
