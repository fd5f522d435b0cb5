#!/usr/bin/env bash
# Regenerate the bundled demo model engine/data/demo_model.onnx (issue 4 item 7).
#
# A small SlowFast (ResNet-18 basic blocks, slow stem width 8 (0.34 M parameters), alpha 2 =
# tau 2 (the Slow pathway sees every 2nd of the 32 frames sampled over the passage; see
# docs/experiments.md), beta 1/8; 32 x 64 x 64 px, 1 grey channel) trained with the report's
# recipe except a lower learning rate (SGD 0.03 instead of 0.1: far steadier on a few hundred
# training clips) on clip stores simulated by the fmh synthetic chip: NOT real blood cells, and
# the metadata says so.
#
# The clips are cut by the real front end and tracker, as `fmh detect` cuts them
# (python -m train.synth --clips detect, the default): detected centroids, positions predicted
# through missed frames, merged blobs, and truncated tracks (cells in view at the start, lost
# mid-channel, cut by the end of the sequence) as well as complete ones, because `fmh run`
# classifies every clip the tracker emits and the report counts them all. The models before
# this one were trained on clips cut at the simulator's TRUE positions (CLIPS=truth, complete
# passages only) and over-called fetal cells in `fmh demo` (docs/experiments.md, "Runs D");
# their validation figures did not describe the clips serving sees.
#
#   scripts/make_demo_model.sh                      # CPU: ~4 min data + ~25-40 min training
#   MODEL=runs/demo-model/demo_model.onnx scripts/make_demo_model.sh   # try it first
#   DEVICE=cuda PY=python3 scripts/make_demo_model.sh
#
# The committed model came from exactly these steps on this project's 2-core CPU (torch 2.13
# CPU, one thread per process, other engineers' work beside it); the same steps on another
# machine or with DEVICE=cuda give a model of the same kind, not the same bits (different
# floating-point kernels), and from-scratch runs of this size vary from run to run
# (docs/experiments.md).
#
# Steps: simulate 80 donors d001..d080 (40 fetal, 40 maternal; 1200 frames each; one
# `fmh detect` run and one clip store per donor, with the donor's id and label; donor 0, the
# nominal chip that `fmh demo` simulates, is left out so that the demo is a donor the model has
# never seen, as a patient's sample is; 80 rather than the earlier 40 donors because with 28
# training donors the model keyed on the donors' looks: docs/experiments.md, "Runs D")
# -> fmh train (donor split 70/20/10 with seed 0: 56 / 16 / 8 donors, 24 epochs, best.pt = the
# epoch with the best validation AUC, threshold for fetal sensitivity 0.9 on validation)
# -> fmh export (ONNX, parity-checked) -> fmh evaluate on the
# validation donors, which reproduces the figures in the model's fmh.validation metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-runs/demo-data}            # stores go to $DATA/$CLIPS (kept if it exists)
CLIPS=${CLIPS:-detect}                 # detect: as fmh detect cuts them; truth: true positions
RUN=${RUN:-runs/demo-model}
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-24}
WIDTH=${WIDTH:-8}
FRAMES_T=${FRAMES_T:-32}
LR=${LR:-0.03}
WORKERS=${WORKERS:-2}                  # donors simulated and detected in parallel
DONORS=${DONORS:-"40 40"}                # fetal, maternal
FIRST_DONOR=${FIRST_DONOR:-1}          # donor 0 (the demo's look) is not a training donor
FRAMES=${FRAMES:-1200}
MODEL=${MODEL:-engine/data/demo_model.onnx}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/fmh-numba}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}     # one thread: what the committed run used

if [ ! -d "$DATA/$CLIPS" ]; then
  $PY -m train.synth --out "$DATA/$CLIPS" --donors $DONORS --frames "$FRAMES" --size 64 \
      --mode fixed --clips "$CLIPS" --seed 1 --donor-look 1.0 --first-donor "$FIRST_DONOR" \
      --workers "$WORKERS"
fi
$PY -m engine train "$DATA/$CLIPS" --out "$RUN" --arch slowfast_r18 --width "$WIDTH" \
    --alpha 2 --tau 2 --frames "$FRAMES_T" --size 64 --lr "$LR" --warmup-epochs 2 \
    --epochs "$EPOCHS" --device "$DEVICE" --seed 0 --target-sensitivity 0.9 --quiet
mkdir -p "$(dirname "$MODEL")"
$PY -m engine export "$RUN/best.pt" --onnx "$MODEL"
VAL=$($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['val']['stores']))" \
      "$RUN/split.json")
$PY -m engine evaluate "$MODEL" $VAL --out "$RUN/eval_val" --quiet
ls -l "$MODEL"
