#!/usr/bin/env bash
# The learning benchmark (`make learn`): does the geometry branch learn geometry, on scenes it never saw?
# Training scenes of the decorrelated trajectory family only (rotation and translation drawn
# independently, 10% static, 15% orbits; plus their exact mirror and time-reversal copies) -> stage 1
# with an embedded configuration -> evaluation against baselines at the inference noise level on three
# splits (report.json / report.md): `heldout` (decorrelated rooms, other seeds), `ood_trajectory` (the
# old orbit family) and `ood_content` (yards and halls of synthetic_ood, decorrelated paths).
# About 20 minutes of training on 2 CPU cores when nothing else runs (a concurrent process slows the
# 2-thread training step many times over), plus ~4 minutes of data, caching and evaluation: 24.2 min
# in all on 2026-12-08. Outputs under outputs/learn/ (override with LEARN_OUTPUT=DIR); every knob
# below can be overridden from the environment.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT="${LEARN_OUTPUT:-$REPO/outputs/learn}"
CONFIG="${LEARN_CONFIG:-tiny}"
TRAIN_SCENES="${LEARN_TRAIN_SCENES:-192}"
HELDOUT_SCENES="${LEARN_HELDOUT_SCENES:-32}"
AUGMENT="${LEARN_AUGMENT:-mirror reverse}"
STEPS="${LEARN_STEPS:-8000}"
BATCH_SIZE="${LEARN_BATCH_SIZE:-2}"
LEARNING_RATE="${LEARN_LEARNING_RATE:-1e-3}"
CAMERA_LOSS_WEIGHT="${LEARN_CAMERA_LOSS_WEIGHT:-3}"
SIZE=(--height 64 --width 64 --num_frames 17)

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE_FLAGS=(); else DEVICE_FLAGS=(--cpu); fi
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "${DEVICE_FLAGS[@]}")
MODEL=(--model_source "$CONFIG" --model_seed 0 "${SIZE[@]}")

rm -rf "$OUT"
mkdir -p "$OUT/data"
cd "$REPO"
started=$(date +%s)
DATA=(--frames 17 --height 64 --width 64)
# shellcheck disable=SC2086  # AUGMENT is a word list
"$PYTHON" -m diffsynth.fantasy_world.synthetic --out "$OUT/data/train" --num-scenes "$TRAIN_SCENES" "${DATA[@]}" --seed 1000 \
    --trajectory decorrelated --augment $AUGMENT
"$PYTHON" -m diffsynth.fantasy_world.synthetic --out "$OUT/data/heldout" --num-scenes "$HELDOUT_SCENES" "${DATA[@]}" --seed 2000 --trajectory decorrelated
"$PYTHON" -m diffsynth.fantasy_world.synthetic --out "$OUT/data/ood_trajectory" --num-scenes "$HELDOUT_SCENES" "${DATA[@]}" --seed 3000 --trajectory orbit
"$PYTHON" -m diffsynth.fantasy_world.synthetic_ood --out "$OUT/data/ood_content" --num-scenes "$HELDOUT_SCENES" "${DATA[@]}" --seed 4000

"${LAUNCH[@]}" examples/wanvideo/model_training/train_fantasy_world.py "${MODEL[@]}" --stage 1 \
    --dataset_base_path "$OUT/data/train" --dataset_cache_in_memory --max_steps "$STEPS" --batch_size "$BATCH_SIZE" \
    --learning_rate "$LEARNING_RATE" --camera_loss_weight "$CAMERA_LOSS_WEIGHT" --seed 0 --output_path "$OUT"

"$PYTHON" -m diffsynth.fantasy_world.evaluate "${MODEL[@]}" --checkpoint "$OUT/fantasy_world.safetensors" \
    --dataset_base_path "$OUT/data/heldout" --train_dataset_base_path "$OUT/data/train" --output_path "$OUT" \
    --extra_split "ood_trajectory=$OUT/data/ood_trajectory" --extra_split "ood_content=$OUT/data/ood_content"
echo "learning benchmark done in $(( $(date +%s) - started )) s: $OUT/report.md"
