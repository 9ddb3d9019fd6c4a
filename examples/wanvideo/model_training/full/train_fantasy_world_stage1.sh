#!/usr/bin/env bash
# Stage 1 ("latent bridging") on real weights: Wan2.1-T2V-1.3B on one GPU, video backbone frozen,
# geometry branch trained on L_geo. Needs the model download (ModelScope) and a dataset in the
# FantasyWorld metadata format (README: "Dataset format"). Set DATASET=... and OUTPUT=... to override.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
DATASET="${DATASET:-data/fantasy_world}"
OUTPUT="${OUTPUT:-./models/train/Wan2.1-T2V-1.3B_fantasy_world_stage1}"
MODEL="Wan-AI/Wan2.1-T2V-1.3B"
# Text encoder and VAE as upstream downloads them (it redirects the *.pth files of every Wan repo here).
SHARED="DiffSynth-Studio/Wan-Series-Converted-Safetensors"

accelerate launch "$REPO/examples/wanvideo/model_training/train_fantasy_world.py" \
  --dataset_base_path "$DATASET" \
  --height 480 --width 832 --num_frames 81 \
  --model_source pretrained \
  --model_id_with_origin_paths "$MODEL:diffusion_pytorch_model*.safetensors,$SHARED:models_t5_umt5-xxl-enc-bf16.safetensors,$SHARED:Wan2.1_VAE.safetensors" \
  --stage 1 --split_layer 12 --token_layout global \
  --learning_rate 1e-5 --max_steps 20000 --save_steps 500 \
  --use_gradient_checkpointing \
  --output_path "$OUTPUT"
