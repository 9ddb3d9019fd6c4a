"""Shared fixtures: a small ray-cast FantasyWorld dataset, generated once per test session."""
import shutil
from pathlib import Path

import math

import pandas
import pytest
import torch

from diffsynth.fantasy_world.data.synthetic import generate_dataset
from diffsynth.fantasy_world.geometry.camera import quaternion_to_rotation_matrix
from diffsynth.fantasy_world.train.args import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
# Small but non-trivial: 9 = 4*2+1 frames, and a 2:3 aspect ratio so that cover crops really crop.
SYNTHETIC_SCENES, SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH, SYNTHETIC_SEED = 3, 9, 32, 48, 0


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Folder of a synthetic dataset (3 scenes x 9 frames at 32x48, seed 0) with ``metadata.csv``.

    Shared by the whole session: never modify it; copy it first (``synthetic_dataset_copy``).
    """
    folder = tmp_path_factory.mktemp("synthetic_dataset")
    generate_dataset(folder, SYNTHETIC_SCENES, SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH, SYNTHETIC_SEED)
    return folder


@pytest.fixture
def synthetic_dataset_copy(synthetic_dataset, tmp_path) -> Path:
    """A private copy of ``synthetic_dataset`` that a test may corrupt."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "dataset"))


@pytest.fixture(scope="session")
def mixed_length_dataset(tmp_path_factory) -> Path:
    """Folder whose ``metadata.csv`` lists a 5-frame clip (row 0) and two 9-frame clips (rows 1, 2), all 32x48.

    Shared by the whole session: never modify it.
    """
    folder = tmp_path_factory.mktemp("mixed_length_dataset")
    rows = []
    for name, frames, count in (("short", 5, 1), ("long", 9, 2)):
        generate_dataset(folder / name, count, frames, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH, SYNTHETIC_SEED)
        metadata = pandas.read_csv(folder / name / "metadata.csv")
        for key in ("video", "camera", "depth", "points"):
            metadata[key] = name + "/" + metadata[key]
        rows.append(metadata)
    pandas.concat(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


@pytest.fixture
def train_args(synthetic_dataset, tmp_path):
    """``train_args(*extra, output="run")``: the trainer's options for ``synthetic_dataset`` on the tiny model,
    writing into ``tmp_path / output``."""
    def make(*extra, output="run"):
        return build_parser().parse_args([
            "--dataset_base_path", str(synthetic_dataset), "--height", "32", "--width", "48", "--num_frames", "9",
            "--model_source", "tiny", "--learning_rate", "1e-3", "--output_path", str(tmp_path / output), *extra,
        ])
    return make


# ----------------------------------------------------------------------------- random cameras


def random_rotations(count: int, generator: torch.Generator) -> torch.Tensor:
    return quaternion_to_rotation_matrix(torch.randn(count, 4, generator=generator))


def rotation_about(axis, angle: float) -> torch.Tensor:
    axis = torch.tensor(axis, dtype=torch.float32)
    axis = axis / axis.norm()
    quaternion = torch.cat([axis * math.sin(angle / 2), torch.tensor([math.cos(angle / 2)])])
    return quaternion_to_rotation_matrix(quaternion)


def random_cameras(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rotations = random_rotations(count, generator)
    translations = torch.randn(count, 3, 1, generator=generator)
    w2c = torch.cat([rotations, translations], dim=-1)
    intrinsics = torch.rand(count, 4, generator=generator) * 0.5 + 0.5
    return w2c, intrinsics
