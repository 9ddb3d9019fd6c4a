#!/usr/bin/env python
"""GPU memory per rank of FantasyWorld training under DDP, ZeRO-2, ZeRO-3 and FSDP2 (issue 22, item 5).

For each stage and video size, the DiT is built on the meta device with the FantasyWorld branch
(``bench/step.py``'s builders, the benchmark's defaults) and the trainer's rule of what trains
(``diffsynth.fantasy_world.train.module.is_trainable``). Then, per GPU of ``--gpus`` ranks:

* parameters: frozen ones in bf16; trainable ones as fp32 masters, plus the bf16 working copy
  where the engine computes from one (DeepSpeed casts the module to bf16);
* gradients (fp32) and Adam's two fp32 states, of the trainable parameters only;
* engine buffers: DDP's gradient buckets, DeepSpeed's reduce bucket and ZeRO-3's gathered
  parameters, FSDP2's unsharded blocks (the engines' defaults, named in ``ENGINE_NOTES``);
* activations: counted, not estimated, by one forward + backward on the meta device under the
  project's gradient checkpointing and bf16 autocast (``bench/activation_memory.py``). Counted
  twice: with the trained weights in fp32 (DDP: autocast keeps a bf16 copy of each for the whole
  forward) and in bf16 (DeepSpeed's bf16 module, FSDP2's bf16 ``param_dtype``: no copies).

Which engine divides what by the world size N:

| | frozen params | trainable params | gradients | Adam states |
|---|---|---|---|---|
| DDP | 1 | 1 | 1 | 1 |
| ZeRO-2 | 1 | bf16 copy 1, fp32 master 1/N | 1/N | 1/N |
| ZeRO-3 | 1/N | bf16 copy 1/N, fp32 master 1/N | 1/N | 1/N |
| ZeRO-3 offload (shipped yaml) | host | host | host | host |
| FSDP2 | 1/N | 1/N (fp32 shards) | 1/N | 1/N |

``--check_cpu WxHxF`` checks the count against real steps: the configuration runs on the CPU
(fp32, and the trainer's bf16 mixed precision under CPU autocast) in a fresh process, its
storages are counted the same way and its peak RSS is read; both are set against the prediction.

Usage: ``python bench/memory_plan.py --out DIR`` (writes ``DIR/memory_plan.json`` and
``DIR/memory_plan.md``); ``--help`` for the options.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

GIB = 1024 ** 3
ENGINES = ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload", "FSDP2")
# Which activation count an engine runs with: trained weights as fp32 masters under autocast, or
# the module in bf16 (see the module doc).
ENGINE_WEIGHTS = {"DDP": "fp32", "ZeRO-2": "bf16", "ZeRO-3": "bf16", "ZeRO-3 offload": "bf16", "FSDP2": "bf16"}
# The official Wan 14B sizes at 81 frames: (height, width).
OFFICIAL_SIZES = ((336, 592), (480, 832))
# DeepSpeed's defaults where accelerate's config leaves them (elements): the reduce bucket of
# ZeRO-2/3 and the most parameters ZeRO-3 keeps gathered at once.
REDUCE_BUCKET = 500_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
ENGINE_NOTES = {
    "DDP": "accelerate's DistributedDataParallel: full replica, gradient buckets beside .grad "
           "(gradient_as_bucket_view=False); trained weights fp32 under bf16 autocast",
    "ZeRO-2": "DeepSpeed ZeRO-2, bf16: module cast to bf16, fp32 master + Adam + gradient partitions 1/N, "
              f"reduce bucket {REDUCE_BUCKET:.0e} elements in bf16",
    "ZeRO-3": "DeepSpeed ZeRO-3, bf16, no offload: every parameter partitioned 1/N, gathered working set "
              f"bounded by stage3_max_live_parameters {STAGE3_MAX_LIVE_PARAMETERS:.0e}, reduce bucket as ZeRO-2",
    "ZeRO-3 offload": "accelerate_config_zero3_offload.yaml (the 14B script's): ZeRO-3 with parameters and "
                      "optimizer on the CPU; the GPU holds the gathered working set, the reduce bucket and the "
                      "activations; host RAM per rank in host_per_rank",
    "FSDP2": "fully_shard per DiTBlock (geometry blocks included), bf16 param_dtype: shards in the stored dtype "
             "(frozen bf16, trainable fp32), two blocks unsharded in bf16 at once (current + prefetched) "
             "and one block's bf16 gradients before its reduce-scatter",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/memory_plan.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="14B", help="DiT configuration: tiny, small, 1.3B or 14B")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for h, w in OFFICIAL_SIZES),
                        help="video sizes WIDTHxHEIGHT, comma-separated")
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--stages", default="1,2", help="FantasyWorld stages: 1, 2 or 1,2")
    parser.add_argument("--gpus", type=int, default=8, help="ranks (world size)")
    parser.add_argument("--gpu_gib", type=float, default=79.6,
                        help="memory of one GPU in GiB (an 80 GB H100 reports 81,559 MiB)")
    parser.add_argument("--reserve_gib", type=float, default=3.0,
                        help="kept free for what is not counted: CUDA context, NCCL and cuBLAS/flash workspaces, "
                             "allocator fragmentation")
    parser.add_argument("--offload_activations", action="store_true",
                        help="count with the trainer's --use_gradient_checkpointing_offload")
    parser.add_argument("--check_cpu", default=None, metavar="WIDTHxHEIGHTxFRAMES",
                        help="instead of the plan: check the count against real CPU steps of --config at this size "
                             "(fp32 and bf16 autocast), e.g. 480x288x33 with --config small")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the --check_cpu step")
    parser.add_argument("--out", default=None, help="output folder (default outputs/bench/memory_plan)")
    return parser


def step_args(config: str, width: int, height: int, num_frames: int) -> argparse.Namespace:
    """The training-step benchmark's arguments for one size: its defaults (the trainer's branch
    options, geometry checkpointing ``all``) unless given here."""
    from bench.train_step import build_parser as step_parser
    from diffsynth.fantasy_world.config import default_of

    # Named, not left to the parser: bench/step.py draws the camera input from this option.
    camera = default_of("camera_condition") or "none"
    return step_parser().parse_args(["--config", config, "--height", str(height), "--width", str(width),
                                     "--num_frames", str(num_frames), "--camera_condition", camera])


def build_step(args: argparse.Namespace, stage: int, device: str, frozen_dtype,
               trained_dtype=None) -> tuple[Any, list, Callable, dict]:
    """The stage's DiT with the branch on ``device``, frozen parameters in ``frozen_dtype`` and
    trainable ones in ``trained_dtype`` (None: float32, as the trainer holds them), and its step.

    Returns ``(dit, trainable parameters, forward_loss, counts)``: ``forward_loss()`` runs the
    checkpointed forward of ``model_fn_wan_video`` and the stage's loss (a scalar), as
    ``bench/step.py`` does; ``counts`` has the parameter counts the plan needs.
    """
    import torch

    from bench.step import build_variant_dit, step_loss_function, random_inputs
    from bench.variants import resolve_shape
    from diffsynth.fantasy_world.train.module import is_trainable
    from diffsynth.models.wan_video_dit import DiTBlock
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    name = f"stage{stage}"
    shape = resolve_shape(args)
    record: dict = {}
    dit, trainable, _, _ = build_variant_dit(args, shape, name, torch.device(device), frozen_dtype, record)
    # bench/step.py applies the same rule; checked here because the plan is only as right as this split.
    wrong = [n for n, p in dit.named_parameters() if p.requires_grad != is_trainable(n, stage)]
    if wrong:
        raise RuntimeError(f"trainable split differs from is_trainable for {len(wrong)} parameters, e.g. {wrong[0]}")
    if trained_dtype is not None:
        for parameter in trainable:
            parameter.data = parameter.data.to(trained_dtype)
    meta = device == "meta"
    generator = None if meta else torch.Generator(device=device).manual_seed(args.seed + 1)
    latents, timestep, context, noise_target, camera = random_inputs(args, shape, name, torch.device(device), generator)
    compute_loss, _ = step_loss_function(args, name, noise_target, generator)

    def forward_loss(offload: bool = False) -> torch.Tensor:
        outputs = model_fn_wan_video(
            dit, latents=latents, timestep=timestep, context=context, use_gradient_checkpointing=True,
            use_gradient_checkpointing_offload=offload, return_geometry=True, fantasy_world_camera=camera)
        return compute_loss(outputs)

    units = [m for m in dit.modules() if isinstance(m, DiTBlock)]
    counts = dict(
        frozen=sum(p.numel() for p in dit.parameters() if not p.requires_grad),
        trainable=sum(p.numel() for p in trainable),
        largest_unit=max(sum(p.numel() for p in u.parameters()) for u in units),
        largest_unit_trainable=max(sum(p.numel() for p in u.parameters() if p.requires_grad) for u in units),
        units=len(units), tokens=shape["tokens"], geo_tokens=record["fantasy_world"]["geo_tokens"],
        video=dict(height=shape["height"], width=shape["width"], num_frames=shape["num_frames"]),
    )
    return dit, trainable, forward_loss, counts


def count_activations(config: str, width: int, height: int, num_frames: int, stage: int, device: str = "meta",
                      precision: str = "bf16", autocast_device: str = "cuda", offload: bool = False,
                      optimizer_steps: bool = False, trained_weights: str = "fp32") -> dict:
    """Parameter counts and the activation bytes of one checkpointed step (``count_step``'s keys).

    ``precision``: ``bf16`` is the trainer's mixed precision (frozen weights bf16, trained ones
    fp32, the forward under bf16 autocast with ``autocast_device``'s lists); ``fp32``: all fp32.
    ``trained_weights``: ``fp32`` (masters, as the trainer holds them) or ``bf16`` (as DeepSpeed's
    bf16 module and FSDP2's bf16 ``param_dtype`` compute with them).
    ``optimizer_steps`` (a real device): an AdamW step before and after the counted step, so the
    process holds what a long run holds (Adam's states) when its peak memory is read.
    """
    import contextlib

    import torch

    from bench.activation_memory import count_step
    from bench.flops import meta_values_read_as_zero

    if precision not in ("bf16", "fp32") or trained_weights not in ("bf16", "fp32"):
        raise ValueError(f"precision and trained_weights are bf16 or fp32, got {precision!r}, {trained_weights!r}")
    low = torch.bfloat16 if precision == "bf16" else None
    args = step_args(config, width, height, num_frames)
    with (meta_values_read_as_zero() if device == "meta" else contextlib.nullcontext()):
        trained = torch.bfloat16 if trained_weights == "bf16" else None
        dit, trainable, forward_loss, counts = build_step(args, stage, device, low, trained)

        def counted_step() -> dict:
            return count_step(dit, lambda: forward_loss(offload), trainable, autocast_dtype=low,
                              autocast_device=autocast_device, offload=offload)

        counted = counted_step()
        if optimizer_steps:
            optimizer = torch.optim.AdamW(trainable, lr=1e-5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counted = counted_step()
            optimizer.step()
    return dict(counts, activations=counted, precision=precision, trained_weights=trained_weights,
                offload_activations=offload)


def per_gpu(engine: str, counts: dict, activations: dict, world: int) -> dict:
    """Bytes per GPU of ``engine`` on ``world`` ranks: parameters, gradients, optimizer, buffers,
    activations (``activations["peak_activations"]``) and their total (the sharding table in the
    module doc); ``host_per_rank``: host RAM of what is offloaded (the offloaded engine's states,
    ``activations["peak_host"]`` with activation offload)."""
    frozen, trainable = counts["frozen"], counts["trainable"]
    bf16, fp32 = 2, 4
    n = world
    grads, optim = fp32 * trainable / n, 2 * fp32 * trainable / n
    reduce_bucket = bf16 * min(REDUCE_BUCKET, trainable)
    gathered = bf16 * min(STAGE3_MAX_LIVE_PARAMETERS, frozen + trainable)
    host = float(activations["peak_host"])
    if engine == "DDP":
        params = bf16 * frozen + fp32 * trainable
        grads, optim = fp32 * trainable, 2 * fp32 * trainable
        buffers = fp32 * trainable  # the reducer's buckets: a second copy of the gradients
    elif engine == "ZeRO-2":
        params = bf16 * (frozen + trainable) + fp32 * trainable / n
        buffers = reduce_bucket
    elif engine == "ZeRO-3":
        params = bf16 * (frozen + trainable) / n + fp32 * trainable / n
        buffers = gathered + reduce_bucket
    elif engine == "ZeRO-3 offload":
        host += bf16 * (frozen + trainable) / n + fp32 * trainable / n + grads + optim
        params = grads = optim = 0.0
        buffers = gathered + reduce_bucket
    elif engine == "FSDP2":
        params = (bf16 * frozen + fp32 * trainable) / n
        buffers = 2 * bf16 * counts["largest_unit"] + bf16 * counts["largest_unit_trainable"]
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    act = activations["peak_activations"]
    total = params + grads + optim + buffers + act
    return dict(parameters=params, gradients=grads, optimizer=optim, buffers=buffers, activations=act, total=total,
                host_per_rank=host)


def plan(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Count every (stage, size) on meta and return the report: bytes per GPU for each engine and
    whether it fits in ``--gpu_gib`` less ``--reserve_gib``."""
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s.strip()]
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    usable = (args.gpu_gib - args.reserve_gib) * GIB
    rows = []
    for stage in stages:
        for width, height in sizes:
            counted = {}
            for weights in sorted(set(ENGINE_WEIGHTS.values())):
                log(f"[memory_plan] {args.config} stage {stage} {width}x{height}x{args.num_frames}, "
                    f"trained weights {weights}, on meta ...")
                counted[weights] = count_activations(args.config, width, height, args.num_frames, stage,
                                                     offload=args.offload_activations, trained_weights=weights)
            engines = {}
            for engine in ENGINES:
                engines[engine] = per_gpu(engine, counted["fp32"], counted[ENGINE_WEIGHTS[engine]]["activations"],
                                          args.gpus)
                engines[engine]["fits"] = engines[engine]["total"] <= usable
            common = {k: v for k, v in counted["fp32"].items() if k not in ("activations", "trained_weights")}
            rows.append(dict(stage=stage, **common, engines=engines,
                             activations={w: c["activations"] for w, c in counted.items()}))
    return dict(schema="memory_plan/1", config=args.config, gpus=args.gpus, gpu_gib=args.gpu_gib,
                reserve_gib=args.reserve_gib, num_frames=args.num_frames,
                offload_activations=args.offload_activations, engine_notes=ENGINE_NOTES, rows=rows)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def markdown(report: dict) -> str:
    """The plan as a Markdown table (GiB per GPU)."""
    offload = report["offload_activations"]
    lines = [f"Wan {report['config']}, {report['num_frames']} frames, {report['gpus']} GPUs of {report['gpu_gib']:g} GiB "
             f"(fits: total <= {report['gpu_gib'] - report['reserve_gib']:g} GiB, {report['reserve_gib']:g} GiB kept free). "
             f"GiB per GPU (host RAM: per rank); activations counted on meta, bf16 autocast, gradient checkpointing"
             f"{' with activation offload (--use_gradient_checkpointing_offload)' if offload else ''}.", "",
             "| stage | video | tokens (video / geometry) | trainable / frozen (B) | engine | params | grads | Adam | "
             "buffers | activations | total | fits |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        v = row["video"]
        for engine, m in row["engines"].items():
            host = f" (host RAM {_gib(m['host_per_rank'])})" if m["host_per_rank"] else ""
            lines.append(
                f"| {row['stage']} | {v['width']}x{v['height']}x{v['num_frames']} | {row['tokens']:,} / {row['geo_tokens']:,} "
                f"| {row['trainable'] / 1e9:.2f} / {row['frozen'] / 1e9:.2f} | {engine} | {_gib(m['parameters'])} | "
                f"{_gib(m['gradients'])} | {_gib(m['optimizer'])} | {_gib(m['buffers'])} | {_gib(m['activations'])} | "
                f"**{_gib(m['total'])}**{host} | {'yes' if m['fits'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _measure_cpu_step(config: str, size: tuple[int, int, int], stage: int, precision: str, threads: int,
                      queue) -> None:
    """In a fresh process: the stage's model on the CPU, two full steps (forward, backward, AdamW),
    the second counted with ``LiveBytes``; puts the counts, the peak RSS and the RSS once the
    libraries are loaded and before the model is built on ``queue``."""
    import resource

    import torch

    import bench.step  # noqa: F401 -- the libraries the step imports, loaded before the start is read
    import diffsynth.fantasy_world.train.losses  # noqa: F401
    import diffsynth.pipelines.wan_video  # noqa: F401
    from bench.measure import rss_bytes

    torch.set_num_threads(threads)
    start = rss_bytes()
    measured = count_activations(config, *size, stage, device="cpu", precision=precision, autocast_device="cpu",
                                 optimizer_steps=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(dict(measured, rss_start=start, rss_peak=peak))


def check_cpu(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The meta count against a real CPU step (one process) for each stage, in fp32 and in the
    trainer's bf16 mixed precision (CPU autocast lists on both sides)."""
    size = tuple(int(v) for v in args.check_cpu.lower().split("x"))
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is this step's
    results = []
    for precision in ("fp32", "bf16"):
        for stage in (int(s) for s in args.stages.split(",") if s.strip()):
            log(f"[memory_plan] check: {args.config} stage {stage} {args.check_cpu} {precision}, meta vs CPU ...")
            predicted = count_activations(args.config, *size, stage, precision=precision, autocast_device="cpu")
            queue = context.Queue()
            worker = context.Process(target=_measure_cpu_step,
                                     args=(args.config, size, stage, precision, args.threads, queue))
            worker.start()
            measured = queue.get()
            worker.join()
            if worker.exitcode:
                raise RuntimeError(f"the CPU step of stage {stage} ({precision}) failed (exit code {worker.exitcode})")
            # One process: parameters as stored, Adam's two fp32 states; gradients are in the counted peak.
            frozen_bytes = (2 if precision == "bf16" else 4) * predicted["frozen"]
            static = frozen_bytes + 4 * predicted["trainable"] + 2 * 4 * predicted["trainable"]
            predicted_peak = static + predicted["activations"]["peak"]
            growth = measured["rss_peak"] - measured["rss_start"]
            results.append(dict(
                stage=stage, precision=precision, video=predicted["video"], tokens=predicted["tokens"],
                trainable=predicted["trainable"], frozen=predicted["frozen"],
                predicted_activations=predicted["activations"], measured_activations=measured["activations"],
                activation_ratio=measured["activations"]["peak"] / predicted["activations"]["peak"],
                predicted_static=static, predicted_peak=predicted_peak, measured_rss_growth=growth,
                rss_ratio=growth / predicted_peak))
    return dict(schema="memory_plan_check/1", config=args.config, threads=args.threads, results=results)


def check_markdown(report: dict) -> str:
    """The ``--check_cpu`` report as a Markdown table (MiB)."""
    lines = [f"Meta prediction against real CPU steps, Wan config {report['config']}, one process", "",
             "| stage | precision | video | tokens | predicted activations + grads (MiB) | counted on CPU (MiB) | ratio | "
             "predicted peak: static + activations (MiB) | measured peak RSS growth (MiB) | ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 1024 ** 2
    for r in report["results"]:
        v = r["video"]
        lines.append(
            f"| {r['stage']} | {r['precision']} | {v['width']}x{v['height']}x{v['num_frames']} | {r['tokens']:,} | "
            f"{r['predicted_activations']['peak'] / mib:.1f} | {r['measured_activations']['peak'] / mib:.1f} | "
            f"{r['activation_ratio']:.3f} | {r['predicted_peak'] / mib:.1f} | {r['measured_rss_growth'] / mib:.1f} | "
            f"{r['rss_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or REPO_ROOT / "outputs" / "bench" / "memory_plan")
    out.mkdir(parents=True, exist_ok=True)
    if args.check_cpu:
        name, report = "memory_plan_check", check_cpu(args)
        text = check_markdown(report)
    else:
        name, report = "memory_plan", plan(args)
        text = markdown(report)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"[memory_plan] wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
