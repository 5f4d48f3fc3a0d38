#!/usr/bin/env bash
# Retrain every shapes asset from scratch (resumable: run it again after an interruption).
# CPU, one job at a time; logs in runs/shapes-{sd,clip,ensemble/m*,flow}/log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
$PY scripts/train_shapes_sd.py --work runs/shapes-sd --vae-steps 1200 --unet-steps "${UNET_STEPS:-4000}" --threads "${THREADS:-2}" \
    --export assets/shapes-sd
$PY scripts/train_shapes_clip.py --work runs/shapes-clip --steps "${CLIP_STEPS:-1000}" --finetune-3obj 300 --threads "${THREADS:-2}" --export assets/shapes-clip
$PY scripts/eval_shapes_assets.py --model assets/shapes-sd --clip assets/shapes-clip --n 128 --grid docs/images/shapes_data_vs_base.png
# The ensemble of small shapes CLIPs (issue 17: reward.combine wco / uwo, scripts/overoptimization.py):
# four members, each its own seed and its own 60 % of the scenes, sharing one pre-rendered pool.
for s in 1 2 3 4; do
    $PY scripts/train_shapes_clip.py --work runs/shapes-ensemble/m$s --size small --seed $s --subset 0.6 --steps 1000 \
        --finetune-3obj 300 --threads "${THREADS:-2}" --pool-path runs/shapes-ensemble/pool.pt --export assets/shapes-ensemble/m$s
done
# The flow-matching model (SD3-style; issue 20's flow methods): on top of assets/shapes-sd's VAE and CLIP,
# its VAE weights a link to assets/shapes-sd's.
$PY scripts/train_shapes_flow.py --work runs/shapes-flow --threads "${THREADS:-2}" --export assets/shapes-flow --link-vae --eval 128
