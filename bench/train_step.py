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
(shapes without data), for any configuration and size, in seconds. Also: the extra-token RoPE cost (identity-table extension +
rotation of the camera/register rows) as a share of the FantasyWorld step, and the targets of
issue 7. Writes ``<out>.json`` and ``<out>.md``.

Model FLOPs (no recomputation) are counted on the first warm-up step by hooks on every
``nn.Linear``/``nn.ConvNd`` and every attention call, from the real shapes and the real autograd
state of that step::

    FLOPs = sum_linear/conv  F_fwd * (1 + g_in + g_w)  +  sum_attention  4*B*Lq*Lk*d * (1 + 2*g)

with ``F_fwd = 2 * tokens * in * out`` for a linear layer (``2 * outputs * in/groups * kernel``
for a convolution), ``g_in`` = 1 when the layer's output is in the autograd graph and its input
needs a gradient, ``g_w`` = 1 when its weight trains, ``g`` = 1 when the attention output is in
the graph. So a trained layer counts 6*N*tokens, a frozen layer that gradients pass through
4*N*tokens, a forward-only frozen layer 2*N*tokens, and attention 4*Lq*Lk*d forward, x3 with
backward. Forward work repeated by gradient checkpointing in the backward pass is counted apart
(``recompute_flops``) and not in the model FLOPs. Element-wise work (norms, RoPE, activations,
the optimizer) is not counted.

Run ``python bench/train_step.py --help`` for the options; ``docs/benchmarks.md`` has results.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SCHEMA = "fantasy_world.bench.train_step/1"
STAGES = ("plain", "stage1", "stage2")
CKPT_NAMES = {True: "ckpt", False: "nockpt"}
GIB = 1024 ** 3
# Issue 7 targets.
TARGET_STAGE1_RATIO = 1.0
TARGET_STAGE2_RATIO = 1.6
TARGET_ROPE_SHARE = 0.005
TARGET_PEAK_GIB = 40.0

FLOP_FORMULA = (
    "model FLOPs = sum over nn.Linear/nn.ConvNd calls of F_fwd*(1 + g_in + g_w) + sum over attention calls of "
    "4*B*Lq*Lk*d*(1 + 2*g); F_fwd = 2*tokens*in*out (linear), 2*outputs*in/groups*kernel (conv); g_in = output in "
    "the graph and input needs a gradient, g_w = weight trains, g = attention output in the graph. Trained layers "
    "count 6*N*tokens, frozen layers that gradients pass through 4*N*tokens, forward-only frozen layers "
    "2*N*tokens, attention 4*Lq*Lk*d forward and x3 with backward. Counted by hooks on the first warm-up step "
    "(real shapes and autograd state). Recomputation by gradient checkpointing is reported apart "
    "(recompute_flops) and excluded; element-wise work (norms, RoPE, optimizer) is not counted."
)


# --------------------------------------------------------------------------------------------
# Command line and shapes (no torch import needed: --help stays fast)
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--isolate", default="auto", choices=("auto", "interleave", "fork", "none"),
                        help="interleave: one forked worker per variant, all alive, timed steps taken round-robin (CPU; "
                             "robust to load changes, peak RSS per variant); fork: forked workers one after another; "
                             "none: in this process, one variant after another (CUDA: peak statistics reset per "
                             "variant). auto: interleave on CPU, none on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    parser.add_argument("--geo_weight", type=float, default=1.0, help="lambda of the stage-2 loss L_diff + lambda * L_geo")
    parser.add_argument("--geo_loss", default="auto", choices=("auto", "real", "standin"),
                        help="geometry loss: diffsynth.fantasy_world.losses.geometry_loss (real) or a stand-in (sum of "
                             "the means of the geometry outputs); auto: real when importable")
    fw = parser.add_argument_group("FantasyWorld options (passed to enable_fantasy_world_mode)")
    fw.add_argument("--split_layer", type=int, default=None, help="video-only blocks (default: 40%% of the blocks)")
    fw.add_argument("--token_layout", default="global", choices=("global", "per_frame"))
    fw.add_argument("--num_register_tokens", type=int, default=4)
    fw.add_argument("--cross_attn_heads", type=int, default=None, help="cross-attention heads (default: a quarter of the DiT's)")
    fw.add_argument("--camera_condition", default="plucker", choices=("plucker", "pose", "none"))
    fw.add_argument("--camera_adapter_blocks", default=None,
                    help="video blocks with a camera adapter: comma list of indices, 'pre' (the video-only blocks, the "
                         "default) or 'post' (the blocks after the split)")
    fw.add_argument("--head_features", type=int, default=None)
    fw.add_argument("--head_resolution_factor", type=int, default=None)
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


def _most_square_pair(n: int) -> tuple[int, int]:
    best = (1, n)
    for a in range(1, int(math.isqrt(n)) + 1):
        if n % a == 0:
            best = (a, n // a)
    return best


def resolve_shape(args: argparse.Namespace, patch_size=(1, 2, 2)) -> dict:
    """Latent and token grids from the video size (or from --tokens)."""
    pt, ph, pw = patch_size
    if args.tokens is not None:
        if any(v is not None for v in (args.height, args.width, args.num_frames)):
            raise SystemExit("give either --tokens or --height/--width/--num_frames, not both")
        if args.tokens < 1:
            raise SystemExit("--tokens must be positive")
        n = args.tokens
        # Latent frames: the largest divisor of n not above n^(1/3); the rest as square as possible.
        frames = max(d for d in range(1, max(1, round(n ** (1 / 3))) + 1) if n % d == 0)
        h, w = _most_square_pair(n // frames)
        grid = (frames, h, w)
        latent = (frames * pt, h * ph, w * pw)
        height, width, num_frames = latent[1] * 8, latent[2] * 8, 4 * (latent[0] - 1) + 1
    else:
        height = 480 if args.height is None else args.height
        width = 832 if args.width is None else args.width
        num_frames = 81 if args.num_frames is None else args.num_frames
        if height % (8 * ph) or width % (8 * pw):
            raise SystemExit(f"height and width must be multiples of {8 * ph}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % 4:
            raise SystemExit(f"num_frames must be 4k+1, got {num_frames}")
        latent = ((num_frames - 1) // 4 + 1, height // 8, width // 8)
        if latent[0] % pt:
            raise SystemExit(f"latent frames {latent[0]} not divisible by the temporal patch {pt}")
        grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
    tokens = grid[0] * grid[1] * grid[2]
    return dict(height=height, width=width, num_frames=num_frames, latent=list(latent), grid=list(grid), tokens=tokens)


def parse_variants(args: argparse.Namespace) -> list[tuple[str, bool]]:
    settings = []
    for item in args.checkpointing.split(","):
        item = item.strip().lower()
        if item not in ("on", "off"):
            raise SystemExit(f"--checkpointing takes on, off or on,off; got {args.checkpointing!r}")
        settings.append(item == "on")
    variants: list[tuple[str, bool]] = []
    for item in args.variants.split(","):
        item = item.strip()
        if not item:
            continue
        stage, _, pin = item.partition(":")
        if stage not in STAGES:
            raise SystemExit(f"unknown variant {stage!r}; choose from {', '.join(STAGES)}")
        if pin:
            if pin not in ("ckpt", "nockpt"):
                raise SystemExit(f"variant {item!r}: the pin must be ckpt or nockpt")
            chosen = [pin == "ckpt"]
        else:
            chosen = settings
        for ckpt in chosen:
            if (stage, ckpt) not in variants:
                variants.append((stage, ckpt))
    if not variants:
        raise SystemExit("no variant selected")
    # Checkpointing on first (the reference setting), plain before the stages of each setting.
    return sorted(variants, key=lambda v: (not v[1], STAGES.index(v[0])))


def parse_overrides(items: list[str]) -> dict[str, int]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: only integer fields can be overridden") from None
    return overrides


def rope_coverage_problem(dim: int, num_heads: int) -> Optional[str]:
    """Upstream's 3D RoPE split (time/height/width) must cover the head dim exactly; else a message."""
    if dim % num_heads:
        return f"dim {dim} is not a multiple of num_heads {num_heads}"
    head_dim = dim // num_heads
    time_part = head_dim - 2 * (head_dim // 3)
    pairs = len(range(0, time_part, 2)[: time_part // 2]) + 2 * len(range(0, head_dim // 3, 2)[: (head_dim // 3) // 2])
    if 2 * pairs != head_dim:
        return (f"head dim {head_dim} (dim {dim} / {num_heads} heads) is not covered by upstream's 3D RoPE tables "
                f"({pairs} of {head_dim // 2} complex pairs): rope_apply would fail. Head dims 32, 96 and 128 work; "
                f"choose other heads with --set num_heads=N")
    return None


def model_config(args) -> dict:
    from diffsynth.fantasy_world.configs import DIT_CONFIGS
    if args.config not in DIT_CONFIGS:
        raise SystemExit(f"unknown --config {args.config!r}; choose from {', '.join(DIT_CONFIGS)}")
    cfg = dict(DIT_CONFIGS[args.config])
    overrides = parse_overrides(args.overrides)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise SystemExit(f"--set: unknown configuration fields {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


def build_model(args, device):
    """The configured ``WanModel`` with random weights (deterministic for --seed), fp32, on ``device``."""
    import torch
    from diffsynth.fantasy_world.configs import build_dit
    from diffsynth.models.wan_video_dit import WanModel
    with torch.device(device):
        if not args.overrides:
            return build_dit(args.config, seed=args.seed, dtype=torch.float32, device=device)
        torch.manual_seed(args.seed)
        return WanModel(**model_config(args)).to(device=device, dtype=torch.float32)


def variant_name(stage: str, ckpt: bool) -> str:
    return f"{stage}/{CKPT_NAMES[ckpt]}"


# --------------------------------------------------------------------------------------------
# Everything below needs torch
# --------------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _maxrss_bytes() -> int:
    import resource
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _group_of(name: str, split_layer: Optional[int]) -> str:
    if name.startswith("blocks."):
        index = int(name.split(".")[1])
        if split_layer is None:
            return "video_blocks"
        return "video_blocks_pre_split" if index < split_layer else "video_blocks_post_split"
    if name.startswith("fantasy_world."):
        part = name.split(".")[1]
        if part == "cross_attn":
            direction = name.split(".")[3] if name.count(".") >= 3 else ""
            return f"cross_attn.{direction}" if direction else "cross_attn"
        if part in ("depth_head", "points_head", "camera_head"):
            return "geometry_heads"
        if part == "camera_conditioning":
            return "camera_conditioning"
        if part == "geo_blocks":
            return "geo_blocks"
        return "geometry_other"
    return "dit_other"


class FlopCounter:
    """Hooks that count model FLOPs of one step from real shapes and autograd state (see module doc)."""

    def __init__(self, model, split_layer: Optional[int], geo_length: Optional[int]):
        import torch.nn as nn
        from diffsynth.models import wan_video_dit

        self.phase = "off"
        self.model_flops = 0.0
        self.recompute_flops = 0.0
        self.recompute_attention_flops = 0.0
        self.forward_flops = 0.0
        self.by_group: dict[str, float] = {}
        self.recompute_by_group: dict[str, float] = {}
        self.parts = dict(linear_forward=0.0, linear_backward_input=0.0, linear_backward_weight=0.0,
                          attention_forward=0.0, attention_backward=0.0)
        self.geo_length = geo_length
        self.rope_calls = dict(forward=0, forward_needing_grad=0, recompute=0)
        self._handles = []
        conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, module in model.named_modules():
            group = _group_of(name, split_layer)
            if isinstance(module, (nn.Linear, *conv_types)):
                self._handles.append(module.register_forward_hook(self._layer_hook(group)))
            elif isinstance(module, wan_video_dit.AttentionModule):
                self._handles.append(module.register_forward_hook(self._attention_hook(group)))
        self._module = wan_video_dit
        self._rope = wan_video_dit.rope_apply
        counter = self

        def counting_rope_apply(x, freqs, num_heads):
            if counter.geo_length is not None and x.shape[1] == counter.geo_length:
                if counter.phase == "forward":
                    counter.rope_calls["forward"] += 1
                    if x.requires_grad:
                        counter.rope_calls["forward_needing_grad"] += 1
                elif counter.phase == "backward":
                    counter.rope_calls["recompute"] += 1
            return counter._rope(x, freqs, num_heads)

        wan_video_dit.rope_apply = counting_rope_apply

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._module.rope_apply = self._rope

    def _add(self, group: str, forward: float, backward_input: float, backward_weight: float, attention: bool) -> None:
        if self.phase == "backward":  # a checkpointed module's forward, repeated during backward
            self.recompute_flops += forward
            if attention:
                self.recompute_attention_flops += forward
            self.recompute_by_group[group] = self.recompute_by_group.get(group, 0.0) + forward
            return
        if self.phase != "forward":
            return
        total = forward + backward_input + backward_weight
        self.model_flops += total
        self.forward_flops += forward
        self.by_group[group] = self.by_group.get(group, 0.0) + total
        if attention:
            self.parts["attention_forward"] += forward
            self.parts["attention_backward"] += backward_input
        else:
            self.parts["linear_forward"] += forward
            self.parts["linear_backward_input"] += backward_input
            self.parts["linear_backward_weight"] += backward_weight

    def _layer_hook(self, group):
        """Linear or convolution: forward FLOPs from the real shapes, backward parts from autograd state."""
        def hook(module, inputs, output):
            x = inputs[0]
            if hasattr(module, "kernel_size"):  # convolution
                forward = 2.0 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            else:
                forward = 2.0 * x.numel() * module.out_features
            in_graph = output.requires_grad
            g_in = in_graph and x.requires_grad
            g_w = in_graph and module.weight.requires_grad
            self._add(group, forward, forward * g_in, forward * g_w, attention=False)
        return hook

    def _attention_hook(self, group):
        def hook(module, inputs, output):
            q, k, v = inputs[:3]
            forward = 2.0 * q.shape[0] * q.shape[1] * k.shape[1] * (q.shape[-1] + v.shape[-1])
            backward = 2.0 * forward if output.requires_grad else 0.0
            self._add(group, forward, backward, 0.0, attention=True)
        return hook


@contextlib.contextmanager
def meta_values_read_as_zero():
    """On the meta device tensors have no values; a model that reads one (e.g. to skip a frozen,
    zero-gated attention) sees zeros here, the values of a freshly initialised gate."""
    import torch
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

    def zeros_like_list(t):
        return torch.zeros(t.shape, dtype=t.dtype, device="cpu").tolist()

    def patched(name):
        original = saved[name]

        def method(self, *args, **kwargs):
            if self.device.type != "meta":
                return original(self, *args, **kwargs)
            if name == "tolist":
                return zeros_like_list(self)
            value = torch.zeros((), dtype=self.dtype).item()
            return bool(value) if name == "__bool__" else value
        return method

    try:
        for name in saved:
            setattr(torch.Tensor, name, patched(name))
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _set_trainable(dit, stage: str) -> str:
    """Plain: every DiT parameter trains. Stages: the training script's rule. Returns the rule's source."""
    if stage == "plain":
        for param in dit.parameters():
            param.requires_grad_(True)
        return "all parameters"
    from diffsynth.fantasy_world.training import is_trainable

    number = 1 if stage == "stage1" else 2
    for name, param in dit.named_parameters():
        param.requires_grad_(is_trainable(name, number))
    return "diffsynth.fantasy_world.training.is_trainable"


def _fw_options(args) -> dict:
    options: dict[str, Any] = dict(token_layout=args.token_layout, num_register_tokens=args.num_register_tokens)
    for key in ("split_layer", "cross_attn_heads", "head_features", "head_resolution_factor"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    options["camera_condition"] = None if args.camera_condition == "none" else args.camera_condition
    blocks = args.camera_adapter_blocks
    if blocks and blocks != "pre" and options["camera_condition"] is not None:
        if blocks == "post":
            from diffsynth.fantasy_world.model import default_split_layer
            num_layers = model_config(args)["num_layers"]
            split = args.split_layer if args.split_layer is not None else default_split_layer(num_layers)
            options["camera_adapter_blocks"] = list(range(split, num_layers))
        else:
            try:
                options["camera_adapter_blocks"] = [int(b) for b in blocks.split(",") if b.strip()]
            except ValueError:
                raise SystemExit(f"--camera_adapter_blocks takes pre, post or a comma list of indices, got {blocks!r}") from None
    return options


def _camera_input(args, shape: dict, batch: int, device, generator):
    import torch
    f, hl, wl = shape["latent"]
    if args.camera_condition == "plucker":
        return torch.randn(batch, 24, f, hl, wl, device=device, generator=generator)
    if args.camera_condition == "pose":
        return torch.randn(batch, shape["num_frames"], 9, device=device, generator=generator)
    return None


def _standin_geometry_loss(pred: dict):
    return sum(value.float().mean() for value in pred.values())


def _geometry_targets(pred: dict, generator):
    import torch
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


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    median = statistics.median(ordered)
    return dict(median=median, p25=q1, p75=q3, iqr=q3 - q1, min=ordered[0], max=ordered[-1],
                mean=statistics.fmean(ordered), iqr_pct=100.0 * (q3 - q1) / median if median else 0.0,
                all=values)


def sequential_driver(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def run_variant(args, shape: dict, stage: str, ckpt: bool, device_str: str, driver=None) -> dict:
    """Build a fresh model, run warm-up + timed steps of one variant; returns its record.

    ``driver(step, steps)`` runs the timed steps and returns their seconds (default: back to
    back); the interleaved CPU mode passes one that waits for the parent's turn for each step.
    """
    import torch
    import torch.nn.functional as F
    from diffsynth.fantasy_world.model import enable_fantasy_world_mode
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    device = torch.device(device_str)
    compute_dtype = torch.bfloat16 if _resolve_dtype(args, device) == "bf16" else torch.float32
    autocast = compute_dtype != torch.float32
    record: dict[str, Any] = dict(name=variant_name(stage, ckpt), stage=stage, checkpointing=ckpt, status="ok")
    meta = device.type == "meta"  # FLOPs only: shapes without data, nothing timed
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = _rss_bytes()

    def peak_memory() -> dict:
        if device.type == "cuda":
            return dict(kind="cuda_max_allocated", bytes=torch.cuda.max_memory_allocated(device),
                        reserved_bytes=torch.cuda.max_memory_reserved(device))
        peak = _maxrss_bytes()
        return dict(kind="rss", bytes=peak, start_bytes=rss_start, growth_bytes=max(0, peak - rss_start))
    state: dict[str, Any] = {}
    counter = None
    try:
        torch.manual_seed(args.seed)
        dit = build_model(args, device)
        state["dit"] = dit
        split_layer = None
        geo_length = None
        if stage != "plain":
            with torch.device(device):  # build the branch where it runs (no CPU init of a large branch)
                branch = enable_fantasy_world_mode(dit, **_fw_options(args))
            split_layer = branch.split_layer
            from diffsynth.fantasy_world.rope import GeometryTokenLayout
            layout = GeometryTokenLayout(branch.token_layout, tuple(shape["grid"]), branch.num_register_tokens)
            geo_length = layout.sequence_length
            record["fantasy_world"] = dict(branch.config, extra_tokens=layout.num_extra_tokens, geo_tokens=geo_length)
        record["trainable_rule"] = _set_trainable(dit, stage)
        dit.train()
        trainable = [p for p in dit.parameters() if p.requires_grad]
        if args.frozen_dtype == "compute" and autocast:
            for p in dit.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(compute_dtype)
        record["params_total"] = sum(p.numel() for p in dit.parameters())
        record["params_trainable"] = sum(p.numel() for p in trainable)
        if stage != "plain":
            names = sorted({n.split(".")[1] + ("." + n.split(".")[3] if n.startswith("fantasy_world.cross_attn.") else "")
                            for n, p in dit.named_parameters() if p.requires_grad})
            record["trainable_modules"] = names
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        state["optimizer"] = optimizer

        cfg = model_config(args)
        generator = None if meta else torch.Generator(device=device).manual_seed(args.seed + 1)
        batch = args.batch
        latents = torch.randn(batch, cfg["in_dim"], *shape["latent"], device=device, generator=generator)
        timestep = torch.rand(batch, device=device, generator=generator) * 1000
        context = torch.randn(batch, args.text_len, cfg["text_dim"], device=device, generator=generator)
        noise_target = torch.randn(latents.shape, device=device, generator=generator)
        camera = _camera_input(args, shape, batch, device, generator) if stage != "plain" else None
        geo_targets: dict = {}
        use_real_geo = args.geo_loss in ("auto", "real")
        geometry_loss = None
        if stage != "plain" and use_real_geo:
            try:
                from diffsynth.fantasy_world.losses import geometry_loss
            except ImportError:
                if args.geo_loss == "real":
                    raise
                geometry_loss = None
        record["loss"] = dict(
            plain="flow-matching MSE (noise_pred vs random target)",
            stage1=("geometry_loss" if geometry_loss else "stand-in: sum of means of geometry outputs"),
            stage2=("MSE + %g * " % args.geo_weight) + ("geometry_loss" if geometry_loss else "stand-in geometry loss"),
        )[stage]

        def compute_loss(outputs):
            if stage == "plain":
                return F.mse_loss(outputs.float(), noise_target)
            noise_pred, geometry = outputs
            if geometry_loss is not None:
                if not geo_targets:
                    geo_targets.update(_geometry_targets({k: v.detach() for k, v in geometry.items()}, generator))
                geo = geometry_loss(geometry, geo_targets)["total"]
            else:
                geo = _standin_geometry_loss(geometry)
            if stage == "stage1":
                return geo
            return F.mse_loss(noise_pred.float(), noise_target) + args.geo_weight * geo

        def step(count: Optional[FlopCounter] = None):
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
            _sync(device)
            return float(loss.detach())

        warmup = max(1, args.warmup)
        counter = FlopCounter(dit, split_layer, geo_length)
        t0 = time.perf_counter()
        with (meta_values_read_as_zero() if meta else contextlib.nullcontext()):
            loss_value = step(counter)
        first = time.perf_counter() - t0
        counter.close()
        record["flops"] = dict(
            model=counter.model_flops, forward=counter.forward_flops,
            recompute=counter.recompute_flops, recompute_attention=counter.recompute_attention_flops,
            hardware=counter.model_flops + counter.recompute_flops,
            parts=counter.parts, by_group=counter.by_group, recompute_by_group=counter.recompute_by_group,
        )
        record["rope_calls_geo"] = counter.rope_calls if stage != "plain" else None
        counter = None
        if meta:
            record["step_s"] = None
            return record
        for _ in range(warmup - 1):
            step()
        losses = []

        def timed_step():
            losses.append(step())

        times = (driver or sequential_driver)(timed_step, args.steps)
        record["first_step_s"] = first
        record["step_s"] = _stats(times)
        record["loss_value"] = losses[-1] if losses else loss_value
        record["peak_memory"] = peak_memory()  # before the profiled / FLOP-counted extra steps
        if args.profile:
            record["profile"] = profile_step(step, dit, split_layer, device, args.profile, record["name"])
        if args.check_flops:
            from torch.utils.flop_counter import FlopCounterMode
            mode = FlopCounterMode(display=False)
            with mode:
                step()
            counted = float(mode.get_total_flops())
            ops = [str(op) for op in mode.get_flop_counts().get("Global", {})]
            attention_counted = any("attention" in op for op in ops)
            flops = record["flops"]
            expected = flops["hardware"]
            if not attention_counted:  # e.g. the CPU SDPA kernel has no FLOP formula in torch.utils.flop_counter
                expected -= (flops["parts"]["attention_forward"] + flops["parts"]["attention_backward"]
                             + flops["recompute_attention"])
            flops["flop_counter_mode"] = dict(total=counted, ops=ops, attention_counted=attention_counted,
                                              expected=expected, rel_error=(counted - expected) / expected)
    except Exception as exc:  # noqa: BLE001 -- one failing variant must not end the run
        if counter is not None:
            counter.close()
        record["status"] = "oom" if _is_oom(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        if record["status"] == "error":
            record["traceback"] = traceback.format_exc()[-4000:]
        record.setdefault("peak_memory", peak_memory())
        del exc
    finally:
        state.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def profile_step(step, dit, split_layer, device, directory: str, name: str, top: int = 25) -> dict:
    """One step under torch.profiler; forward ranges per module group (``fw::<group>``) via hooks."""
    from torch.profiler import ProfilerActivity, profile, record_function

    handles, open_ranges = [], {}
    wanted = []
    for module_name, module in dit.named_modules():
        parts = module_name.split(".")
        if (len(parts) == 2 and parts[0] == "blocks") or (len(parts) == 3 and parts[1] == "geo_blocks") \
                or (len(parts) == 4 and parts[1] == "cross_attn") or module_name in (
                    "fantasy_world.depth_head", "fantasy_world.points_head", "fantasy_world.camera_head",
                    "fantasy_world.camera_conditioning", "head"):
            wanted.append((module_name, module))
    for module_name, module in wanted:
        label = "fw::" + _group_of(module_name, split_layer)

        def pre(mod, inputs, label=label, key=module_name):
            rf = record_function(label)
            rf.__enter__()
            open_ranges.setdefault(key, []).append(rf)

        def post(mod, inputs, output, key=module_name):
            stack = open_ranges.get(key)
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            with record_function("bench::step"):
                step()
    finally:
        for handle in handles:
            handle.remove()
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=60)
    ranges = averages.table(sort_by="cpu_time_total", row_limit=200)
    range_lines = [line for line in ranges.splitlines() if "fw::" in line or "bench::step" in line]
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / (name.replace("/", "_") + "_ops.txt")
    path.write_text(f"{name}: operators by {sort_key}\n{table}\n\nforward ranges (CPU time incl. children):\n"
                    + "\n".join(range_lines) + "\n")

    def self_time(event) -> float:
        if device.type == "cuda":
            return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) * 1e-6
        return event.self_cpu_time_total * 1e-6

    events = sorted((e for e in averages if not e.key.startswith(("fw::", "bench::"))), key=self_time, reverse=True)
    groups = {e.key[4:]: e.cpu_time_total * 1e-6 for e in averages if e.key.startswith("fw::")}
    return dict(file=str(path), top_ops=[dict(op=e.key, self_s=self_time(e), calls=e.count) for e in events[:top]],
                forward_cpu_s_by_group=groups)


def _fork_worker(conn, args, shape, stage, ckpt, device_str, interleaved=False):
    driver = None
    if interleaved:
        if conn.recv() != "setup":  # build and warm up only when the parent says so (one worker at a time)
            conn.close()
            return

        def driver(step, steps):
            conn.send(("ready", None))
            times = []
            while True:
                command = conn.recv()
                if command != "step":
                    return times
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
                conn.send(("time", times[-1]))
    try:
        result = run_variant(args, shape, stage, ckpt, device_str, driver)
    except BaseException as exc:  # noqa: BLE001
        result = dict(name=variant_name(stage, ckpt), stage=stage, checkpointing=ckpt, status="error",
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    conn.send(("record", result) if interleaved else result)
    conn.close()


def run_variants_interleaved(args, shape, variants, device_str, log) -> list[dict]:
    """CPU: one forked worker per variant, all alive at once; the timed steps go round-robin (one step
    of each variant in turn, the order rotated every cycle), so a change in the machine's load hits
    every variant alike. Setup and warm-up run one worker at a time."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    workers = []
    for stage, ckpt in variants:
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=_fork_worker, args=(child_conn, args, shape, stage, ckpt, device_str, True))
        process.start()
        child_conn.close()
        workers.append(dict(name=variant_name(stage, ckpt), stage=stage, ckpt=ckpt, conn=parent_conn,
                            process=process, record=None))

    def receive(worker):
        try:
            return worker["conn"].recv()
        except EOFError:
            worker["process"].join()
            code = worker["process"].exitcode
            return ("record", dict(name=worker["name"], stage=worker["stage"], checkpointing=worker["ckpt"],
                                   status="oom" if code == -9 else "error",
                                   error=f"worker exited with code {code} (killed: out of memory?)"))

    active = []
    for worker in workers:
        t0 = time.perf_counter()
        log(f"[bench] {worker['name']}: build + warm-up ...")
        worker["conn"].send("setup")
        kind, payload = receive(worker)
        if kind == "ready":
            active.append(worker)
            log(f"[bench]   ready ({time.perf_counter() - t0:.1f} s)")
        else:
            worker["record"] = payload
            log(f"[bench]   {payload['status']}: {payload.get('error')}")
    for cycle in range(args.steps):
        order = active[cycle % len(active):] + active[:cycle % len(active)] if active else []
        times = []
        for worker in order:
            worker["conn"].send("step")
            kind, payload = receive(worker)
            if kind == "time":
                times.append(f"{worker['name']} {payload:.3f}s")
            else:
                worker["record"] = payload
                active.remove(worker)
                times.append(f"{worker['name']} {payload['status']}")
        log(f"[bench] cycle {cycle + 1}/{args.steps}: " + ", ".join(times))
    for worker in active:
        worker["conn"].send("done")
        kind, payload = receive(worker)
        worker["record"] = payload
    for worker in workers:
        worker["process"].join()
        worker["conn"].close()
    return [w["record"] for w in workers]


def _log_record(record: dict, log, quiet: bool) -> None:
    if record["status"] == "ok" and not record.get("step_s"):
        log(f"[bench]   {record['name']}: {record['flops']['model'] / 1e12:.4g} TFLOP model, "
            f"{record['flops']['recompute'] / 1e12:.4g} TFLOP recomputed (FLOP count only)")
    elif record["status"] == "ok":
        log(f"[bench]   {record['name']}: median {record['step_s']['median']:.4f} s (IQR {record['step_s']['iqr']:.4f}), "
            f"{record['flops']['model'] / 1e9:.4g} GFLOP, peak {record['peak_memory']['bytes'] / GIB:.2f} GiB"
            + (f", wall {record['wall_s']:.1f} s" if "wall_s" in record else ""))
    else:
        log(f"[bench]   {record['name']}: {record['status']}: {record.get('error')}")
        if record.get("traceback") and not quiet:
            print(record["traceback"], file=sys.stderr)


def run_variant_isolated(args, shape, stage, ckpt, device_str) -> dict:
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_fork_worker, args=(child_conn, args, shape, stage, ckpt, device_str))
    process.start()
    child_conn.close()
    result = None
    try:
        result = parent_conn.recv()
    except EOFError:
        pass
    process.join()
    if result is None:
        status = "oom" if process.exitcode in (-9,) else "error"
        result = dict(name=variant_name(stage, ckpt), stage=stage, checkpointing=ckpt, status=status,
                      error=f"worker exited with code {process.exitcode} (killed: out of memory?)")
    return result


def _resolve_dtype(args, device) -> str:
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def _time_call(fn, device, repeats: int, inner: int = 1) -> float:
    """Median seconds per call of ``fn`` (``inner`` calls per timed sample)."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def measure_rope_extra(args, shape: dict, device_str: str) -> dict:
    """Time the identity-table extension and the rotation of the extra rows (standalone)."""
    import torch
    from diffsynth.fantasy_world.rope import GeometryTokenLayout
    from diffsynth.models import wan_video_dit

    device = torch.device(device_str)
    cfg = model_config(args)
    heads, dim = cfg["num_heads"], cfg["dim"]
    compute_dtype = torch.bfloat16 if _resolve_dtype(args, device) == "bf16" else torch.float32
    f, h, w = shape["grid"]
    f_table, h_table, w_table = wan_video_dit.precompute_freqs_cis_3d(dim // heads)
    freqs = torch.cat([
        f_table[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        h_table[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        w_table[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1).to(device)
    layout = GeometryTokenLayout(args.token_layout, tuple(shape["grid"]), args.num_register_tokens)
    table = layout.extend_freqs(freqs)
    extra = layout.num_extra_tokens
    batch = args.batch
    # The extra rows of the table, in their sequence positions (identity rotations).
    positions = torch.arange(layout.sequence_length, dtype=torch.float64).view(1, -1, 1)
    _, special_positions = layout.split(positions)
    extra_rows = table[special_positions.flatten().long().to(device)]
    x_extra = torch.randn(batch, extra, dim, device=device, dtype=compute_dtype, requires_grad=True)
    x_full = torch.randn(batch, layout.sequence_length, dim, device=device, dtype=compute_dtype)
    grad_extra = torch.ones(batch, extra, dim, device=device, dtype=compute_dtype)
    repeats = 20 if device.type == "cuda" else 7
    inner = 20 if device.type == "cuda" else 5

    def extend():
        return layout.extend_freqs(freqs)

    def rope_forward():
        with torch.no_grad():
            return wan_video_dit.rope_apply(x_extra, extra_rows, heads)

    def rope_forward_backward():
        out = wan_video_dit.rope_apply(x_extra, extra_rows, heads)
        out.backward(grad_extra)

    def rope_full_forward():
        with torch.no_grad():
            return wan_video_dit.rope_apply(x_full, table, heads)

    t_extend = _time_call(extend, device, repeats, inner)
    t_fwd = _time_call(rope_forward, device, repeats, inner)
    t_fwd_bwd = _time_call(rope_forward_backward, device, repeats, inner)
    t_full = _time_call(rope_full_forward, device, repeats, max(1, inner // 5))
    return dict(
        extra_tokens=extra, geo_tokens=layout.sequence_length, video_tokens=layout.num_video_tokens,
        table_extension_s=t_extend, rope_extra_rows_forward_s=t_fwd,
        rope_extra_rows_backward_s=max(0.0, t_fwd_bwd - t_fwd), rope_full_geo_forward_s=t_full,
        method=(
            "standalone timings (median): the table extension once per forward; rope_apply forward (and "
            "backward) on the extra rows alone, times the number of geometry-stream rope_apply calls counted in "
            "the step (forward, recomputation by checkpointing, backward for those needing a gradient). "
            "Standalone calls include per-call overhead the fused full-sequence call does not pay, so this is "
            "an upper bound; proportional = full-sequence rope time x extra/geo_tokens, the lower estimate."
        ),
    )


def measure_matmul_rate(device_str: str, dtype_name: str) -> dict:
    import torch
    device = torch.device(device_str)
    if device.type == "cuda":
        n, dtype, repeats = 8192, (torch.bfloat16 if dtype_name == "bf16" else torch.float32), 10
    else:
        n, dtype, repeats = 1024, torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time_call(lambda: a @ b, device, repeats, inner=3)
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), seconds=seconds, flops_per_s=2.0 * n ** 3 / seconds)


def _source_info() -> dict:
    """The repository commit and a digest of the model code actually imported (diffsynth/ is generated)."""
    import hashlib
    import subprocess
    info: dict[str, Any] = {}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    import diffsynth
    package = Path(diffsynth.__file__).resolve().parent
    files = sorted((package / "fantasy_world").glob("*.py")) + [package / "models" / "wan_video_dit.py",
                                                                  package / "pipelines" / "wan_video.py"]
    digest = hashlib.sha256()
    for path in files:
        if path.exists():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    info["model_code_sha256"] = digest.hexdigest()[:16]
    info["diffsynth_path"] = str(package)
    return info


def _machine_info(device_str: str) -> dict:
    import torch
    info: dict[str, Any] = dict(
        hostname=platform.node(), platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, cpu_model=None, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    device = torch.device(device_str)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
    else:
        info["device_name"] = "meta device (no compute)" if device.type == "meta" else "CPU"
    return info


def _rope_summary(results: list[dict], rope: dict) -> None:
    """Per FantasyWorld variant: extra-token RoPE seconds per step and share of its step."""
    extra, geo = rope["extra_tokens"], rope["geo_tokens"]
    for record in results:
        calls = record.get("rope_calls_geo")
        if record["status"] != "ok" or not calls:
            continue
        step = record["step_s"]["median"]
        n_forward = calls["forward"] + calls["recompute"]
        n_backward = calls["forward_needing_grad"]
        upper = (rope["table_extension_s"] + n_forward * rope["rope_extra_rows_forward_s"]
                 + n_backward * rope["rope_extra_rows_backward_s"])
        proportional = rope["table_extension_s"] + (n_forward + 2 * n_backward) * rope["rope_full_geo_forward_s"] * extra / geo
        record["rope_extra"] = dict(seconds_upper=upper, share_upper=upper / step,
                                    seconds_proportional=proportional, share_proportional=proportional / step,
                                    calls=calls)


def _ratios(results: list[dict]) -> None:
    plain = {r["checkpointing"]: r for r in results if r["stage"] == "plain" and r["status"] == "ok"}
    for record in results:  # FLOP ratios (also without timings, e.g. on the meta device)
        same = plain.get(record["checkpointing"])
        if record["status"] == "ok" and same is not None:
            record["model_flop_ratio_vs_plain"] = record["flops"]["model"] / same["flops"]["model"]
            record["hardware_flop_ratio_vs_plain"] = record["flops"]["hardware"] / same["flops"]["hardware"]
    plain = {k: r for k, r in plain.items() if r.get("step_s")}
    plain_ok = [r for r in plain.values()]
    best_plain = min(plain_ok, key=lambda r: r["step_s"]["median"]) if plain_ok else None
    for record in results:
        if record["status"] != "ok" or not record.get("step_s"):
            continue
        same = plain.get(record["checkpointing"])
        record["ratio_vs_plain"] = record["step_s"]["median"] / same["step_s"]["median"] if same else None
        ref = plain.get(True)
        record["ratio_vs_plain_ckpt"] = record["step_s"]["median"] / ref["step_s"]["median"] if ref else None
        record["ratio_vs_best_plain"] = (record["step_s"]["median"] / best_plain["step_s"]["median"]) if best_plain else None


def _finish_record(record: dict, tokens_per_step: int) -> None:
    if record["status"] != "ok" or not record.get("step_s"):
        return
    median = record["step_s"]["median"]
    record["tokens_per_s"] = tokens_per_step / median
    record["achieved_flops_per_s"] = record["flops"]["model"] / median
    record["achieved_hardware_flops_per_s"] = record["flops"]["hardware"] / median


def evaluate_targets(report: dict) -> list[dict]:
    results = {r["name"]: r for r in report["results"]}
    targets = []

    def ratio_target(stage: str, limit: float, label: str):
        for ckpt in (True, False):
            record = results.get(variant_name(stage, ckpt))
            if record is None:
                continue
            entry = dict(target=f"{label} ({'ckpt on' if ckpt else 'ckpt off'}, vs plain same setting)", limit=limit,
                         kind="ratio_max")
            if record["status"] == "ok" and record.get("ratio_vs_plain") is None \
                    and record.get("hardware_flop_ratio_vs_plain") is not None:
                value = record["hardware_flop_ratio_vs_plain"]  # no timings (meta device): FLOPs incl. recompute
                entry.update(value=value, status="met" if value <= limit else "missed",
                             by=(value / limit - 1.0) if value > limit else 0.0,
                             note="FLOP estimate (model + recompute FLOPs), not a timing")
            elif record["status"] != "ok" or record.get("ratio_vs_plain") is None:
                entry.update(status="n/a", note=f"{record['name']}: {record['status']}; plain same setting: "
                                                 f"{results.get(variant_name('plain', ckpt), {}).get('status', 'not run')}")
            else:
                value = record["ratio_vs_plain"]
                entry.update(value=value, status="met" if value <= limit else "missed",
                             by=(value / limit - 1.0) if value > limit else 0.0)
            targets.append(entry)
        # Best fitting setting of the stage against the best fitting plain setting.
        oks = [results[n] for n in (variant_name(stage, True), variant_name(stage, False)) if n in results and results[n]["status"] == "ok"]
        if oks and any(r.get("ratio_vs_best_plain") is not None for r in oks):
            best = min(oks, key=lambda r: r["step_s"]["median"])
            value = best["ratio_vs_best_plain"]
            targets.append(dict(target=f"{label} (fastest setting that fits, vs fastest plain)", limit=limit, kind="ratio_max",
                                value=value, status="met" if value <= limit else "missed",
                                by=(value / limit - 1.0) if value > limit else 0.0, variant=best["name"]))

    ratio_target("stage1", TARGET_STAGE1_RATIO, "stage-1 step <= 1.0x plain")
    ratio_target("stage2", TARGET_STAGE2_RATIO, "stage-2 step <= 1.6x plain")
    for record in report["results"]:
        if record.get("rope_extra"):
            value = record["rope_extra"]["share_upper"]
            targets.append(dict(target=f"extra-token RoPE < 0.5% of the step ({record['name']}, upper bound)",
                                limit=TARGET_ROPE_SHARE, kind="share_max", value=value,
                                status="met" if value < TARGET_ROPE_SHARE else "missed",
                                by=(value / TARGET_ROPE_SHARE - 1.0) if value >= TARGET_ROPE_SHARE else 0.0))
    on_cuda = report["settings"]["device"].startswith("cuda")
    for record in report["results"]:
        if record["stage"] == "plain" or record["status"] != "ok":
            continue
        peak = record.get("peak_memory", {})
        if on_cuda:
            value = peak.get("bytes", 0) / GIB
            applies = report["config"]["name"] == "1.3B" and report["shape"]["tokens"] == 32760
            targets.append(dict(target=f"peak memory < 40 GiB ({record['name']})", limit=TARGET_PEAK_GIB, kind="gib_max",
                                value=value, status=("met" if value < TARGET_PEAK_GIB else "missed") if applies else "info",
                                note=None if applies else "the target is stated for 1.3B at 32,760 tokens"))
        plain = results.get(variant_name("plain", record["checkpointing"]))
        if plain and plain["status"] == "ok" and plain.get("achieved_flops_per_s") and record.get("achieved_flops_per_s"):
            value = record["achieved_flops_per_s"] / plain["achieved_flops_per_s"]
            targets.append(dict(target=f"achieved model FLOP/s >= plain's ({record['name']})", limit=1.0, kind="ratio_min",
                                value=value, status="met" if value >= 1.0 else "missed",
                                by=(1.0 - value) if value < 1.0 else 0.0))
    return targets


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _fmt_bytes_gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _flop_unit(report: dict) -> tuple[float, str]:
    values = [r["flops"]["model"] for r in report["results"] if r.get("flops")]
    return (1e12, "TFLOP") if values and max(values) >= 1e12 else (1e9, "GFLOP")


def _losses(report: dict) -> dict:
    losses: dict[str, str] = {}
    for record in report["results"]:
        if record.get("loss"):
            losses.setdefault(record["stage"], record["loss"])
    return losses


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    parts, values = [], sorted(values)
    start = prev = None
    for v in values + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    return ", ".join(parts) if values else "none"


def _memory_note(settings: dict) -> str:
    if settings["device"] == "meta":
        return "not measured (meta device: FLOP count only, no timings)"
    if settings["device"].startswith("cuda"):
        return "torch.cuda.max_memory_allocated (reset per variant, weights + optimizer state + activations)"
    if settings.get("isolate") in ("fork", "interleave"):
        return "peak RSS of the variant's forked worker (in brackets: its growth over the worker's start)"
    return "peak RSS of this process (monotone: later variants include earlier peaks)"


def render_markdown(report: dict) -> str:
    scale, unit = _flop_unit(report)
    host, shape, settings = report["machine"], report["shape"], report["settings"]
    cfg = report["config"]
    lines = [
        f"## Training step: plain vs FantasyWorld, `{cfg['name']}` DiT, {shape['tokens']:,} video tokens",
        "",
        f"- date: {report['date']}",
        f"- machine: {host.get('device_name')}; CPU {host.get('cpu_model')} ({host.get('cpu_count')} logical CPUs, "
        f"{host.get('torch_threads')} torch threads); torch {host.get('torch')}"
        + (f", CUDA {host.get('cuda')}" if host.get("cuda") else "")
        + (f"; 1-min load average {host['load_average_start'][0]:.2f} at start, {host['load_average_end'][0]:.2f} at end"
           if host.get("load_average_start") and host.get("load_average_end") else ""),
        f"- command: `{report['command']}`"
        + (f" (commit {report['source'].get('git_commit')}, model code sha256 {report['source'].get('model_code_sha256')})"
           if report.get("source") else ""),
        f"- model: dim {cfg['dim']}, {cfg['num_layers']} blocks, {cfg['num_heads']} heads, ffn {cfg['ffn_dim']}"
        + (" (overrides of the named configuration: " + ", ".join(f"{k}={v}" for k, v in cfg["overrides"].items()) + ")"
           if cfg.get("overrides") else "") + "; "
        f"video {shape['height']}x{shape['width']}x{shape['num_frames']} -> latent {tuple(shape['latent'])} -> "
        f"token grid {tuple(shape['grid'])} = {shape['tokens']:,} tokens/sample, batch {settings['batch']}, "
        f"text {settings['text_len']} tokens",
        "- compute: meta device, FLOP count only (one forward + backward on shapes: no data, no optimizer step, no "
        "timing)" if settings["device"] == "meta" else
        f"- compute: {settings['device']}, {settings['dtype']}"
        + (" autocast, fp32 master weights for trained parameters, frozen parameters in "
           + (settings["dtype"] if settings["frozen_dtype"] == "compute" else "fp32") if settings["dtype"] != "fp32" else "")
        + f"; AdamW lr {settings['lr']}; {settings['warmup']} warm-up + {settings['steps']} timed steps per variant"
        + (f" in each of {settings['rounds']} rounds (steps pooled)" if settings.get("rounds", 1) > 1 else "") + "; "
        f"memory: {_memory_note(settings)}"
        + ("; timed steps interleaved round-robin across the variants' workers" if settings.get("isolate") == "interleave" else ""),
    ]
    fw = next((r.get("fantasy_world") for r in report["results"] if r.get("fantasy_world")), None)
    if fw:
        lines.append(
            f"- FantasyWorld: split {fw['split_layer']}, layout {fw['token_layout']}, {fw['extra_tokens']} extra tokens, "
            f"cross-attention {fw['cross_attn_heads']} heads, camera {fw['camera_condition']}"
            + (f" (adapters on video blocks {_ranges(fw.get('camera_adapter_blocks') or [])})" if fw.get("camera_condition") else "")
            + "; losses: " + "; ".join(f"{stage}: {loss}" for stage, loss in _losses(report).items())
        )
    if report.get("matmul_rate"):
        m = report["matmul_rate"]
        lines.append(f"- measured matrix-multiply rate ({m['n']}^3 {m['dtype']}): {m['flops_per_s'] / scale:.3g} {unit}/s")
    lines += [
        "",
        f"| variant | ckpt | status | step median (s) | IQR (s) | min-max (s) | tokens/s | model {unit}/step | "
        f"recompute {unit} | achieved {unit}/s | peak mem (GiB) | trainable (M) | FLOPs vs plain (model / +recompute) "
        f"| time vs plain (same ckpt) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = r.get("peak_memory") or {}
        mem = _fmt_bytes_gib(peak.get("bytes"))
        if peak.get("kind") == "rss":
            mem += f" (+{_fmt_bytes_gib(peak.get('growth_bytes'))})"
        ckpt = "on" if r["checkpointing"] else "off"
        if r["status"] != "ok":
            lines.append(f"| {r['stage']} | {ckpt} | {r['status']}: {r.get('error', '')[:80]} | - | - | - | - | - | - | - | "
                         f"{mem} | - | - | - |")
            continue
        flop_ratio = "-"
        if r.get("model_flop_ratio_vs_plain") is not None:
            flop_ratio = f"{r['model_flop_ratio_vs_plain']:.3f}x / {r['hardware_flop_ratio_vs_plain']:.3f}x"
        s = r.get("step_s")
        timing = "- | - | - | -"
        achieved, ratio = "-", "-"
        if s:
            timing = f"{s['median']:.3f} | {s['iqr']:.3f} | {s['min']:.3f}-{s['max']:.3f} | {r['tokens_per_s']:,.0f}"
            achieved = f"{r['achieved_flops_per_s'] / scale:.4g}"
            ratio = "-" if r.get("ratio_vs_plain") is None else f"{r['ratio_vs_plain']:.3f}x"
        lines.append(
            f"| {r['stage']} | {ckpt} | ok | {timing} | {r['flops']['model'] / scale:.4g} | {r['flops']['recompute'] / scale:.4g} | "
            f"{achieved} | {mem} | {r['params_trainable'] / 1e6:.2f} | {flop_ratio} | {ratio} |"
        )
    rope = report.get("rope")
    if rope:
        lines += ["", f"Extra-token RoPE ({rope['extra_tokens']} extra of {rope['geo_tokens']:,} geometry tokens): table "
                  f"extension {rope['table_extension_s'] * 1e3:.3f} ms, rope_apply on the extra rows {rope['rope_extra_rows_forward_s'] * 1e3:.3f} ms "
                  f"forward / {rope['rope_extra_rows_backward_s'] * 1e3:.3f} ms backward (full geometry sequence "
                  f"{rope['rope_full_geo_forward_s'] * 1e3:.3f} ms forward)."]
        for r in report["results"]:
            if r.get("rope_extra"):
                e = r["rope_extra"]
                c = e["calls"]
                lines.append(f"- {r['name']}: {c['forward']} + {c['recompute']} (recomputed) forward and "
                             f"{c['forward_needing_grad']} backward geometry-stream rope_apply calls per step -> "
                             f"{e['seconds_upper'] * 1e3:.3f} ms = {100 * e['share_upper']:.4f}% of the step (upper bound; "
                             f"proportional estimate {100 * e['share_proportional']:.5f}%)")
    if report.get("targets"):
        lines += ["", "| target (issue 7) | value | status |", "|---|---:|---|"]
        for t in report["targets"]:
            if "value" not in t:
                lines.append(f"| {t['target']} | - | {t['status']} ({t.get('note', '')}) |")
                continue
            if t["kind"] == "share_max":
                value = f"{100 * t['value']:.4f}%"
            elif t["kind"] == "gib_max":
                value = f"{t['value']:.2f} GiB"
            else:
                value = f"{t['value']:.3f}x"
            status = t["status"]
            if status == "missed":
                status += f" by {100 * t['by']:.1f}%"
            if t.get("variant"):
                status += f" ({t['variant']})"
            if t.get("note"):
                status += f" ({t['note']})"
            lines.append(f"| {t['target']} | {value} | {status} |")
    lines += ["", f"FLOPs: {report['flop_formula']}", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    shape = resolve_shape(args)
    variants = parse_variants(args)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    import torch
    cfg = model_config(args)
    problem = rope_coverage_problem(cfg["dim"], cfg["num_heads"])
    if problem:
        raise SystemExit(f"--config {args.config}: {problem}")
    if tuple(cfg["patch_size"]) != (1, 2, 2):
        shape = resolve_shape(args, cfg["patch_size"])
    device_str = args.device
    if device_str == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_str)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    dtype_name = _resolve_dtype(args, device)
    isolate = args.isolate
    if device.type == "meta":  # FLOP count only
        isolate, args.no_rope, args.no_matmul_rate, args.profile, args.check_flops, args.rounds = "none", True, True, None, False, 1
    if isolate == "auto":
        isolate = "none" if device.type == "cuda" else "interleave"
    if isolate in ("fork", "interleave") and device.type == "cuda":
        raise SystemExit(f"--isolate {isolate} is for CPU runs (CUDA cannot be used in forked workers); use none")
    if args.threads:
        torch.set_num_threads(args.threads)
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
                      rounds=max(1, args.rounds), fantasy_world_options=_fw_options(args)),
        flop_formula=FLOP_FORMULA,
        results=[],
    )
    prefix = args.out or str(REPO_ROOT / "outputs" / "bench" / f"train_step_{args.config}_{shape['tokens']}tok")
    if prefix.endswith(".json") or prefix.endswith(".md"):
        prefix = prefix.rsplit(".", 1)[0]
    partial = Path(prefix + ".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall_start = time.perf_counter()
    records: dict[str, dict] = {}
    rounds = max(1, args.rounds)
    for round_index in range(rounds):
        round_args = args if round_index == 0 else argparse.Namespace(**dict(vars(args), profile=None, check_flops=False))
        todo = [v for v in variants if records.get(variant_name(*v), {}).get("status", "ok") == "ok"]
        if isolate == "interleave":  # all variants of the round together, steps round-robin
            log(f"[bench] round {round_index + 1}/{rounds}: interleaved workers" if rounds > 1 else
                "[bench] interleaved workers (one per variant)")
            round_records = run_variants_interleaved(round_args, shape, todo, device_str, log)
        else:
            round_records = []
            for stage, ckpt in todo:
                t0 = time.perf_counter()
                log(f"[bench] {variant_name(stage, ckpt)}" + (f" (round {round_index + 1}/{rounds})" if rounds > 1 else "") + " ...")
                if isolate == "fork":
                    record = run_variant_isolated(round_args, shape, stage, ckpt, device_str)
                else:
                    record = run_variant(round_args, shape, stage, ckpt, device_str)
                record["wall_s"] = time.perf_counter() - t0
                round_records.append(record)
                _log_record(record, log, args.quiet)
                # Results so far, in case the run is cut short (e.g. a time limit on a lent GPU).
                partial.write_text(json.dumps(dict(report, results=list(records.values()) + round_records, partial=True),
                                              indent=1, default=str))
        if isolate == "interleave":
            for record in round_records:
                _log_record(record, log, args.quiet)
        for record in round_records:
            name = record["name"]
            first = records.get(name)
            if first is None:
                record["rounds"] = 1
                records[name] = record
            elif record["status"] == "ok":
                first["step_s"] = _stats(first["step_s"]["all"] + record["step_s"]["all"])
                first["rounds"] += 1
                if record["peak_memory"]["bytes"] > first["peak_memory"]["bytes"]:
                    first["peak_memory"] = record["peak_memory"]
            else:
                first.setdefault("round_errors", []).append(f"round {round_index + 1}: {record.get('error')}")
        partial.write_text(json.dumps(dict(report, results=list(records.values()), partial=True), indent=1, default=str))
    for stage, ckpt in variants:
        record = records[variant_name(stage, ckpt)]
        _finish_record(record, tokens_per_step)
        report["results"].append(record)
    report["machine"] = _machine_info(device_str)
    report["source"] = _source_info()
    report["machine"]["load_average_start"] = load_start
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["variants_wall_s"] = time.perf_counter() - wall_start
    _ratios(report["results"])
    if not args.no_rope and any(r["stage"] != "plain" for r in report["results"]):
        log("[bench] extra-token RoPE ...")
        report["rope"] = measure_rope_extra(args, shape, device_str)
        _rope_summary(report["results"], report["rope"])
    if not args.no_matmul_rate:
        report["matmul_rate"] = measure_matmul_rate(device_str, dtype_name)
    report["targets"] = evaluate_targets(report)

    out_json, out_md = Path(prefix + ".json"), Path(prefix + ".md")
    out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    partial.unlink(missing_ok=True)
    markdown = render_markdown(report)
    out_md.write_text(markdown)
    print(markdown)
    log(f"[bench] wrote {out_json} and {out_md}")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
