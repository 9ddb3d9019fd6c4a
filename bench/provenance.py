"""Where a result comes from: the machine, its load, the commit and the model code that ran."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import diffsynth


def load_average() -> Optional[tuple[float, float, float]]:
    """The 1-, 5- and 15-minute load averages (None where the platform has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def source_info(repo_root: Path) -> dict:
    """The repository commit and a digest of the model code actually imported (diffsynth/ is generated)."""
    info: dict[str, Any] = {}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
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


def machine_info(device_str: str) -> dict:
    """Host, Python, torch, CPU model and count, torch threads; on CUDA the device and its memory."""
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
