#!/usr/bin/env bash
# The experiments of docs/experiments.md (issue 4 item 6), on the synthetic chip.
#
#   DEVICE=cuda PY=python3 scripts/experiments.sh         # what produced the documented numbers
#
# Data: 40 simulated donors (20 fetal, 20 maternal), 1200 frames each, donor look 1.0 (donors
# differ in illumination, focus, wall level and channel position), cut two ways: fixed 64x64
# canvas and the report's bbox-resize (to 64x64 here). Runs, each with the report's recipe
# (SGD 0.1/0.9/1e-4, batch 8, warm-up + cosine), donor split 70/20/10, seed 0:
#   sf_fixed   SlowFast R18 (width 16), tau 8 (alpha 8), fixed 64x64
#   frame2d    single-frame 2D CNN on the frame mid-constriction, fixed 64x64
#   sf_tau2    SlowFast with the Slow pathway every 2nd frame (alpha = tau = 2)
#   sf_bbox    SlowFast as sf_tau2, on bbox-resize crops (compare with sf_tau2)
#   sf_masked  SlowFast on clips with the cell blanked out (channel-only confound control)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-runs/synth}
RUNS=${RUNS:-runs/exp}
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-16}
WORKERS=${WORKERS:-2}
LIMIT=${LIMIT:-100000}          # seconds per training run (a run cut short keeps its best.pt)
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/fmh-numba}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$RUNS"

for mode in fixed bbox-resize; do
  [ -d "$DATA/$mode" ] || $PY -m train.synth --clips truth --out "$DATA/$mode" --donors ${DONORS:-20 20} --frames ${FRAMES:-1200} \
      --size 64 --mode "$mode" --seed 1 --donor-look 1.0 --workers "$WORKERS" \
      > "$RUNS/synth_$mode.log" 2>&1
done

T="$PY -m engine train --width 16 --frames 32 --size 64 --epochs $EPOCHS --device $DEVICE --seed 0 --quiet"
timeout "$LIMIT" $T "$DATA/fixed" --out "$RUNS/sf_fixed" > "$RUNS/sf_fixed.log" 2>&1 &
timeout "$LIMIT" $T "$DATA/fixed" --out "$RUNS/frame2d" --arch frame2d > "$RUNS/frame2d.log" 2>&1 &
timeout "$LIMIT" $T "$DATA/bbox-resize" --out "$RUNS/sf_bbox" --crop bbox-resize --alpha 2 --tau 2 > "$RUNS/sf_bbox.log" 2>&1 &
timeout "$LIMIT" $T "$DATA/fixed" --out "$RUNS/sf_tau2" --alpha 2 --tau 2 > "$RUNS/sf_tau2.log" 2>&1 &
timeout "$LIMIT" $T "$DATA/fixed" --out "$RUNS/sf_masked" --mask-cell > "$RUNS/sf_masked.log" 2>&1 &
wait

# a run stopped by LIMIT has best.pt but no summary: evaluate every best.pt the same way
for r in sf_fixed frame2d sf_bbox sf_tau2 sf_masked; do
  [ -f "$RUNS/$r/best.pt" ] || continue
  mask=""; [ "$r" = sf_masked ] && mask="--mask-cell"
  for part in val test; do
    S=$($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))[sys.argv[2]]['stores']))" \
        "$RUNS/$r/split.json" $part)
    views="single"; [ "$r" = sf_tau2 ] && [ $part = test ] && views="single multi"
    $PY -m engine evaluate "$RUNS/$r/best.pt" $S --views $views $mask --device "$DEVICE" \
        --out "$RUNS/$r/eval_$part" --quiet > "$RUNS/$r/eval_$part.log" 2>&1
  done
done
$PY -m engine evaluate "$RUNS/sf_tau2/best.pt" \
    $($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['val']['stores']))" "$RUNS/sf_tau2/split.json") \
    --gradcam 4 --device "$DEVICE" --out "$RUNS/sf_tau2/gradcam" --quiet > /dev/null 2>&1
$PY -m engine evaluate "$RUNS/sf_masked/best.pt" \
    $($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['val']['stores']))" "$RUNS/sf_masked/split.json") \
    --mask-cell --gradcam 2 --device "$DEVICE" --out "$RUNS/sf_masked/gradcam" --quiet > /dev/null 2>&1
$PY -m train.report_experiments "$RUNS" > "$RUNS/results.md" 2>&1
cat "$RUNS/results.md"
