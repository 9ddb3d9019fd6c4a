"""Standalone timings next to the step: the extra-token RoPE work and the matrix-multiply rate."""
from __future__ import annotations

import argparse

import torch

from bench.measure import time_call
from bench.variants import model_config, resolve_dtype
from diffsynth.fantasy_world.rope import GeometryTokenLayout
from diffsynth.models import wan_video_dit

ROPE_METHOD = (
    "standalone timings (median): the table extension once per forward; rope_apply forward (and "
    "backward) on the extra rows alone, times the number of geometry-stream rope_apply calls counted in "
    "the step (forward, recomputation by checkpointing, backward for those needing a gradient). "
    "Standalone calls include per-call overhead the fused full-sequence call does not pay, so this is "
    "an upper bound; proportional = full-sequence rope time x extra/geo_tokens, the lower estimate."
)


def measure_rope_extra(args: argparse.Namespace, shape: dict, device_str: str) -> dict:
    """Time the identity-table extension and the rotation of the extra (camera/register) rows.

    The video tokens' RoPE table is upstream's 3D table on the ``(f, h, w)`` grid; the extra rows
    are ``(B, extra, dim)`` inputs rotated by the identity rows of the extended table. Seconds per
    call (median); backward = forward + backward minus forward.
    """
    device = torch.device(device_str)
    cfg = model_config(args)
    heads, dim = cfg["num_heads"], cfg["dim"]
    compute_dtype = torch.bfloat16 if resolve_dtype(args, device.type) == "bf16" else torch.float32
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

    def rope_forward():
        with torch.no_grad():
            return wan_video_dit.rope_apply(x_extra, extra_rows, heads)

    def rope_forward_backward():
        out = wan_video_dit.rope_apply(x_extra, extra_rows, heads)
        out.backward(grad_extra)

    def rope_full_forward():
        with torch.no_grad():
            return wan_video_dit.rope_apply(x_full, table, heads)

    t_extend = time_call(lambda: layout.extend_freqs(freqs), device, repeats, inner)
    t_fwd = time_call(rope_forward, device, repeats, inner)
    t_fwd_bwd = time_call(rope_forward_backward, device, repeats, inner)
    t_full = time_call(rope_full_forward, device, repeats, max(1, inner // 5))
    return dict(
        extra_tokens=extra, geo_tokens=layout.sequence_length, video_tokens=layout.num_video_tokens,
        table_extension_s=t_extend, rope_extra_rows_forward_s=t_fwd,
        rope_extra_rows_backward_s=max(0.0, t_fwd_bwd - t_fwd), rope_full_geo_forward_s=t_full,
        method=ROPE_METHOD,
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
