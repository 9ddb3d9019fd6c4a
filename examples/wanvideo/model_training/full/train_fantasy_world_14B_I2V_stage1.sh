#!/usr/bin/env bash
# Stage 1 on Wan2.1-I2V-14B-480P (the paper's base: 40 blocks, split 16) on 8 GPUs: DeepSpeed ZeRO-3
# with parameters and optimizer state offloaded to the CPU (accelerate_config_zero3_offload.yaml;
# `pip install -e .[deepspeed]`). Image-to-video: the first frame is the image condition, so the
# CLIP image encoder is loaded too. Set DATASET=... and OUTPUT=... to override.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
DATASET="${DATASET:-data/fantasy_world}"
OUTPUT="${OUTPUT:-./models/train/Wan2.1-I2V-14B-480P_fantasy_world_stage1}"
MODEL="Wan-AI/Wan2.1-I2V-14B-480P"
# Text encoder, VAE and CLIP as upstream downloads them (it redirects the *.pth files of every Wan repo here).
SHARED="DiffSynth-Studio/Wan-Series-Converted-Safetensors"

accelerate launch --config_file "$REPO/examples/wanvideo/model_training/full/accelerate_config_zero3_offload.yaml" \
  "$REPO/examples/wanvideo/model_training/train_fantasy_world.py" \
  --dataset_base_path "$DATASET" \
  --height 480 --width 832 --num_frames 81 \
  --model_source pretrained \
  --model_id_with_origin_paths "$MODEL:diffusion_pytorch_model*.safetensors,$SHARED:models_t5_umt5-xxl-enc-bf16.safetensors,$SHARED:Wan2.1_VAE.safetensors,$SHARED:models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors" \
  --stage 1 --split_layer 16 \
  --learning_rate 1e-5 --max_steps 20000 --save_steps 500 \
  --use_gradient_checkpointing_offload \
  --output_path "$OUTPUT"
