"""One training step under torch.profiler: operators by self time, forward time per module group."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from bench.flops import module_group

# The submodules whose forward gets a ``fw::<group>`` range: whole blocks, cross-attention directions, heads.
_HEADS = ("fantasy_world.depth_head", "fantasy_world.points_head", "fantasy_world.camera_head",
          "fantasy_world.camera_conditioning", "head")


def _ranged(name: str) -> bool:
    parts = name.split(".")
    return ((len(parts) == 2 and parts[0] == "blocks") or (len(parts) == 3 and parts[1] == "geo_blocks")
            or (len(parts) == 4 and parts[1] == "cross_attn") or name in _HEADS)


def profile_step(step: Callable[[], object], dit: nn.Module, split_layer: Optional[int], device: torch.device,
                 directory: str, name: str, top: int = 25) -> dict:
    """Run ``step`` once under torch.profiler; write ``directory/<name>_ops.txt`` (``/`` -> ``_``).

    Returns the file, the ``top`` operators by self time (device time on CUDA) and the forward CPU
    seconds per module group (``fw::<group>`` ranges opened and closed by forward hooks).
    """
    handles, open_ranges = [], {}
    for module_name, module in dit.named_modules():
        if not _ranged(module_name):
            continue
        label = "fw::" + module_group(module_name, split_layer)

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
