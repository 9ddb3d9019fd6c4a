#!/usr/bin/env bash
# Stage 2 on real weights: cross-attention and camera adapters trained on L_diff + lambda * L_geo,
# starting from stage 1's fantasy_world.safetensors. The camera-control base
# (Wan2.1-Fun-V1.1-1.3B-Control-Camera) is a drop-in alternative to the T2V model.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
DATASET="${DATASET:-data/fantasy_world}"
STAGE1="${STAGE1:-./models/train/Wan2.1-T2V-1.3B_fantasy_world_stage1}"
OUTPUT="${OUTPUT:-./models/train/Wan2.1-T2V-1.3B_fantasy_world_stage2}"
MODEL="${MODEL:-Wan-AI/Wan2.1-T2V-1.3B}"
# Text encoder and VAE as upstream downloads them (it redirects the *.pth files of every Wan repo here).
SHARED="DiffSynth-Studio/Wan-Series-Converted-Safetensors"

accelerate launch "$REPO/examples/wanvideo/model_training/train_fantasy_world.py" \
  --dataset_base_path "$DATASET" \
  --height 336 --width 592 --num_frames 81 \
  --model_source pretrained \
  --model_id_with_origin_paths "$MODEL:diffusion_pytorch_model*.safetensors,$SHARED:models_t5_umt5-xxl-enc-bf16.safetensors,$SHARED:Wan2.1_VAE.safetensors" \
  --stage 2 --fantasy_world_checkpoint "$STAGE1/fantasy_world.safetensors" \
  --geometry_loss_lambda 1.0 \
  --learning_rate 1e-5 --max_steps 10000 --save_steps 500 \
  --use_gradient_checkpointing \
  --output_path "$OUTPUT"
