"""Installs the materialised fork: pinned upstream diffsynth + patches/ (see tools/fork.py)."""
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION_FILE = ROOT / "diffsynth" / "version.py"
# A local version label added here, not by a patch: upstream's version.py stays pristine, so the fork
# also applies onto upstream trees whose version.py says something else (git main says 2.0.0).
FORK_SUFFIX = "+fantasyworld"

if not VERSION_FILE.exists():
    sys.exit(
        "diffsynth/ is missing: it is generated, not committed. Run `make setup` "
        "(or `python tools/fork.py apply`) first, then install again."
    )

version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", VERSION_FILE.read_text()).group(1) + FORK_SUFFIX

setup(
    name="diffsynth",
    version=version,
    description="DiffSynth-Studio with FantasyWorld mode (geometry branch for the Wan video DiT)",
    packages=find_packages(include=["diffsynth", "diffsynth.*"]),
    include_package_data=True,
    python_requires=">=3.10.1",
    install_requires=[
        "torch>=2.0.0",
        "torchvision",
        "transformers",
        "imageio[ffmpeg]",
        "safetensors",
        "einops",
        "modelscope",
        "ftfy",
        "pandas",
        "accelerate",
        "peft",
    ],
    extras_require={
        # The test suite runs the DeepSpeed engines and the annotator's network on the CPU.
        "dev": ["pytest", "tqdm", "pillow", "deepspeed", "addict", "omegaconf"],
        # ZeRO launches (full/accelerate_config_zero*.yaml).
        "deepspeed": ["deepspeed"],
        # `python -m diffsynth.fantasy_world.annotate`; also `pip install --no-deps depth-anything-3==0.1.1`.
        "annotate": ["addict", "omegaconf"],
    },
)
