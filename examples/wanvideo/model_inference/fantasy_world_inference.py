"""FantasyWorld inference: a video plus its depth, point cloud and cameras, as files.

Tiny embedded model (no download; CPU, seconds), with the checkpoint and a camera path of `make smoke`::

    python examples/wanvideo/model_inference/fantasy_world_inference.py --model_source tiny \\
        --fantasy_world_checkpoint outputs/smoke/stage2/fantasy_world.safetensors \\
        --camera outputs/smoke/data/scene_000_cameras.txt \\
        --height 64 --width 64 --num_frames 17 --num_inference_steps 4 --output_dir outputs/fantasy_world

Real weights, with the training script's model options::

    python examples/wanvideo/model_inference/fantasy_world_inference.py --model_source pretrained \\
        --model_id_with_origin_paths "Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors,DiffSynth-Studio/Wan-Series-Converted-Safetensors:models_t5_umt5-xxl-enc-bf16.safetensors,DiffSynth-Studio/Wan-Series-Converted-Safetensors:Wan2.1_VAE.safetensors" \\
        --fantasy_world_checkpoint PATH/fantasy_world.safetensors --camera PATH/cameras.txt --device cuda

With local files only (nothing downloaded): --model_paths '["DIT.safetensors", "T5.safetensors", "VAE.safetensors"]'
--tokenizer_path PATH/google/umt5-xxl (the umt5 tokenizer folder).

Writes into --output_dir: video.mp4, depth.mp4 (colour-mapped depth), points.ply (binary,
confidence-filtered, at most --max_points points), cameras.txt (predicted cameras, RealEstate10K
format), camera_path.png (top view, predicted vs --camera) and frames_depth.png.
"""
import argparse
import time

import numpy as np
import torch

from diffsynth.fantasy_world.app.inference import build_pretrained_pipeline, camera_condition_from_file, save_inference_outputs
from diffsynth.fantasy_world.tiny.pipeline import build_tiny_pipeline
from diffsynth.fantasy_world.train.pretrained import model_configs_from_options

# Per model source: height, width, num_frames, num_inference_steps (the tiny model runs on a CPU in seconds).
SIZE_DEFAULTS = {"tiny": (64, 64, 9, 4), "pretrained": (480, 832, 81, 50)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_geometry_steps(text: str) -> list:
    """``"final,-1"`` -> ``["final", -1]``."""
    return [part if part == "final" else int(part) for part in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_source", choices=sorted(SIZE_DEFAULTS), default="tiny", help="Embedded tiny DiT (no download) or real Wan weights.")
    parser.add_argument("--model_paths", type=str, default=None, help="Real weights: paths to load models, JSON list (as in training).")
    parser.add_argument("--model_id_with_origin_paths", type=str, default=None, help="Real weights: comma-separated model_id:origin_file_pattern (as in training).")
    parser.add_argument("--tokenizer_path", type=str, default=None, help="Real weights: local folder of the umt5 tokenizer (default: upstream's download of google/umt5-xxl).")
    parser.add_argument("--fantasy_world_checkpoint", type=str, default=None, help="fantasy_world.safetensors from training. Required for real weights; tiny without it uses a freshly initialised branch.")
    parser.add_argument("--camera", type=str, default=None, help="RealEstate10K camera file conditioning the video (its first num_frames cameras).")
    parser.add_argument("--prompt", type=str, default="a quiet room with a few objects, the camera moves slowly around them")
    parser.add_argument("--negative_prompt", type=str, default="")
    parser.add_argument("--height", type=int, default=None, help="Default: 64 (tiny) or 480.")
    parser.add_argument("--width", type=int, default=None, help="Default: 64 (tiny) or 832.")
    parser.add_argument("--num_frames", type=int, default=None, help="4k+1 frames. Default: 9 (tiny) or 81.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: 4 (tiny) or 50.")
    parser.add_argument("--cfg_scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--max_points", type=int, default=100_000, help="At most this many points in the PLY (seeded random subset).")
    parser.add_argument("--confidence_threshold", type=float, default=25.0, help="Leave out points below this percentile (0-100) of the clip's point confidence (VGGT demo convention; 0 keeps all).")
    parser.add_argument("--geometry_steps", type=parse_geometry_steps, default=["final"],
                        help="Where the geometry is read: 'final' (default: one more pass on the final latents at the smallest noise level) "
                             "and/or comma-separated denoising-step indices (-1: the input of the last step, the earlier behaviour).")
    parser.add_argument("--output_dir", type=str, default="outputs/fantasy_world")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--torch_dtype", choices=sorted(DTYPES), default=None, help="Default: float32 (tiny) or bfloat16.")
    args = parser.parse_args(argv)
    height, width, num_frames, steps = SIZE_DEFAULTS[args.model_source]
    args.height = height if args.height is None else args.height
    args.width = width if args.width is None else args.width
    args.num_frames = num_frames if args.num_frames is None else args.num_frames
    args.num_inference_steps = steps if args.num_inference_steps is None else args.num_inference_steps
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.torch_dtype = args.torch_dtype or ("float32" if args.model_source == "tiny" else "bfloat16")
    if not 0 <= args.confidence_threshold < 100:
        parser.error("--confidence_threshold is a percentile in [0, 100)")
    if args.model_source == "pretrained" and args.fantasy_world_checkpoint is None:
        parser.error("--model_source pretrained needs --fantasy_world_checkpoint")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    dtype = DTYPES[args.torch_dtype]
    if args.model_source == "tiny":
        if args.fantasy_world_checkpoint is None:
            print("No --fantasy_world_checkpoint: the geometry branch is freshly initialised (untrained outputs).")
        pipe = build_tiny_pipeline(args.fantasy_world_checkpoint, device=args.device, torch_dtype=dtype)
    else:
        model_configs = model_configs_from_options(args.model_paths, args.model_id_with_origin_paths)
        pipe = build_pretrained_pipeline(
            model_configs, args.fantasy_world_checkpoint, device=args.device, torch_dtype=dtype, tokenizer_path=args.tokenizer_path
        )

    # Round the size as the pipeline will, so the camera condition matches the latent grid.
    height, width, num_frames = pipe.check_resize_height_width(args.height, args.width, args.num_frames)
    camera, w2c_input = None, None
    if args.camera is not None:
        kind = pipe.dit.fantasy_world.config.camera_condition
        if kind is None:
            raise SystemExit("--camera: this FantasyWorld branch was built without camera conditioning")
        camera, w2c_input, _ = camera_condition_from_file(
            args.camera, num_frames, height, width, kind, latent_stride=pipe.vae.upsampling_factor
        )

    video, geometry = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        height=height, width=width, num_frames=num_frames,
        num_inference_steps=args.num_inference_steps, cfg_scale=args.cfg_scale,
        fantasy_world_camera=camera, return_geometry=True, geometry_steps=args.geometry_steps,
    )
    frames = np.stack([np.asarray(frame) for frame in video])
    paths = save_inference_outputs(
        args.output_dir, frames, geometry, fps=args.fps, max_points=args.max_points,
        confidence_percentile=args.confidence_threshold, w2c_input=w2c_input, seed=args.seed,
    )
    print(f"FantasyWorld inference done in {time.time() - started:.1f} s ({num_frames} frames, {height}x{width}):")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")


if __name__ == "__main__":
    main()
