"""Shared fixtures: a small ray-cast FantasyWorld dataset, generated once per test session."""
import shutil
from pathlib import Path

import pytest

from diffsynth.fantasy_world.synthetic import generate_dataset

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
