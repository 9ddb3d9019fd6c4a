"""The smoke run (`make smoke`): synthetic data -> stage 1 -> stage 2 -> inference, as one script."""
import os
import re
import subprocess

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "examples/wanvideo/model_training/full/test_fantasy_world_training.sh"


def test_smoke_script_trains_both_stages_and_writes_results(tmp_path):
    out = tmp_path / "smoke"
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "SMOKE_OUTPUT": str(out)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    drop = re.search(r"stage-1 geometry loss fell by ([0-9.]+)%", result.stdout)
    assert drop and float(drop.group(1)) >= 30
    for stage in ("stage1", "stage2"):
        assert (out / stage / "fantasy_world.safetensors").exists()
        assert list((out / stage / "pictures").glob("*-depth.png")) and list((out / stage / "pictures").glob("*-camera.png"))
    for name in ("video.mp4", "depth.mp4", "points.ply", "cameras.txt", "camera_path.png"):
        assert (out / "inference" / name).stat().st_size > 0, name
