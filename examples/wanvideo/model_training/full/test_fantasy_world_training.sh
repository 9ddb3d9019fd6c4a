#!/usr/bin/env bash
# FantasyWorld smoke run: synthetic scenes -> stage 1 -> stage 2 (tiny embedded model, gradient
# checkpointing on) -> inference on the stage-2 checkpoint. CUDA when present, else CPU.
# Runs from any directory; outputs under outputs/smoke/ (override with SMOKE_OUTPUT=DIR).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT="${SMOKE_OUTPUT:-$REPO/outputs/smoke}"
STAGE1_STEPS="${STAGE1_STEPS:-40}"
STAGE2_STEPS="${STAGE2_STEPS:-16}"
MIN_GEOMETRY_DROP="${MIN_GEOMETRY_DROP:-0.30}"

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE_FLAGS=(); else DEVICE_FLAGS=(--cpu); fi
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "${DEVICE_FLAGS[@]}")
TRAIN="$REPO/examples/wanvideo/model_training/train_fantasy_world.py"
COMMON=(--dataset_base_path "$OUT/data" --height 64 --width 64 --num_frames 17 --model_source tiny
        --use_gradient_checkpointing --head_resolution_factor 2 --learning_rate 1e-3 --seed 0)

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$REPO"
"$PYTHON" -m diffsynth.fantasy_world.synthetic --out "$OUT/data" --num-scenes 6 --frames 17 --height 64 --width 64 --seed 0

"${LAUNCH[@]}" "$TRAIN" "${COMMON[@]}" --stage 1 --max_steps "$STAGE1_STEPS" --save_steps 20 \
    --output_path "$OUT/stage1"
"${LAUNCH[@]}" "$TRAIN" "${COMMON[@]}" --stage 2 --max_steps "$STAGE2_STEPS" --save_steps 8 \
    --fantasy_world_checkpoint "$OUT/stage1/fantasy_world.safetensors" --output_path "$OUT/stage2"

"$PYTHON" "$REPO/examples/wanvideo/model_inference/fantasy_world_inference.py" --model_source tiny \
    --fantasy_world_checkpoint "$OUT/stage2/fantasy_world.safetensors" --camera "$OUT/data/scene_000_cameras.txt" \
    --height 64 --width 64 --num_frames 17 --num_inference_steps 4 --output_dir "$OUT/inference"

# The runs' own summary.json files (first/last window means per loss term); no diffsynth import needed.
"$PYTHON" - "$OUT" "$MIN_GEOMETRY_DROP" <<'PY'
import json, sys
from pathlib import Path
out, required = Path(sys.argv[1]), float(sys.argv[2])
print("\n=== FantasyWorld smoke run summary ===")
for stage in ("stage1", "stage2"):
    summary = json.loads((out / stage / "summary.json").read_text())
    for key, (first, last, drop) in summary["loss_change"].items():
        print(f"{stage} {key:<10} first {first:.4f} -> last {last:.4f} ({-100 * drop:+.1f}%)")
    print(f"{stage} checkpoint: {summary['checkpoint']}\n{stage} pictures: {summary['pictures']}")
drop = json.loads((out / "stage1" / "summary.json").read_text())["loss_change"]["geometry"][2]
print(f"stage-1 geometry loss fell by {100 * drop:.1f}% (required: at least {100 * required:.0f}%; "
      "a plumbing check, not evidence of learning: `make learn` scores held-out scenes)")
print(f"inference outputs: {out / 'inference'}")
if not drop >= required:
    sys.exit("smoke run FAILED: the geometry loss did not fall enough")
PY
