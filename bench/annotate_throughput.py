"""Throughput of the data engine's network: frames per second of one multi-view DA3 forward.

Random weights (speed does not depend on their values), random frames at the processed size of a
``--height`` x ``--width`` video at ``--resolution`` (DA3's longest side), all ``--frames`` in one
forward as the engine does, bf16 autocast unless ``--no_autocast``. Prints one JSON line.

    .venv/bin/python bench/annotate_throughput.py --model da3-small --frames 8 --height 480 --width 832
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffsynth.fantasy_world.app.annotate.network import build_network
from diffsynth.fantasy_world.app.annotate.pipeline import run_network
from diffsynth.fantasy_world.app.annotate.video import prepare_frames, processed_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="da3-small")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--resolution", type=int, default=504)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_autocast", action="store_true")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    network = build_network(args.model).to(args.device)
    size = processed_size(args.height, args.width, args.resolution)
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    images = prepare_frames(frames, size)
    run_network(network, images, None, None, not args.no_autocast)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_network(network, images, None, None, not args.no_autocast)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    best = min(seconds)
    print(json.dumps({"model": args.model, "device": args.device, "frames": args.frames, "processed_hw": list(size),
                      "autocast_bf16": not args.no_autocast, "threads": torch.get_num_threads(),
                      "seconds_per_forward": round(best, 3), "frames_per_second": round(args.frames / best, 3)}))


if __name__ == "__main__":
    main()
