"""Model FLOPs of one training step, counted by hooks from the real shapes and autograd state.

Counted on the first warm-up step by hooks on every ``nn.Linear``/``nn.ConvNd`` and every
attention call::

    FLOPs = sum_linear/conv  F_fwd * (1 + g_in + g_w)  +  sum_attention  4*B*Lq*Lk*d * (1 + 2*g)

with ``F_fwd = 2 * tokens * in * out`` for a linear layer (``2 * outputs * in/groups * kernel``
for a convolution), ``g_in`` = 1 when the layer's output is in the autograd graph and its input
needs a gradient, ``g_w`` = 1 when its weight trains, ``g`` = 1 when the attention output is in
the graph. So a trained layer counts 6*N*tokens, a frozen layer that gradients pass through
4*N*tokens, a forward-only frozen layer 2*N*tokens, and attention 4*Lq*Lk*d forward, x3 with
backward. Forward work repeated by gradient checkpointing in the backward pass is counted apart
(``recompute_flops``) and not in the model FLOPs. Element-wise work (norms, RoPE, activations,
the optimizer) is not counted.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from diffsynth.fantasy_world.model import rope_real
from diffsynth.models import wan_video_dit

# The formula above, as the report states it.
FLOP_FORMULA = (
    "model FLOPs = sum over nn.Linear/nn.ConvNd calls of F_fwd*(1 + g_in + g_w) + sum over attention calls of "
    "4*B*Lq*Lk*d*(1 + 2*g); F_fwd = 2*tokens*in*out (linear), 2*outputs*in/groups*kernel (conv); g_in = output in "
    "the graph and input needs a gradient, g_w = weight trains, g = attention output in the graph. Trained layers "
    "count 6*N*tokens, frozen layers that gradients pass through 4*N*tokens, forward-only frozen layers "
    "2*N*tokens, attention 4*Lq*Lk*d forward and x3 with backward. Counted by hooks on the first warm-up step "
    "(real shapes and autograd state). Recomputation by gradient checkpointing is reported apart "
    "(recompute_flops) and excluded; element-wise work (norms, RoPE, optimizer) is not counted."
)


def module_group(name: str, split_layer: Optional[int]) -> str:
    """The report's group of a DiT submodule name, e.g. ``blocks.3.ffn.0`` -> ``video_blocks_pre_split``."""
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
    """Counts one step's model FLOPs (see the module doc) and the geometry stream's RoPE rotations.

    The geometry stream (its self-attention, and its side of both cross-attention directions)
    rotates q/k with ``rope_real.apply_rotary``; the video stream's own blocks use upstream's
    ``rope_apply`` and are not counted. The caller sets ``phase`` to ``"forward"`` around the
    forward pass and ``"backward"`` around ``loss.backward()``: a call during backward is a
    checkpointed forward being recomputed (the rotation's own backward does not call
    ``apply_rotary``). ``close()`` removes the hooks and restores ``apply_rotary``.
    """

    def __init__(self, model: nn.Module, split_layer: Optional[int], geo_length: Optional[int]):
        """``geo_length``: tokens of the geometry stream, which tells its rotations apart (None: plain)."""
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
        for name, module in model.named_modules():
            group = module_group(name, split_layer)
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self._handles.append(module.register_forward_hook(self._layer_hook(group)))
            elif isinstance(module, wan_video_dit.AttentionModule):
                self._handles.append(module.register_forward_hook(self._attention_hook(group)))
        # apply_rotary is a module-level function, not a module: it is counted by swapping it (the
        # geometry modules call it through the module, ``rope_real.apply_rotary``).
        self._rotary = rope_real.apply_rotary
        rope_real.apply_rotary = self._counting_apply_rotary

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        rope_real.apply_rotary = self._rotary

    def as_dict(self) -> dict:
        """The record's ``flops`` entry: totals, parts and groups (``hardware`` = model + recompute)."""
        return dict(
            model=self.model_flops, forward=self.forward_flops,
            recompute=self.recompute_flops, recompute_attention=self.recompute_attention_flops,
            hardware=self.model_flops + self.recompute_flops,
            parts=self.parts, by_group=self.by_group, recompute_by_group=self.recompute_by_group,
        )

    def _counting_apply_rotary(self, x: torch.Tensor, table: torch.Tensor, num_heads: int) -> torch.Tensor:
        if self.geo_length is not None and x.shape[1] == self.geo_length:
            if self.phase == "forward":
                self.rope_calls["forward"] += 1
                if x.requires_grad:
                    self.rope_calls["forward_needing_grad"] += 1
            elif self.phase == "backward":
                self.rope_calls["recompute"] += 1
        return self._rotary(x, table, num_heads)

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

    def _layer_hook(self, group: str) -> Callable:
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

    def _attention_hook(self, group: str) -> Callable:
        """Attention on q, k, v of shape (B, L, C) (C = heads x head dim): 2*B*Lq*Lk*(C_q + C_v) forward,
        twice that backward when the output is in the graph."""
        def hook(module, inputs, output):
            q, k, v = inputs[:3]
            forward = 2.0 * q.shape[0] * q.shape[1] * k.shape[1] * (q.shape[-1] + v.shape[-1])
            backward = 2.0 * forward if output.requires_grad else 0.0
            self._add(group, forward, backward, 0.0, attention=True)
        return hook


@contextlib.contextmanager
def meta_values_read_as_zero() -> Iterator[None]:
    """On the meta device tensors have no values; a model that reads one (e.g. to skip a frozen,
    zero-gated attention) sees zeros here, the values of a freshly initialised gate."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

    def patched(name):
        original = saved[name]

        def method(self, *args, **kwargs):
            if self.device.type != "meta":
                return original(self, *args, **kwargs)
            if name == "tolist":
                return torch.zeros(self.shape, dtype=self.dtype, device="cpu").tolist()
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


def check_with_flop_counter_mode(step: Callable[[], object], flops: dict) -> dict:
    """Run ``step`` once more under ``torch.utils.flop_counter`` and compare with the hook count.

    ``flops`` is the hook count (``FlopCounter.as_dict()``); torch's counter sees recomputation
    too, so it is compared with the hardware FLOPs. Returns the record's ``flop_counter_mode`` entry.
    """
    mode = FlopCounterMode(display=False)
    with mode:
        step()
    counted = float(mode.get_total_flops())
    ops = [str(op) for op in mode.get_flop_counts().get("Global", {})]
    attention_counted = any("attention" in op for op in ops)
    expected = flops["hardware"]
    if not attention_counted:  # e.g. the CPU SDPA kernel has no FLOP formula in torch.utils.flop_counter
        expected -= (flops["parts"]["attention_forward"] + flops["parts"]["attention_backward"]
                     + flops["recompute_attention"])
    return dict(total=counted, ops=ops, attention_counted=attention_counted,
                expected=expected, rel_error=(counted - expected) / expected)
