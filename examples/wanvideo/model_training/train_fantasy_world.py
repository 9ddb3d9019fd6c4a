"""FantasyWorld training of the Wan video DiT (stage 1 or 2); run it with `accelerate launch`.

    accelerate launch examples/wanvideo/model_training/train_fantasy_world.py \
        --dataset_base_path data/scenes --height 480 --width 832 --num_frames 81 \
        --model_id_with_origin_paths "Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors,..." \
        --stage 1 --use_gradient_checkpointing --output_path ./models/fantasy_world/stage1

`--help` lists every option; the README explains the stages and outputs.
"""
import sys

from diffsynth.fantasy_world.train.loop import NonFiniteLossError, run_training
from diffsynth.fantasy_world.train.args import parse_args

if __name__ == "__main__":
    try:
        run_training(parse_args())
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
