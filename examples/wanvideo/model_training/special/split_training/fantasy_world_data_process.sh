#!/usr/bin/env bash
# Split training, step 1 of 2: encode the raw dataset once (VAE latents, text context, the image
# inputs of an I2V model, geometry targets) into a cache, so that training (fantasy_world_train.sh,
# same size options) loads only the DiT. Loads the DiT, VAE and text encoder, plus the CLIP image
# encoder when MODEL is an I2V model. Set DATASET=..., CACHE=..., MODEL=..., and
# TOKENIZER_PATH=<local google/umt5-xxl folder> to use a local tokenizer instead of upstream's download.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)"
DATASET="${DATASET:-data/fantasy_world}"
CACHE="${CACHE:-./models/train/fantasy_world_cache}"
MODEL="${MODEL:-Wan-AI/Wan2.1-T2V-1.3B}"
# Text encoder, VAE and CLIP as upstream downloads them (it redirects the *.pth files of every Wan repo here).
SHARED="DiffSynth-Studio/Wan-Series-Converted-Safetensors"
MODELS="$MODEL:diffusion_pytorch_model*.safetensors,$SHARED:models_t5_umt5-xxl-enc-bf16.safetensors,$SHARED:Wan2.1_VAE.safetensors"
if [[ "$MODEL" == *I2V* ]]; then
  MODELS="$MODELS,$SHARED:models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors"
fi
TOKENIZER=()
if [[ -n "${TOKENIZER_PATH:-}" ]]; then
  TOKENIZER=(--tokenizer_path "$TOKENIZER_PATH")
fi

# ${TOKENIZER[@]+...}: an empty array is "unbound" under `set -u` in bash < 4.4.
accelerate launch "$REPO/examples/wanvideo/model_training/train_fantasy_world.py" \
  --task data_process \
  --dataset_base_path "$DATASET" \
  --height 480 --width 832 --num_frames 81 \
  --model_source pretrained \
  --model_id_with_origin_paths "$MODELS" \
  ${TOKENIZER[@]+"${TOKENIZER[@]}"} \
  --dataset_num_workers 4 \
  --output_path "$CACHE"
