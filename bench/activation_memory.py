"""Activation memory of one training step (forward + backward), counted on the meta device.

``bench/flops.py`` counts a step's FLOPs from shapes alone; this counts its memory the same way.
``LiveBytes`` (a ``TorchDispatchMode``) adds the bytes of every new storage an operator returns
and subtracts them when that storage is freed, so its peak is the most memory the step held at
once beyond what existed before it (parameters, inputs). It works on real tensors too, which is
how the meta count is checked against a CPU step (``bench/memory_plan.py --check_cpu``).

Four things differ between the meta device and a GPU, and are handled here:

* Autocast: meta has none. ``autocast_on_meta`` casts the inputs of the functions autocast
  casts (linear, convolutions, attention, matmul to bf16; the norms CUDA runs in float32), above
  autograd as autocast does, so backward keeps the same cast copies.
* Attention: on meta, ``scaled_dot_product_attention`` decomposes into the math kernel, which
  keeps the ``Lq x Lk`` score matrix for backward. The GPU (flash / memory-efficient) and CPU
  (flash) kernels keep only q, k, v, the output (laid out ``(B, L, H, D)``) and a float32
  log-sum-exp per query row: ``fused_attention_on_meta`` makes meta keep exactly that.
* Gradients of parameters are counted apart (``peak_activations`` excludes them), so an engine's
  gradient sharding can be applied to them.
* ``torch.autograd.graph.save_on_cpu`` (the trainer's ``--use_gradient_checkpointing_offload``)
  cannot copy a meta tensor: ``offload_on_meta`` moves the bytes it would pack to a host ledger
  and allocates them again on unpack, as the real copy back does.

The count is exact for what torch allocates through its operators; allocator rounding and caching,
kernel workspaces (cuBLAS, flash attention) and communication buffers are not in it.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode and still alive; peaks with and without the
    parameters' gradients (those registered with ``count_gradients_of``)."""

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict[int, tuple[weakref.ref, int]] = {}
        self._gradient_keys: set[int] = set()
        self.current = 0
        self.gradients = 0
        self.peak = 0
        self.peak_activations = 0
        self.host = 0  # bytes moved off the device by offload_on_meta
        self.peak_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, tensor in zip(func._schema.returns, outputs):
            # An aliasing return (a view, an in-place or out= result) shares a storage that exists already.
            if ret.alias_info is None and isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self._alive.pop(key, None)
            self.current -= size
            if key in self._gradient_keys:
                self._gradient_keys.discard(key)
                self.gradients -= size

        self._alive[key] = (weakref.ref(storage, freed), size)
        self.current += size
        self._update_peaks()

    def _update_peaks(self) -> None:
        self.peak = max(self.peak, self.current)
        self.peak_activations = max(self.peak_activations, self.current - self.gradients)

    def count_gradients_of(self, parameters: list[torch.nn.Parameter]) -> list:
        """Count these parameters' ``.grad`` as gradients, not activations, once accumulated.
        Returns the hook handles (remove them when done)."""
        def accumulated(parameter: torch.nn.Parameter) -> None:
            key = parameter.grad.untyped_storage()._cdata
            if key in self._alive and key not in self._gradient_keys:
                self._gradient_keys.add(key)
                self.gradients += self._alive[key][1]
        return [p.register_post_accumulate_grad_hook(accumulated) for p in parameters]

    def offloaded(self, size: int) -> None:
        """``size`` bytes packed to the host (+) or brought back (-)."""
        self.host += size
        self.peak_host = max(self.peak_host, self.host)


class _FusedAttentionMemory(torch.autograd.Function):
    """Attention with the memory of a fused kernel: keeps q, k, v, the output and a float32
    log-sum-exp ``(B, H, Lq)`` for backward. Shapes only: meant for meta tensors."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``(B, H, Lq, D)``, k ``(B, H, Lk, D)``, v ``(B, H, Lk, Dv)`` -> ``(B, H, Lq, Dv)``, laid out
        ``(B, Lq, H, Dv)`` in memory as the fused kernels return it (so that folding the heads back
        into the channels is a view, not a copy)."""
        batch, heads, length, _ = q.shape
        out = q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Within: ``F.scaled_dot_product_attention`` on meta tensors (no mask, no dropout, as the DiT
    calls it) keeps what a fused kernel keeps; real tensors are untouched."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        if query.device.type == "meta" and not args and not kwargs:
            return _FusedAttentionMemory.apply(query, key, value)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def offload_on_meta(counter: LiveBytes) -> Iterator[None]:
    """Within: ``torch.autograd.graph.save_on_cpu`` keeps a meta tensor's bytes in ``counter``'s host
    ledger (the device copy is dropped, as the real hook does once nothing else holds it) and
    allocates it again when backward unpacks it."""
    original = torch.autograd.graph.save_on_cpu

    class SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
        # The real hook copies the tensor (a view: only its elements) into a new host tensor and
        # copies it back into a new contiguous device tensor on unpack.
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            def pack(tensor: torch.Tensor) -> tuple:
                size = tensor.numel() * tensor.element_size()
                counter.offloaded(size)
                return tensor.shape, tensor.dtype, tensor.device, size

            def unpack(packed: tuple) -> torch.Tensor:
                shape, dtype, device, size = packed
                counter.offloaded(-size)
                return torch.empty(shape, dtype=dtype, device=device)

            super().__init__(pack, unpack)

    torch.autograd.graph.save_on_cpu = SaveOnHost
    try:
        yield
    finally:
        torch.autograd.graph.save_on_cpu = original


class _AutocastEmulation:
    """Casts of one emulated autocast region (see ``autocast_on_meta``)."""

    def __init__(self, dtype: torch.dtype, fp32_functions: tuple[str, ...]) -> None:
        self.dtype = dtype
        self.fp32_functions = fp32_functions
        self.caching = True
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast(self, value: Any, dtype: torch.dtype) -> Any:
        """``value`` in ``dtype`` when it is a floating meta tensor; autocast's rule for caching: a
        float32 leaf that requires grad (a trained weight) is cast once per forward."""
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
            return value
        cacheable = self.caching and value.is_leaf and value.requires_grad and dtype == self.dtype
        if cacheable and id(value) in self._cache:
            return self._cache[id(value)][1]
        cast = value.to(dtype)
        if cacheable:
            self._cache[id(value)] = (value, cast)
        return cast

    def end_forward(self) -> None:
        """Leaving the forward's autocast region: its cached casts go (as autocast's exit clears
        them); casts during backward's recomputation are not cached."""
        self._cache.clear()
        self.caching = False


# Functions autocast runs in the lower precision (as called by the DiT, the branch and the losses),
# and those it runs in float32, per device (torch's autocast lists: CUDA puts layer_norm in float32,
# the CPU keeps its input dtype). Element-wise float32 functions of CUDA's list (exp, log, pow, ...)
# are not emulated: here they keep their input dtype.
LOWER_PRECISION = ("linear", "conv1d", "conv2d", "conv3d", "scaled_dot_product_attention", "matmul", "einsum", "bmm")
AUTOCAST_FP32 = dict(cuda=("layer_norm", "group_norm"), cpu=("group_norm",))


@contextlib.contextmanager
def autocast_on_meta(dtype: torch.dtype, device_type: str = "cuda") -> Iterator[_AutocastEmulation]:
    """Within: ``device_type``'s autocast to ``dtype``, emulated for meta tensors (meta has no autocast).

    The casts happen above autograd, as autocast's do, so backward keeps the cast copies that it
    keeps on the GPU. Real tensors are untouched.
    """
    if device_type not in AUTOCAST_FP32:
        raise ValueError(f"no autocast lists for device type {device_type!r}; choose from {sorted(AUTOCAST_FP32)}")
    emulation = _AutocastEmulation(dtype, AUTOCAST_FP32[device_type])
    targets = [(F, name, dtype) for name in LOWER_PRECISION if hasattr(F, name)]
    targets += [(torch, name, dtype) for name in ("matmul", "einsum", "bmm")]
    targets += [(F, name, torch.float32) for name in emulation.fp32_functions]
    targets.append((torch.Tensor, "__matmul__", dtype))

    def wrap(original: Callable, to: torch.dtype) -> Callable:
        def function(*args, **kwargs):
            leaves = tree_flatten((args, kwargs))[0]
            if not any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in leaves):
                return original(*args, **kwargs)
            args, kwargs = tree_map(lambda v: emulation.cast(v, to), (args, kwargs))
            return original(*args, **kwargs)
        return function

    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for (owner, name, original), (_, _, to) in zip(saved, targets):
            setattr(owner, name, wrap(original, to))
        yield emulation
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def count_step(dit: torch.nn.Module, forward_loss: Callable[[], torch.Tensor], trainable: list[torch.nn.Parameter],
               autocast_dtype: Optional[torch.dtype] = None, autocast_device: str = "cuda",
               offload: bool = False) -> dict:
    """Run ``forward_loss()`` (forward + loss, a scalar) and its backward under ``LiveBytes``.

    ``autocast_dtype``: the forward runs under autocast to it, as the trainer's does (on meta,
    ``autocast_on_meta`` with ``autocast_device``'s lists; on a real device, ``torch.autocast``).
    Returns bytes: ``peak`` (activations + gradients of ``trainable``), ``peak_activations``,
    ``after_forward`` (held for backward when the loss is ready), ``gradients`` (at the end) and
    ``peak_host`` (offloaded, with ``offload``: the trainer's activation offload, meta only).
    On meta, attention keeps what a fused kernel keeps (``fused_attention_on_meta``).
    """
    counter = LiveBytes()
    handles = counter.count_gradients_of(trainable)
    device_type = next(dit.parameters()).device.type
    meta = device_type == "meta"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_attention_on_meta())
            if meta and offload:
                stack.enter_context(offload_on_meta(counter))
            emulation = None
            if meta and autocast_dtype is not None:
                emulation = stack.enter_context(autocast_on_meta(autocast_dtype, autocast_device))
            stack.enter_context(counter)
            region = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None and not meta
                      else contextlib.nullcontext())
            with region:
                loss = forward_loss()
            if emulation is not None:
                emulation.end_forward()
            after_forward = counter.current
            loss.backward()
            del loss
    finally:
        for handle in handles:
            handle.remove()
    return dict(peak=counter.peak, peak_activations=counter.peak_activations, after_forward=after_forward,
                gradients=counter.gradients, peak_host=counter.peak_host)
