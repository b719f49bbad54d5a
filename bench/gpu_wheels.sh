#!/usr/bin/env bash
# Prepare, on a machine WITH network, the wheels that bench/gpu_acceptance.sh installs on the lent
# GPU machine (no network; Python 3.12, torch 2.11 CUDA 13, transformers, triton, accelerate,
# tokenizers, safetensors, sentencepiece, pytest, numpy, scipy, scikit-learn, matplotlib,
# tensorboard and onnxruntime already there). They go to .whl/ (git-ignored) and travel with the
# working tree, which may hold at most 64 MiB in all: the wheels must stay under ~56 MiB.
#
#   bash bench/gpu_wheels.sh            # versions pinned to the ones installed in .venv
#   PYTHON=/path/python bash bench/gpu_wheels.sh     # read the versions from another environment
#
# What is fetched, and why (the GPU machine lacks them; versions: the venv's, where it has them):
#   deepspeed          built here from the sdist (`pip wheel --no-deps`, isolated build without
#                      torch: pure Python, no op pre-compiled; its ops JIT-build there if needed)
#   deepspeed's requirements the GPU machine lacks: pydantic, pydantic-core, annotated-types,
#                      typing-inspection, typing-extensions (pydantic wants a recent one), hjson,
#                      msgpack, py-cpuinfo, ninja (JIT op builds), einops, nvidia-ml-py (pynvml,
#                      optional for deepspeed on CUDA)
#   zstandard          setup.cfg requirement (.zst corpora only; small)
# Left out on purpose (too large for the 64 MiB that travels, and not needed by what the
# acceptance script runs):
#   pyarrow (55 MB as a cp312 wheel) + pandas (12 MB): ernie_tiny_ds imports pyarrow only lazily,
#   for Parquet corpora (data/sources.py), and datasets only for `data.format: datasets`; the
#   acceptance script uses plain-text corpora. Without pyarrow `import datasets` fails, so datasets
#   and its own requirements (dill, multiprocess, xxhash, fsspec) are left out too.
#   WITH_DATASETS=1 adds that whole stack anyway (then the total is far over the budget).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
DEST="$REPO/.whl"
BUDGET_MIB="${BUDGET_MIB:-56}"

PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson msgpack py-cpuinfo
          ninja einops nvidia-ml-py zstandard)
if [ "${WITH_DATASETS:-0}" = 1 ]; then
  PACKAGES+=(datasets dill multiprocess xxhash fsspec pyarrow pandas)
fi

# name==version from the reference environment (unpinned when it does not have the package)
pinned() {
  "$PYTHON" - "$@" <<'EOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
}

rm -rf "$DEST"
mkdir -p "$DEST"
DS_SPEC="$(pinned deepspeed)"
echo "== deepspeed: wheel from the sdist ($DS_SPEC)"
# isolated build: setuptools only, no torch in the build env, so no op is pre-compiled
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-binary deepspeed -w "$DEST" "$DS_SPEC"

mapfile -t SPECS < <(pinned "${PACKAGES[@]}")
echo "== downloading for CPython 3.12 manylinux x86_64: ${SPECS[*]}"
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" "${SPECS[@]}"

echo "== $DEST"
( cd "$DEST" && ls -l *.whl | awk '{printf "%10d  %s\n", $5, $9}' )
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
"$PYTHON" -c 'import sys; w, t, n, b = map(int, sys.argv[1:]); M = 2 ** 20
print(f"total: {w / M:.1f} MiB in {n} wheels (budget {b} MiB); tracked working tree: {t / M:.1f} MiB; "
      f"both: {(w + t) / M:.1f} of 64 MiB")' "$total" "$tree" "$(ls "$DEST"/*.whl | wc -l)" "$BUDGET_MIB"
# the GPU machine must run what setup.cfg states (e.g. deepspeed>=0.19.5, whose import needs no nvcc)
"$PYTHON" bench/wheel_pins.py "$DEST"
if [ "$total" -gt $((BUDGET_MIB * 1048576)) ]; then
  echo "error: the wheels take more than $BUDGET_MIB MiB" >&2
  exit 1
fi
