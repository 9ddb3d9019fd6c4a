"""Standalone timings next to the step: the extra-token RoPE work and the matrix-multiply rate."""
from __future__ import annotations

import argparse

import torch

from bench.measure import time_call
from bench.variants import fw_config, model_config, resolve_dtype
from diffsynth.fantasy_world.model import rope_real
from diffsynth.fantasy_world.model.rope import GeometryTokenLayout
from diffsynth.models import wan_video_dit

ROPE_METHOD = (
    "standalone timings (median): the geometry stream's table build once per forward (extension by identity "
    "rows + conversion to the real (cos, sin) table in the compute dtype); rope_real.apply_rotary forward (and "
    "backward) on the extra rows alone, times the number of geometry-stream apply_rotary calls counted in the "
    "step (forward, recomputation by checkpointing, backward for those needing a gradient). Standalone calls "
    "include per-call overhead the fused full-sequence call does not pay, and the whole table build is "
    "charged, so this is an upper bound; proportional = full-sequence rotation time x extra/geo_tokens, the "
    "lower estimate."
)


def _video_freqs(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Upstream's complex 3D RoPE table of the video tokens on the ``(f, h, w)`` grid: ``[f*h*w, 1, head_dim/2]``."""
    f, h, w = grid
    f_table, h_table, w_table = wan_video_dit.precompute_freqs_cis_3d(head_dim)
    return torch.cat([
        f_table[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        h_table[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        w_table[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1).to(device)


def measure_rope_extra(args: argparse.Namespace, shape: dict, device_str: str) -> dict:
    """Time the geometry stream's table build and the rotation of its extra (camera/register) rows.

    The rotation is the geometry stream's, ``rope_real.apply_rotary`` in the compute dtype; the
    extra rows are ``(B, extra, dim)`` inputs rotated by the identity rows of the extended table.
    Seconds per call (median); backward = forward + backward minus forward.
    """
    device = torch.device(device_str)
    cfg = model_config(args)
    heads, dim = cfg["num_heads"], cfg["dim"]
    compute_dtype = torch.bfloat16 if resolve_dtype(args, device.type) == "bf16" else torch.float32
    freqs = _video_freqs(dim // heads, tuple(shape["grid"]), device)
    config = fw_config(args)
    layout = GeometryTokenLayout(config.token_layout, tuple(shape["grid"]), config.num_register_tokens)

    def build_table() -> torch.Tensor:  # as FantasyWorldRun does once per forward
        return rope_real.real_rope_table(layout.extend_freqs(freqs), compute_dtype)

    table = build_table()
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

    def rotate_extra():
        with torch.no_grad():
            return rope_real.apply_rotary(x_extra, extra_rows, heads)

    def rotate_extra_with_backward():
        rope_real.apply_rotary(x_extra, extra_rows, heads).backward(grad_extra)

    def rotate_full():
        with torch.no_grad():
            return rope_real.apply_rotary(x_full, table, heads)

    t_table = time_call(build_table, device, repeats, inner)
    t_fwd = time_call(rotate_extra, device, repeats, inner)
    t_fwd_bwd = time_call(rotate_extra_with_backward, device, repeats, inner)
    t_full = time_call(rotate_full, device, repeats, max(1, inner // 5))
    return dict(
        extra_tokens=extra, geo_tokens=layout.sequence_length, video_tokens=layout.num_video_tokens,
        rotation="diffsynth.fantasy_world.model.rope_real.apply_rotary", table_build_s=t_table,
        rope_extra_rows_forward_s=t_fwd, rope_extra_rows_backward_s=max(0.0, t_fwd_bwd - t_fwd),
        rope_full_geo_forward_s=t_full, method=ROPE_METHOD,
    )


def measure_matmul_rate(device_str: str, dtype_name: str) -> dict:
    """FLOP/s of a square matmul (CUDA: 8192^3 in the compute dtype; CPU: 1024^3 fp32)."""
    device = torch.device(device_str)
    if device.type == "cuda":
        n, dtype, repeats = 8192, (torch.bfloat16 if dtype_name == "bf16" else torch.float32), 10
    else:
        n, dtype, repeats = 1024, torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, repeats, inner=3)
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), seconds=seconds, flops_per_s=2.0 * n ** 3 / seconds)
