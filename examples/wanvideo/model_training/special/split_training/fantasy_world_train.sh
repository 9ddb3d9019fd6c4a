#!/usr/bin/env bash
# Split training, step 2 of 2: stage 1 from the cache that fantasy_world_data_process.sh wrote. Only the
# DiT is loaded (no VAE, text encoder, CLIP or tokenizer); the size options must be the cache's. Set
# CACHE=..., OUTPUT=... and MODEL=... (the one the cache was made with) to override.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)"
CACHE="${CACHE:-./models/train/fantasy_world_cache}"
OUTPUT="${OUTPUT:-./models/train/fantasy_world_split_stage1}"
MODEL="${MODEL:-Wan-AI/Wan2.1-T2V-1.3B}"

accelerate launch "$REPO/examples/wanvideo/model_training/train_fantasy_world.py" \
  --task train \
  --dataset_base_path "$CACHE" \
  --height 480 --width 832 --num_frames 81 \
  --model_source pretrained \
  --model_id_with_origin_paths "$MODEL:diffusion_pytorch_model*.safetensors" \
  --stage 1 \
  --learning_rate 1e-5 --max_steps 20000 --save_steps 500 \
  --use_gradient_checkpointing \
  --dataset_num_workers 4 \
  --output_path "$OUTPUT"
