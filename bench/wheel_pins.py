"""Check that the wheels bench/gpu_wheels.sh gathered satisfy the project's own pins (setup.cfg).

    python bench/wheel_pins.py .whl

Prints one line per wheel that setup.cfg constrains, `PIN MISMATCH ...` for each that does not
satisfy it, and exits 1 if any does not: the GPU machine must run the versions the project states.
"""
from __future__ import annotations

import configparser
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent


def project_requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in requirements}


def main(folder: str) -> int:
    wanted = project_requirements()
    bad = 0
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        requirement = wanted.get(canonicalize_name(name))
        if requirement is None:
            continue  # a dependency of a dependency: its own requirer pins it
        if requirement.specifier.contains(version, prereleases=True):
            print(f"pin ok: {name} {version} satisfies {requirement}")
        else:
            bad += 1
            print(f"PIN MISMATCH: {name} {version} does not satisfy setup.cfg's {requirement}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / ".whl")))
