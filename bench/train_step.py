#!/usr/bin/env python
"""Training-step benchmark: plain Wan full fine-tuning against FantasyWorld stage 1 and stage 2.

In one run, on one Wan DiT configuration with random weights and one token count, this times
(after warm-up, over repeated steps) one optimizer step of each variant:

* ``plain``  -- upstream full fine-tuning: every DiT parameter trains, flow-matching MSE loss;
* ``stage1`` -- FantasyWorld stage 1: only the geometry branch trains (projector, special
  tokens, geometry blocks, geometry<-video cross-attention, heads), geometry loss only;
* ``stage2`` -- FantasyWorld stage 2: the cross-attention (both directions) and the camera
  conditioning train, diffusion loss + lambda * geometry loss (the video stream is in the graph);

each with gradient checkpointing on and off (an out-of-memory failure is recorded, not fatal).
A step is ``zero_grad`` + forward through ``model_fn_wan_video`` + loss + backward + AdamW step.

Reported per variant: step time (median, quartiles, IQR, min/max), video tokens/s, model FLOPs
per step and achieved FLOP/s, recomputation FLOPs, peak memory (CUDA: ``max_memory_allocated``,
reset per variant; CPU: peak RSS of the variant's forked worker and its growth over the worker's
start), trainable parameters and the ratios against the plain step (time and FLOPs).

On CPU every variant lives in its own forked worker and the timed steps go round-robin across the
workers (``--isolate interleave``), so a change in the machine's load hits all variants alike; on
CUDA the variants run one after another in this process. ``--device meta`` only counts FLOPs
(shapes without data), for any configuration and size, in seconds. Also: the extra-token RoPE
cost (the geometry table build + ``rope_real.apply_rotary`` on the camera/register rows) as a share
of the FantasyWorld step, and the targets of issues 7 and 13. Writes ``<out>.json`` and ``<out>.md``.

Model FLOPs (no recomputation) are counted by hooks on the first warm-up step: ``bench/flops.py``
has the formula. The modules next to this script: ``variants.py`` (what is measured), ``step.py``
(one variant's step), ``isolation.py`` (workers, interleaving, rounds), ``flops.py``, ``measure.py``,
``profiling.py``, ``kernel_timings.py`` (RoPE and matmul timings), ``analysis.py`` (ratios, targets),
``report.py`` (JSON, Markdown) and ``provenance.py``.

Run ``python bench/train_step.py --help`` for the options; ``docs/benchmarks.md`` has results.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import SCHEMA, write_partial, write_report  # noqa: E402
from bench.variants import (  # noqa: E402
    CONFIG_OPTIONS, fw_options, geometry_checkpointing, model_config, parse_overrides, parse_variants, resolve_dtype, resolve_shape,
    rope_coverage_problem, variant_name,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line. The FantasyWorld options (names, choices, defaults in the help) come from
    ``FantasyWorldConfig``, whose package import brings torch."""
    from diffsynth.fantasy_world.config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="bench/train_step.py",
        description=(
            "Time one training step (forward + backward + AdamW) of plain Wan full fine-tuning and of "
            "FantasyWorld stage 1 / stage 2, with gradient checkpointing on and off, on a randomly "
            "initialised Wan DiT; write JSON and a Markdown table."
        ),
        epilog=(
            "Examples: CPU, small config: `python bench/train_step.py --config small --height 192 --width 320 "
            "--num_frames 17 --steps 5 --warmup 1 --out outputs/bench/cpu_small`. GPU, Wan 1.3B at 480x832x81 "
            "(32,760 tokens): `python bench/train_step.py --config 1.3B --height 480 --width 832 --num_frames 81 "
            "--device cuda --out outputs/bench/h100_1.3B`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default="small", help="DiT configuration: tiny, small, 1.3B or 14B")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the configuration (integers), e.g. --set num_heads=8; repeatable")
    shape = parser.add_argument_group("token count (video pixels, or --tokens)")
    shape.add_argument("--height", type=int, default=None, help="video height in pixels (multiple of 16)")
    shape.add_argument("--width", type=int, default=None, help="video width in pixels (multiple of 16)")
    shape.add_argument("--num_frames", type=int, default=None, help="video frames, 4k+1 (latent frames = (T-1)/4+1)")
    shape.add_argument("--tokens", type=int, default=None,
                       help="video tokens per sample instead of a video size: a latent grid f*h*w with this product is chosen")
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument("--text_len", type=int, default=512, help="text context tokens (Wan pads T5 output to 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per variant (at least 1; the first counts FLOPs)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N; meta: count model FLOPs only (no data, no "
                             "timing: FLOP ratios of any configuration at any size in seconds)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="compute dtype; bf16 runs under autocast with fp32 master weights for trained parameters "
                             "(auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--frozen_dtype", default="compute", choices=("compute", "fp32"),
                        help="storage of frozen parameters: the compute dtype (no master copy needed) or fp32")
    parser.add_argument("--variants", default="plain,stage1,stage2",
                        help="comma list from plain, stage1, stage2; an entry may pin checkpointing, e.g. stage2:ckpt")
    parser.add_argument("--checkpointing", default="on,off", help="gradient checkpointing settings to run: on, off or on,off")
    parser.add_argument("--geometry_checkpointing", default="all", metavar="POLICY",
                        help="with checkpointing on, which geometry layers (geometry block + cross-attention of that "
                             "depth) recompute, the branch's checkpoint_policy: all, none or every_k:K (layers 0, K, 2K, ...)")
    parser.add_argument("--isolate", default="auto", choices=("auto", "interleave", "fork", "none"),
                        help="interleave: one forked worker per variant, all alive, timed steps taken round-robin (CPU; "
                             "robust to load changes, peak RSS per variant); fork: forked workers one after another; "
                             "none: in this process, one variant after another (CUDA: peak statistics reset per "
                             "variant). auto: interleave on CPU, none on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    parser.add_argument("--geo_weight", type=float, default=1.0, help="lambda of the stage-2 loss L_diff + lambda * L_geo")
    fw = parser.add_argument_group("FantasyWorld options (passed to enable_fantasy_world_mode)")
    add_config_arguments(fw, names=CONFIG_OPTIONS)
    fw.add_argument("--camera_adapter_blocks", default=None,
                    help="video blocks with a camera adapter: comma list of indices, 'pre' (every video-only block) or "
                         "'post' (the blocks after the split); default: the branch's (the last video-only block)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no_rope", action="store_true", help="skip the extra-token RoPE measurement")
    parser.add_argument("--no_matmul_rate", action="store_true", help="skip the matrix-multiply rate measurement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sequence of variants this many times (fresh model each time) and pool the "
                             "timed steps: spreads slow drifts of the machine over all variants")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the timed steps, profile one more step per variant with torch.profiler and write "
                             "DIR/<stage>_<ckpt>_ops.txt (operators by self time, forward time per module group)")
    parser.add_argument("--check_flops", action="store_true",
                        help="also count FLOPs of one extra step with torch.utils.flop_counter (cross-check, slow)")
    parser.add_argument("--out", default=None,
                        help="output prefix: writes PREFIX.json and PREFIX.md (default outputs/bench/train_step_<config>_<tokens>tok)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def _device_and_isolation(args: argparse.Namespace) -> tuple[str, str]:
    """The device string (``auto`` resolved) and the isolation mode (``auto`` resolved; meta: none).

    On the meta device only FLOPs are counted, so everything timed is switched off in ``args``.
    """
    import torch
    device_str = args.device
    if device_str == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_str)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    isolate = args.isolate
    if device.type == "meta":
        isolate, args.no_rope, args.no_matmul_rate, args.profile, args.check_flops, args.rounds = "none", True, True, None, False, 1
    if isolate == "auto":
        isolate = "none" if device.type == "cuda" else "interleave"
    if isolate in ("fork", "interleave") and device.type == "cuda":
        raise SystemExit(f"--isolate {isolate} is for CPU runs (CUDA cannot be used in forked workers); use none")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device_str, isolate


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; 0 when at least one variant ran, else 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    shape = resolve_shape(args)
    variants = parse_variants(args)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    import torch

    from bench.analysis import add_ratios, add_rope_share, evaluate_targets, finish_record
    from bench.flops import FLOP_FORMULA
    from bench.isolation import run_rounds
    from bench.kernel_timings import measure_matmul_rate, measure_rope_extra
    from bench.provenance import load_average, machine_info, source_info

    cfg = model_config(args)
    geometry_checkpointing(args)  # a bad policy fails here, not in every variant
    problem = rope_coverage_problem(cfg["dim"], cfg["num_heads"])
    if problem:
        raise SystemExit(f"--config {args.config}: {problem}")
    if tuple(cfg["patch_size"]) != (1, 2, 2):
        shape = resolve_shape(args, cfg["patch_size"])
    device_str, isolate = _device_and_isolation(args)
    dtype_name = resolve_dtype(args, torch.device(device_str).type)
    tokens_per_step = shape["tokens"] * args.batch
    log(f"[bench] config {args.config}, video {shape['height']}x{shape['width']}x{shape['num_frames']}, latent "
        f"{tuple(shape['latent'])}, grid {tuple(shape['grid'])} = {shape['tokens']} tokens, device {device_str}, "
        f"{dtype_name}, variants {', '.join(variant_name(*v) for v in variants)}")

    report: dict[str, Any] = dict(
        schema=SCHEMA,
        date=_dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        command="python bench/train_step.py " + " ".join(shlex.quote(a) for a in raw_argv),
        config=dict(name=args.config, overrides=parse_overrides(args.overrides),
                    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}),
        shape=dict(shape, tokens_per_step=tokens_per_step),
        settings=dict(device=device_str, dtype=dtype_name, frozen_dtype=args.frozen_dtype, batch=args.batch,
                      text_len=args.text_len, steps=args.steps, warmup=max(1, args.warmup), seed=args.seed, lr=args.lr,
                      optimizer="torch.optim.AdamW (defaults)", geo_weight=args.geo_weight, isolate=isolate,
                      rounds=max(1, args.rounds), fantasy_world_options=fw_options(args),
                      geometry_checkpointing=args.geometry_checkpointing),
        flop_formula=FLOP_FORMULA,
        results=[],
    )
    prefix = args.out or str(REPO_ROOT / "outputs" / "bench" / f"train_step_{args.config}_{shape['tokens']}tok")
    if prefix.endswith(".json") or prefix.endswith(".md"):
        prefix = prefix.rsplit(".", 1)[0]
    partial = Path(prefix + ".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    wall_start = time.perf_counter()
    records = run_rounds(args, shape, variants, device_str, isolate, log,
                         lambda results: write_partial(partial, report, results))
    for stage, ckpt in variants:
        record = records[variant_name(stage, ckpt)]
        finish_record(record, tokens_per_step)
        report["results"].append(record)
    report["machine"] = machine_info(device_str)
    report["source"] = source_info(REPO_ROOT)
    report["machine"]["load_average_start"] = load_start
    report["machine"]["load_average_end"] = load_average()
    report["variants_wall_s"] = time.perf_counter() - wall_start
    add_ratios(report["results"])
    if not args.no_rope and any(r["stage"] != "plain" for r in report["results"]):
        log("[bench] extra-token RoPE ...")
        report["rope"] = measure_rope_extra(args, shape, device_str)
        add_rope_share(report["results"], report["rope"])
    if not args.no_matmul_rate:
        report["matmul_rate"] = measure_matmul_rate(device_str, dtype_name)
    report["targets"] = evaluate_targets(report)

    out_json, out_md, markdown = write_report(report, prefix)
    print(markdown)
    log(f"[bench] wrote {out_json} and {out_md}")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
