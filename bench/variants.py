"""What a training-step benchmark measures: the DiT configuration, the token grid and the variants.

A variant is a stage (``plain``, ``stage1``, ``stage2``) with gradient checkpointing on or off.
Nothing here imports torch at module level, so ``--help`` and argument errors stay fast.
"""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # imported where used: this module stays torch-free
    from diffsynth.fantasy_world.model.recompute import GeometryCheckpointing

STAGES = ("plain", "stage1", "stage2")
CKPT_NAMES = {True: "ckpt", False: "nockpt"}


def variant_name(stage: str, ckpt: bool) -> str:
    """The variant's key in the report, e.g. ``stage2/nockpt``."""
    return f"{stage}/{CKPT_NAMES[ckpt]}"


def new_record(stage: str, ckpt: bool, status: str = "ok", **fields: Any) -> dict:
    """A variant's record as every path starts it: its name, stage, checkpointing and status first."""
    return dict(name=variant_name(stage, ckpt), stage=stage, checkpointing=ckpt, status=status, **fields)


def parse_variants(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """``(stage, checkpointing)`` pairs from ``--variants`` and ``--checkpointing``, in report order."""
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
    """``--set KEY=VALUE`` items as a dict of integer configuration fields."""
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


def model_config(args: argparse.Namespace) -> dict:
    """The ``WanModel`` keyword arguments of ``--config`` with the ``--set`` overrides applied."""
    from diffsynth.fantasy_world.tiny.dit_configs import DIT_CONFIGS
    if args.config not in DIT_CONFIGS:
        raise SystemExit(f"unknown --config {args.config!r}; choose from {', '.join(DIT_CONFIGS)}")
    cfg = dict(DIT_CONFIGS[args.config])
    overrides = parse_overrides(args.overrides)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise SystemExit(f"--set: unknown configuration fields {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


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


def _most_square_pair(n: int) -> tuple[int, int]:
    best = (1, n)
    for a in range(1, int(math.isqrt(n)) + 1):
        if n % a == 0:
            best = (a, n // a)
    return best


def resolve_shape(args: argparse.Namespace, patch_size: tuple[int, int, int] = (1, 2, 2)) -> dict:
    """Video size, latent ``(f, h, w)``, patch grid ``(f, h, w)`` and tokens per sample.

    From ``--height/--width/--num_frames`` (latent = /8 in space, ``(T-1)/4+1`` frames) or, with
    ``--tokens N``, a grid whose product is N and the video size that gives it.
    """
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


def resolve_dtype(args: argparse.Namespace, device_type: str) -> str:
    """``fp32`` or ``bf16``: ``--dtype``, where ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if device_type == "cuda" else "fp32"


def geometry_checkpointing(args: argparse.Namespace) -> GeometryCheckpointing:
    """``--geometry_checkpointing`` as the branch's ``GeometryCheckpointing`` policy (exits on a bad spec)."""
    from diffsynth.fantasy_world.model.recompute import GeometryCheckpointing
    try:
        return GeometryCheckpointing.parse(args.geometry_checkpointing)
    except ValueError as error:
        raise SystemExit(f"--geometry_checkpointing: {error}") from None


# FantasyWorldConfig options the benchmark exposes as generated; --camera_adapter_blocks is its own
# (it also takes "pre" and "post").
CONFIG_OPTIONS = ("split_layer", "token_layout", "num_register_tokens", "cross_attn_heads", "camera_condition",
                  "head_features", "head_resolution_factor", "camera_head")


def fw_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``enable_fantasy_world_mode`` from the FantasyWorld options given (the rest
    keep ``FantasyWorldConfig``'s defaults)."""
    from diffsynth.fantasy_world.config import default_of, given_options

    options: dict[str, Any] = given_options(args, CONFIG_OPTIONS)
    if args.camera_adapter_blocks and options.get("camera_condition", default_of("camera_condition")) is not None:
        options["camera_adapter_blocks"] = _adapter_blocks(args)
    return options


def fw_config(args: argparse.Namespace):
    """The ``FantasyWorldConfig`` the benchmark's branch is built with (options given + defaults)."""
    from diffsynth.fantasy_world.config import FantasyWorldConfig

    return FantasyWorldConfig(**fw_options(args))


def _adapter_blocks(args: argparse.Namespace) -> list[int]:
    """``--camera_adapter_blocks``: ``pre`` (the video-only blocks), ``post`` (the blocks after the
    split) or a comma list of block indices."""
    spec = args.camera_adapter_blocks
    if spec in ("pre", "post"):
        from diffsynth.fantasy_world.config import FantasyWorldConfig

        cfg = model_config(args)
        num_layers = cfg["num_layers"]
        split = FantasyWorldConfig(split_layer=args.split_layer).resolve(num_layers, cfg["dim"], cfg["num_heads"]).split_layer
        return list(range(split)) if spec == "pre" else list(range(split, num_layers))
    try:
        return [int(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--camera_adapter_blocks takes pre, post or a comma list of indices, got {spec!r}") from None
