#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install ernie-tiny-ds into it.
#   VENV=path          where the venv lives (default: .venv in the repository)
#   TORCH_SPEC=spec    torch requirement (default: torch==2.13.0, the CPU wheel, when no GPU is seen;
#                      with a GPU the newest torch that deepspeed accepts)
#   EXTRAS=test,demo   optional extras of setup.cfg to install
# Source it (`. launcher/setup_env.sh`) to get the venv activated and its variables exported.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ernie-tiny-ds-installed"
want="$(cat "$REPO/setup.cfg" "$REPO/pyproject.toml"; echo "$TORCH_SPEC")"
# the extras installed so far (one per line): asking for a subset of them installs nothing
have_extras="$(cat "$VENV/.ernie-tiny-ds-extras" 2>/dev/null || true)"
extras="${EXTRAS:-}"
missing=""
for extra in ${extras//,/ }; do grep -qx "$extra" <<<"$have_extras" || missing="$missing $extra"; done
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ -n "$missing" ]; then
  [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] && have_extras=""
  all_extras="$(printf '%s\n' $have_extras ${extras//,/ } | sort -u | paste -sd, -)"
  python -m pip install -q --upgrade pip
  # torch in the same command as deepspeed, else deepspeed's own requirement pulls a CUDA build
  spec="$REPO"; [ -n "$all_extras" ] && spec="$REPO[$all_extras]"
  python -m pip install -q "$TORCH_SPEC" -e "$spec"
  printf '%s' "$want" > "$stamp"
  tr ',' '\n' <<<"$all_extras" > "$VENV/.ernie-tiny-ds-extras"
fi
# DeepSpeed JIT-compiles two C++ ops on first use; cache them with this venv
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
set +euo pipefail
