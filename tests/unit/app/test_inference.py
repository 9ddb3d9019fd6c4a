"""FantasyWorld inference: WanVideoPipeline geometry outputs, camera input, checkpoints, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from diffsynth.fantasy_world.geometry.camera import (
    intrinsics_to_matrix,
    quaternion_to_rotation_matrix,
    relative_to_first_frame,
)
from diffsynth.fantasy_world.data.camera_files import read_camera_file, write_camera_file
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.app.inference import OUTPUT_FILES, camera_condition_from_file, save_inference_outputs
from diffsynth.fantasy_world.tiny.pipeline import build_tiny_pipeline
from diffsynth.fantasy_world.model.noise import final_geometry_sigma, final_geometry_timestep
from diffsynth.fantasy_world.data.visualize import read_ply
from diffsynth.fantasy_world.model.weights import (
    CONFIG_KEY,
    read_fantasy_world_file,
    save_fantasy_world_weights,
    save_safetensors_atomic,
)

from conftest import REPO_ROOT

CLI = REPO_ROOT / "examples" / "wanvideo" / "model_inference" / "fantasy_world_inference.py"
# Smallest valid run: 32x32 pixels = 4x4 latents = 2x2 patches, 5 frames = 2 latent frames.
HEIGHT, WIDTH, FRAMES, STEPS = 32, 32, 5, 3
RUN = dict(prompt="a room", negative_prompt="blurry", seed=0, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
           num_inference_steps=STEPS, cfg_scale=5.0, progress_bar_cmd=lambda steps: steps)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def orbit_cameras(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A camera turning about the vertical axis while it slides sideways: w2c ``[T, 3, 4]``, normalised intrinsics ``[T, 4]``."""
    angles = torch.linspace(0.0, 0.4, num_frames)
    axis = torch.tensor([0.0, 1.0, 0.0])
    quaternions = torch.cat([axis * torch.sin(angles / 2)[:, None], torch.cos(angles / 2)[:, None]], dim=1)
    translations = torch.stack([0.3 * angles, torch.zeros_like(angles), 0.1 * angles], dim=1)
    w2c = torch.cat([quaternion_to_rotation_matrix(quaternions), translations[:, :, None]], dim=2)
    intrinsics = torch.tensor([0.9, 0.9, 0.5, 0.5]).repeat(num_frames, 1)
    return w2c, intrinsics


class CallCounter:
    """Wraps a module's forward and counts its calls."""

    def __init__(self, monkeypatch, module):
        self.calls = 0
        original = module.forward

        def forward(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)


def count_heads(monkeypatch, pipe) -> dict[str, CallCounter]:
    branch = pipe.dit.fantasy_world
    return {name: CallCounter(monkeypatch, getattr(branch, f"{name}_head")) for name in ("depth", "points", "camera")}


def record_model_calls(monkeypatch, pipe) -> list[bool]:
    """The return_geometry flag of every model_fn call, in order (conditional pass first in each step)."""
    flags = []
    original = pipe.model_fn

    def model_fn(**kwargs):
        flags.append(kwargs.get("return_geometry", False))
        return original(**kwargs)

    monkeypatch.setattr(pipe, "model_fn", model_fn)
    return flags


# ----------------------------------------------------------------------------- pipeline outputs


def test_pipeline_returns_video_and_geometry_of_the_tiny_configuration(pipe):
    video, geometry = pipe(**RUN, return_geometry=True)
    assert len(video) == FRAMES and video[0].size == (WIDTH, HEIGHT)
    # Dense heads at the latent resolution (H/8), one map per video frame.
    expected = {
        "depth": (FRAMES, 1, 4, 4), "depth_conf": (FRAMES, 1, 4, 4), "points": (FRAMES, 3, 4, 4),
        "points_conf": (FRAMES, 1, 4, 4), "camera": (FRAMES, 9), "w2c": (FRAMES, 3, 4), "intrinsics": (FRAMES, 3, 3),
    }
    assert {name: tuple(geometry[name].shape) for name in expected} == expected
    for name in expected:
        assert geometry[name].dtype == torch.float32 and geometry[name].device.type == "cpu"
        assert torch.isfinite(geometry[name]).all()
    assert geometry["step"] == STEPS and "by_step" not in geometry  # the final pass
    assert (geometry["depth"] > 0).all() and (geometry["depth_conf"] >= 1).all() and (geometry["points_conf"] >= 1).all()
    # Cameras decoded from the 9-d encoding: proper rotations, pixel intrinsics centred on the video.
    rotations = geometry["w2c"][:, :, :3]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(FRAMES, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(FRAMES), atol=1e-5)
    assert torch.allclose(geometry["w2c"][:, :, 3], geometry["camera"][:, :3])
    assert torch.allclose(geometry["intrinsics"][:, 0, 2], torch.full((FRAMES,), WIDTH / 2))
    assert torch.allclose(geometry["intrinsics"][:, 1, 2], torch.full((FRAMES,), HEIGHT / 2))
    fov_h = 2 * torch.atan(HEIGHT / 2 / geometry["intrinsics"][:, 1, 1])
    assert torch.allclose(fov_h, geometry["camera"][:, 7], atol=1e-5)


def test_default_geometry_is_one_final_pass_on_the_final_latents(pipe, monkeypatch):
    heads = count_heads(monkeypatch, pipe)
    calls = []
    original = pipe.model_fn

    def model_fn(**kwargs):
        calls.append((kwargs.get("return_geometry", False), float(kwargs["timestep"]), kwargs["latents"].clone()))
        return original(**kwargs)

    decoded = []
    original_decode = pipe.vae.decode
    monkeypatch.setattr(pipe, "model_fn", model_fn)
    monkeypatch.setattr(pipe.vae, "decode", lambda latents, *a, **k: decoded.append(latents.clone()) or original_decode(latents, *a, **k))
    pipe(**RUN, return_geometry=True)
    assert {name: counter.calls for name, counter in heads.items()} == {"depth": 1, "points": 1, "camera": 1}
    # Two passes per denoising step without heads, then one conditional pass with them ...
    assert [flag for flag, _, _ in calls] == [False, False] * STEPS + [True]
    # ... on the latents that are decoded into the video, at the smallest noise level of training.
    assert calls[-1][1] == pytest.approx(final_geometry_timestep()) and final_geometry_sigma() < 0.01
    assert torch.equal(calls[-1][2], decoded[0])


def test_geometry_steps_choose_where_the_heads_run(pipe, monkeypatch):
    heads = count_heads(monkeypatch, pipe)
    flags = record_model_calls(monkeypatch, pipe)
    video, geometry = pipe(**RUN, return_geometry=True, geometry_steps=[0, -1])
    assert heads["depth"].calls == 2 and heads["camera"].calls == 2
    assert flags == [True, False] + [False, False] * (STEPS - 2) + [True, False]  # no final pass
    assert sorted(geometry["by_step"]) == [0, STEPS - 1] and geometry["step"] == STEPS - 1
    assert torch.equal(geometry["depth"], geometry["by_step"][STEPS - 1]["depth"])
    assert not torch.equal(geometry["by_step"][0]["depth"], geometry["depth"])  # another step, another input
    flags.clear()
    video, geometry = pipe(**RUN, return_geometry=True, geometry_steps=["final", -1])
    assert flags == [False, False] * (STEPS - 1) + [True, False, True]
    assert sorted(geometry["by_step"]) == [STEPS - 1, STEPS] and geometry["step"] == STEPS


def test_without_return_geometry_the_pipeline_is_upstream(pipe, monkeypatch):
    heads = count_heads(monkeypatch, pipe)
    video = pipe(**RUN)
    assert isinstance(video, list) and len(video) == FRAMES
    assert all(counter.calls == 0 for counter in heads.values())
    with pytest.raises(ValueError, match="geometry_steps needs return_geometry"):
        pipe(**RUN, geometry_steps=[-1])


def test_geometry_requests_that_would_be_wrong_are_refused(pipe):
    with pytest.raises(ValueError, match="cfg_merge"):
        pipe(**RUN, cfg_merge=True, return_geometry=True)
    with pytest.raises(ValueError, match=r"geometry_steps must be .*\[-3, 2\]"):
        pipe(**RUN, return_geometry=True, geometry_steps=[STEPS])
    plain = build_tiny_pipeline()
    plain.dit = build_dit("tiny")
    with pytest.raises(ValueError, match="FantasyWorld mode"):
        plain(**RUN, return_geometry=True)
    with pytest.raises(ValueError, match="camera adapter"):
        plain(**RUN, fantasy_world_camera=torch.zeros(1, 24, 2, 4, 4))


# ----------------------------------------------------------------------------- camera input


def test_camera_file_becomes_a_plucker_condition_at_the_latent_grid(tmp_path):
    w2c, intrinsics = orbit_cameras(FRAMES + 3)
    path = tmp_path / "cameras.txt"
    write_camera_file(path, w2c, intrinsics, url="https://www.youtube.com/watch?v=example")
    condition, used_w2c, used_intrinsics = camera_condition_from_file(path, FRAMES, HEIGHT, WIDTH)
    assert condition.shape == (1, 24, 2, HEIGHT // 8, WIDTH // 8) and condition.dtype == torch.float32
    assert torch.allclose(used_w2c, relative_to_first_frame(w2c[:FRAMES]), atol=1e-6)
    assert torch.allclose(used_intrinsics, intrinsics[:FRAMES])
    # First camera is the origin after relative_to_first_frame: moments (channels 3-5) vanish there.
    assert condition[0, 3:6, 0].abs().max() < 1e-6
    # Unit ray directions in channels 0-2 of every packed frame.
    directions = condition[0].reshape(4, 6, 2, HEIGHT // 8, WIDTH // 8)[:, :3]
    assert torch.allclose(directions.norm(dim=1), torch.ones(()), atol=1e-5)
    # Principal point at the image centre stays at the latent grid's centre (continuous scaling):
    # the first camera's rays are mirror-symmetric about it.
    first = directions[0, :, 0]  # [3, h, w]
    assert torch.allclose(first[0], -first[0].flip(-1), atol=1e-6) and torch.allclose(first[1], -first[1].flip(-2), atol=1e-6)
    pose, _, _ = camera_condition_from_file(path, FRAMES, HEIGHT, WIDTH, kind="pose")
    assert pose.shape == (1, FRAMES, 9)
    with pytest.raises(ValueError, match="holds 8 cameras; the video needs 9"):
        camera_condition_from_file(path, 9, HEIGHT, WIDTH)


def test_camera_condition_reaches_both_passes_and_changes_the_video(pipe, tmp_path, monkeypatch):
    w2c, intrinsics = orbit_cameras(FRAMES)
    path = tmp_path / "cameras.txt"
    write_camera_file(path, w2c, intrinsics)
    condition, _, _ = camera_condition_from_file(path, FRAMES, HEIGHT, WIDTH)
    conditioning = pipe.dit.fantasy_world.camera_conditioning
    # Open the zero-initialised adapters (on a copy of their weights) so the camera can change the video.
    generator = torch.Generator().manual_seed(3)
    for name, parameter in conditioning.named_parameters():
        if "shift" in name:
            monkeypatch.setattr(parameter, "data", 0.5 * torch.randn(parameter.shape, generator=generator))
    without_camera = pipe(**RUN, output_type="floatpoint")
    encoder = CallCounter(monkeypatch, conditioning.encoder)
    with_camera = pipe(**RUN, output_type="floatpoint", fantasy_world_camera=condition)
    assert encoder.calls == 2 * STEPS  # conditional and guidance pass of every step
    assert not torch.allclose(with_camera, without_camera)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A fantasy_world.safetensors of the tiny configuration (freshly initialised branch)."""
    dit = build_dit("tiny", seed=0)
    dit.enable_fantasy_world_mode()
    path = tmp_path_factory.mktemp("checkpoint") / "fantasy_world.safetensors"
    save_fantasy_world_weights(dit, path)
    return path


def test_checkpoint_loads_into_the_tiny_pipeline(checkpoint):
    tensors, _ = read_fantasy_world_file(checkpoint)
    loaded = build_tiny_pipeline(checkpoint).dit.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items())


def rewrite_checkpoint(source: Path, target: Path, change) -> Path:
    tensors, config = read_fantasy_world_file(source)
    change(tensors)
    save_safetensors_atomic(tensors, target, {CONFIG_KEY: json.dumps(config)})
    return target


def test_checkpoint_with_wrong_keys_names_them(checkpoint, tmp_path):
    def rename(tensors):
        tensors["fantasy_world.camera_head.renamed"] = tensors.pop("fantasy_world.camera_token")

    bad = rewrite_checkpoint(checkpoint, tmp_path / "renamed.safetensors", rename)
    with pytest.raises(ValueError, match=r"missing keys: fantasy_world\.camera_token.*unexpected keys: fantasy_world\.camera_head\.renamed"):
        build_tiny_pipeline(bad)


def test_checkpoint_with_wrong_shapes_names_them(checkpoint, tmp_path):
    def widen(tensors):
        tensors["fantasy_world.geo_projector.bias"] = torch.zeros(65)

    bad = rewrite_checkpoint(checkpoint, tmp_path / "widened.safetensors", widen)
    with pytest.raises(ValueError, match=r"shape mismatches: fantasy_world\.geo_projector\.bias \(checkpoint \(65,\), model \(64,\)\)"):
        build_tiny_pipeline(bad)


# ----------------------------------------------------------------------------- outputs


def test_cli_tokenizer_path_reaches_from_pretrained(checkpoint, tmp_path, monkeypatch):
    """Local --model_paths and --tokenizer_path: from_pretrained gets both as paths, so nothing is downloaded.
    The pipeline it returns is the weight-free tiny one, with a plain DiT as from_pretrained gives."""
    import runpy

    from diffsynth.pipelines.wan_video import WanVideoPipeline

    requested = {}

    def fake_from_pretrained(**kwargs):
        requested.update(kwargs)
        pipe = build_tiny_pipeline()
        pipe.dit = build_dit("tiny")
        return pipe

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    tokenizer = tmp_path / "umt5-xxl"
    tokenizer.mkdir()
    runpy.run_path(str(CLI))["main"]([
        "--model_source", "pretrained", "--model_paths", '["dit.safetensors"]', "--tokenizer_path", str(tokenizer),
        "--fantasy_world_checkpoint", str(checkpoint), "--height", "32", "--width", "32", "--num_frames", "5",
        "--num_inference_steps", "1", "--device", "cpu", "--torch_dtype", "float32", "--output_dir", str(tmp_path / "out"),
    ])
    assert [c.path for c in requested["model_configs"]] == ["dit.safetensors"]
    assert requested["tokenizer_config"].path == str(tokenizer) and requested["tokenizer_config"].model_id is None
    assert (tmp_path / "out" / OUTPUT_FILES["video"]).is_file()


def test_saved_cameras_round_trip(pipe, tmp_path):
    video, geometry = pipe(**RUN, return_geometry=True)
    frames = np.stack([np.asarray(frame) for frame in video])
    paths = save_inference_outputs(tmp_path, frames, geometry, max_points=50, confidence_percentile=0.0)
    assert set(paths) == set(OUTPUT_FILES) and all(path.is_file() for path in paths.values())
    w2c, intrinsics = read_camera_file(paths["cameras"])
    assert torch.allclose(w2c, geometry["w2c"], atol=1e-6)
    assert torch.allclose(intrinsics_to_matrix(intrinsics, HEIGHT, WIDTH), geometry["intrinsics"], rtol=1e-6)
    points, colours = read_ply(paths["point_cloud"])
    assert len(points) == 50 and colours.dtype == np.uint8


def test_cli_writes_every_file(checkpoint, tmp_path):
    w2c, intrinsics = orbit_cameras(9)
    camera = tmp_path / "input_cameras.txt"
    write_camera_file(camera, w2c, intrinsics)
    output_dir = tmp_path / "out"
    command = [
        sys.executable, str(CLI), "--model_source", "tiny", "--fantasy_world_checkpoint", str(checkpoint),
        "--camera", str(camera), "--height", "64", "--width", "64", "--num_frames", "9",
        "--num_inference_steps", "2", "--max_points", "300", "--confidence_threshold", "10",
        "--output_dir", str(output_dir), "--device", "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in OUTPUT_FILES.values():
        assert str(output_dir / name) in result.stdout  # says where each file went
        assert (output_dir / name).stat().st_size > 0
    assert len(imageio.mimread(output_dir / "video.mp4")) == 9
    depth_frames = imageio.mimread(output_dir / "depth.mp4")
    assert len(depth_frames) == 9 and depth_frames[0].shape == (64, 64, 3)
    points, _ = read_ply(output_dir / "points.ply")
    # 9 frames x 8x8 points, the lowest 10% by confidence left out, then capped at 300.
    assert len(points) == 300 < math.ceil(0.9 * 9 * 64)
    predicted_w2c, _ = read_camera_file(output_dir / "cameras.txt")
    assert predicted_w2c.shape == (9, 3, 4)


def test_camera_file_that_would_make_the_condition_non_finite_is_refused(tmp_path):
    """fx = fy = 0 used to give an all-black video and NaN cameras, and the CLI exited 0."""
    path = tmp_path / "cameras.txt"
    w2c, intrinsics = orbit_cameras(FRAMES)
    intrinsics[2, :2] = 0.0
    write_camera_file(path, w2c, intrinsics)
    with pytest.raises(ValueError, match=r"cameras\.txt, line 3: focal lengths must be > 0, got fx=0, fy=0"):
        camera_condition_from_file(path, FRAMES, HEIGHT, WIDTH)
    # Every line valid, but the first camera so far away that the poses relative to it overflow float32.
    w2c, intrinsics = orbit_cameras(FRAMES)
    w2c[0, :, 3] = 3e38
    write_camera_file(path, w2c, intrinsics)
    for kind in ("plucker", "pose"):
        with pytest.raises(ValueError, match=rf"cameras\.txt: the cameras give a non-finite {kind} condition"):
            camera_condition_from_file(path, FRAMES, HEIGHT, WIDTH, kind=kind)
