"""One variant's training step: build it, count its FLOPs on the first warm-up step, time the rest.

A step is ``zero_grad`` + forward through ``model_fn_wan_video`` + loss + backward + AdamW step,
on a randomly initialised Wan DiT and random inputs. What each stage trains and its loss:
``bench/train_step.py``'s module doc.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.flops import FlopCounter, check_with_flop_counter_mode, meta_values_read_as_zero
from bench.measure import peak_memory, rss_bytes, sequential_driver, step_stats, sync
from bench.profiling import profile_step
from bench.variants import fw_config, fw_options, geometry_checkpointing, model_config, new_record, resolve_dtype
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.model.branch import enable_fantasy_world_mode
from diffsynth.fantasy_world.model.rope import GeometryTokenLayout
from diffsynth.models.wan_video_dit import WanModel

# driver(step, steps) -> seconds of each timed step.
Driver = Callable[[Callable[[], None], int], list[float]]


def build_model(args: argparse.Namespace, device: torch.device) -> WanModel:
    """The configured ``WanModel`` with random weights (deterministic for --seed), fp32, on ``device``."""
    with torch.device(device):
        if not args.overrides:
            return build_dit(args.config, seed=args.seed, dtype=torch.float32, device=device)
        torch.manual_seed(args.seed)
        return WanModel(**model_config(args)).to(device=device, dtype=torch.float32)


def set_trainable(dit: WanModel, stage: str) -> str:
    """Plain: every DiT parameter trains. Stages: the training script's rule. Returns the rule's source."""
    if stage == "plain":
        for param in dit.parameters():
            param.requires_grad_(True)
        return "all parameters"
    # Imported here: the training module pulls in the whole training stack, which plain runs do not need.
    from diffsynth.fantasy_world.train.module import is_trainable

    number = 1 if stage == "stage1" else 2
    for name, param in dit.named_parameters():
        param.requires_grad_(is_trainable(name, number))
    return "diffsynth.fantasy_world.train.module.is_trainable"


def _camera_input(args: argparse.Namespace, shape: dict, batch: int, device: torch.device,
                  generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """Plücker rays (B, 24, f, h, w) on the latent grid, poses (B, T, 9) per video frame, or None."""
    f, hl, wl = shape["latent"]
    condition = fw_config(args).camera_condition
    if condition == "plucker":
        return torch.randn(batch, 24, f, hl, wl, device=device, generator=generator)
    if condition == "pose":
        return torch.randn(batch, shape["num_frames"], 9, device=device, generator=generator)
    return None


def build_variant_dit(args: argparse.Namespace, shape: dict, stage: str, device: torch.device,
                      frozen_dtype: Optional[torch.dtype], record: dict) -> tuple[WanModel, list, Optional[int], Optional[int]]:
    """The variant's DiT in training mode (the stages with the FantasyWorld branch), frozen parameters
    cast to ``frozen_dtype`` (None: kept fp32).

    Returns ``(dit, trainable parameters, split layer, geometry-stream length)`` (the last two None
    for plain) and notes the branch, the trainable rule and the parameter counts in ``record``.
    """
    torch.manual_seed(args.seed)
    dit = build_model(args, device)
    split_layer = None
    geo_length = None
    if stage != "plain":
        with torch.device(device):  # build the branch where it runs (no CPU init of a large branch)
            branch = enable_fantasy_world_mode(dit, **fw_options(args))
        branch.checkpoint_policy = geometry_checkpointing(args)
        split_layer = branch.split_layer
        layout = GeometryTokenLayout(branch.token_layout, tuple(shape["grid"]), branch.num_register_tokens)
        geo_length = layout.sequence_length
        record["fantasy_world"] = dict(branch.config.to_metadata(), extra_tokens=layout.num_extra_tokens, geo_tokens=geo_length)
    record["trainable_rule"] = set_trainable(dit, stage)
    dit.train()
    trainable = [p for p in dit.parameters() if p.requires_grad]
    if frozen_dtype is not None:
        for p in dit.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)
    record["params_total"] = sum(p.numel() for p in dit.parameters())
    record["params_trainable"] = sum(p.numel() for p in trainable)
    if stage != "plain":
        record["trainable_modules"] = sorted({
            n.split(".")[1] + ("." + n.split(".")[3] if n.startswith("fantasy_world.cross_attn.") else "")
            for n, p in dit.named_parameters() if p.requires_grad})
    return dit, trainable, split_layer, geo_length


def random_inputs(args: argparse.Namespace, shape: dict, stage: str, device: torch.device,
                  generator: Optional[torch.Generator]) -> tuple[torch.Tensor, ...]:
    """``latents`` (B, C, f, h, w), ``timestep`` (B,) in [0, 1000), ``context`` (B, text_len, text_dim),
    ``noise_target`` like ``latents`` and the camera input (None for plain), drawn in this order."""
    cfg = model_config(args)
    batch = args.batch
    latents = torch.randn(batch, cfg["in_dim"], *shape["latent"], device=device, generator=generator)
    timestep = torch.rand(batch, device=device, generator=generator) * 1000
    context = torch.randn(batch, args.text_len, cfg["text_dim"], device=device, generator=generator)
    noise_target = torch.randn(latents.shape, device=device, generator=generator)
    camera = _camera_input(args, shape, batch, device, generator) if stage != "plain" else None
    return latents, timestep, context, noise_target, camera


def _geometry_targets(pred: dict, generator: Optional[torch.Generator]) -> dict:
    """Random targets shaped like the geometry outputs (positive depth, every pixel valid)."""
    target = {}
    for key, value in pred.items():
        if key == "depth":
            target["depth"] = torch.rand(value.shape, device=value.device, generator=generator) + 0.5
            target["valid"] = torch.ones_like(value, dtype=torch.bool)
        elif key == "points":
            target["points"] = torch.randn(value.shape, device=value.device, generator=generator)
            target["valid"] = torch.ones(value[:, :, :1].shape, dtype=torch.bool, device=value.device)
        elif key == "camera":
            target["camera"] = torch.randn(value.shape, device=value.device, generator=generator)
    return target


def step_loss_function(args: argparse.Namespace, stage: str, noise_target: torch.Tensor,
                       generator: Optional[torch.Generator]) -> tuple[Callable[..., torch.Tensor], str]:
    """The stage's loss on the model outputs, and its description for the report.

    Stages 1 and 2 use the trainer's own composition (``train.module.stage_loss``, the training
    script's default term weights, ``--geo_weight`` as lambda). ``compute_loss(outputs)`` draws
    random geometry targets on its first call; a test passes the trainer's targets, diffusion
    target, noise-level gate and schedule weight to check that the two losses agree.
    """
    if stage == "plain":
        return (lambda outputs: F.mse_loss(outputs.float(), noise_target)), "flow-matching MSE (noise_pred vs random target)"
    from diffsynth.fantasy_world.train.args import build_parser
    from diffsynth.fantasy_world.train.module import stage_loss

    parser = build_parser()
    loss_options = argparse.Namespace(
        **{name: parser.get_default(name) for name in ("depth_loss_weight", "point_loss_weight", "camera_loss_weight")},
        geometry_loss_lambda=args.geo_weight,
    )
    stage_number = 1 if stage == "stage1" else 2
    random_targets: dict = {}

    def compute_loss(outputs, targets: Optional[dict] = None, diffusion_target: Optional[torch.Tensor] = None,
                     geometry_gate: float = 1.0, diffusion_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        noise_pred, geometry = outputs
        if targets is None:
            if not random_targets:  # drawn on the first call, when the output shapes are known
                random_targets.update(_geometry_targets({k: v.detach() for k, v in geometry.items()}, generator))
            targets = random_targets
        losses = stage_loss(stage_number, geometry, targets, loss_options, geometry_gate, noise_pred,
                            noise_target if diffusion_target is None else diffusion_target, diffusion_weight)
        return losses["total"]

    description = "the trainer's stage loss: " + ("L_geo" if stage_number == 1 else f"L_diff + {args.geo_weight:g} * L_geo")
    return compute_loss, description


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_variant(args: argparse.Namespace, shape: dict, stage: str, ckpt: bool, device_str: str,
                driver: Optional[Driver] = None) -> dict:
    """Build a fresh model, run warm-up + timed steps of one variant; returns its record.

    ``driver(step, steps)`` runs the timed steps and returns their seconds (default: back to
    back); the interleaved CPU mode passes one that waits for the parent's turn for each step.
    A failure (out of memory or another error) is recorded in the record, not raised.
    """
    # Imported in the worker, after the fork: the pipeline module holds ~30 MiB of RSS, and importing it
    # in the parent shifts the workers' peak RSS and its growth, which the CPU tables compare across runs.
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    device = torch.device(device_str)
    compute_dtype = torch.bfloat16 if resolve_dtype(args, device.type) == "bf16" else torch.float32
    autocast = compute_dtype != torch.float32
    record = new_record(stage, ckpt)
    meta = device.type == "meta"  # FLOPs only: shapes without data, nothing timed
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = rss_bytes()
    counter = None
    try:
        frozen_dtype = compute_dtype if args.frozen_dtype == "compute" and autocast else None
        dit, trainable, split_layer, geo_length = build_variant_dit(args, shape, stage, device, frozen_dtype, record)
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        generator = None if meta else torch.Generator(device=device).manual_seed(args.seed + 1)
        latents, timestep, context, noise_target, camera = random_inputs(args, shape, stage, device, generator)
        compute_loss, record["loss"] = step_loss_function(args, stage, noise_target, generator)

        def step(count: Optional[FlopCounter] = None) -> float:
            optimizer.zero_grad(set_to_none=True)
            if count is not None:
                count.phase = "forward"
            with (torch.autocast(device_type=device.type, dtype=compute_dtype) if autocast else contextlib.nullcontext()):
                outputs = model_fn_wan_video(
                    dit, latents=latents, timestep=timestep, context=context,
                    use_gradient_checkpointing=ckpt, return_geometry=stage != "plain",
                    fantasy_world_camera=camera,
                )
                loss = compute_loss(outputs)
            if count is not None:
                count.phase = "backward"
            loss.backward()
            if count is not None:
                count.phase = "off"
            if meta:
                return float("nan")
            optimizer.step()
            sync(device)
            return float(loss.detach())

        counter = FlopCounter(dit, split_layer, geo_length)
        t0 = time.perf_counter()
        with (meta_values_read_as_zero() if meta else contextlib.nullcontext()):
            loss_value = step(counter)
        first = time.perf_counter() - t0
        counter.close()
        record["flops"] = counter.as_dict()
        record["rope_calls_geo"] = counter.rope_calls if stage != "plain" else None
        counter = None
        if meta:
            record["step_s"] = None
            return record
        for _ in range(max(1, args.warmup) - 1):
            step()
        losses = []
        times = (driver or sequential_driver)(lambda: losses.append(step()), args.steps)
        record["first_step_s"] = first
        record["step_s"] = step_stats(times)
        record["loss_value"] = losses[-1] if losses else loss_value
        record["peak_memory"] = peak_memory(device, rss_start)  # before the profiled / FLOP-counted extra steps
        if args.profile:
            record["profile"] = profile_step(step, dit, split_layer, device, args.profile, record["name"])
        if args.check_flops:
            record["flops"]["flop_counter_mode"] = check_with_flop_counter_mode(step, record["flops"])
    except Exception as exc:  # noqa: BLE001 -- one failing variant must not end the run
        if counter is not None:
            counter.close()
        record["status"] = "oom" if _is_oom(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        if record["status"] == "error":
            record["traceback"] = traceback.format_exc()[-4000:]
        record.setdefault("peak_memory", peak_memory(device, rss_start))
        del exc
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record
