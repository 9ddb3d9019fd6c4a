"""diffsynth.fantasy_world.data.synthetic: exact geometry, reproducible bytes, working CLI."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch

from conftest import REPO_ROOT, SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_SCENES, SYNTHETIC_SEED, SYNTHETIC_WIDTH
from diffsynth.fantasy_world.geometry.camera import intrinsics_to_matrix
from diffsynth.fantasy_world.data.camera_files import read_camera_file
from diffsynth.fantasy_world.data.synthetic import (
    HORIZONTAL_FOV_RANGE_DEGREES,
    MAX_TRANSLATION,
    ROOM_CAMERA_REGION,
    ROOM_FAMILY,
    Box,
    Quad,
    Scene,
    Sphere,
    Texture,
    decorrelated_camera_path,
    free_camera_path,
    generate_dataset,
    mirror_clip,
    render_clip,
    render_frame,
    reverse_clip,
    sample_clip,
)



def file_digests(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def load_scene(folder: Path, row: pandas.Series):
    w2c, intrinsics = read_camera_file(folder / row["camera"])
    depth = np.load(folder / row["depth"]).astype(np.float64)
    points = np.load(folder / row["points"]).astype(np.float64)
    return w2c.double().numpy(), intrinsics.double(), depth, points


def test_metadata_lists_every_scene_file(synthetic_dataset):
    metadata = pandas.read_csv(synthetic_dataset / "metadata.csv")
    assert list(metadata.columns) == ["video", "prompt", "camera", "depth", "points"]
    assert len(metadata) == SYNTHETIC_SCENES
    for _, row in metadata.iterrows():
        for key in ("video", "camera", "depth", "points"):
            assert (synthetic_dataset / row[key]).is_file()
        assert isinstance(row["prompt"], str) and row["prompt"]
        T, H, W = SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH
        assert np.load(synthetic_dataset / row["depth"]).shape == (T, H, W)
        assert np.load(synthetic_dataset / row["points"]).shape == (T, H, W, 3)
        assert np.load(synthetic_dataset / row["points"]).dtype == np.float32


def test_depth_agrees_with_points_and_cameras(synthetic_dataset):
    """Projecting the world points gives z = depth at exactly the pixel centre (j + 0.5, i + 0.5)."""
    metadata = pandas.read_csv(synthetic_dataset / "metadata.csv")
    for _, row in metadata.iterrows():
        w2c, intrinsics, depth, points = load_scene(synthetic_dataset, row)
        T, H, W = depth.shape
        K = intrinsics_to_matrix(intrinsics, H, W).numpy()
        valid = depth > 0
        assert valid.mean() > 0.7, "most pixels must hit geometry"
        assert np.all(points[~valid] == 0)
        scene_scale = depth[valid].mean()

        points_camera = np.einsum("tij,thwj->thwi", w2c[:, :, :3], points) + w2c[:, None, None, :, 3]
        z = points_camera[..., 2]
        u = K[:, None, None, 0, 0] * points_camera[..., 0] / z + K[:, None, None, 0, 2]
        v = K[:, None, None, 1, 1] * points_camera[..., 1] / z + K[:, None, None, 1, 2]
        rows, columns = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        assert np.abs(z - depth)[valid].max() < 1e-4 * scene_scale
        # A pixel offset becomes a world offset of depth / focal: bound it by the same tolerance.
        world_per_pixel = depth / K[:, None, None, 0, 0]
        assert (np.abs(u - (columns + 0.5)) * world_per_pixel)[valid].max() < 1e-4 * scene_scale
        assert (np.abs(v - (rows + 0.5)) * world_per_pixel)[valid].max() < 1e-4 * scene_scale


def test_depth_is_z_depth_not_ray_length():
    """A wall facing the camera at z = 5 has depth 5 at every pixel, although the rays to its corners are longer."""
    texture = Texture("checker", 1.0, np.array([[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]]))
    x_axis, y_axis, _ = np.eye(3)
    wall = Quad(np.array([0.0, 0.0, 5.0]), x_axis, y_axis, 100.0, 100.0, texture)
    ball = Sphere(np.array([0.0, 0.0, 3.0]), 0.5, texture)
    K = np.array([[20.0, 0.0, 12.0], [0.0, 20.0, 8.0], [0.0, 0.0, 1.0]])
    identity = np.eye(3, 4)
    _, depth, points = render_frame(Scene([wall], "wall"), identity, K, 16, 24)
    np.testing.assert_allclose(depth, 5.0, rtol=1e-12)
    np.testing.assert_allclose(points[..., 2], 5.0, rtol=1e-12)
    # The ball occludes the wall (nearest hit wins); its front point, z = 2.5, lies between pixel centres.
    _, depth, _ = render_frame(Scene([wall, ball], "ball"), identity, K, 16, 24)
    assert 2.5 < depth.min() < 2.51 and depth.max() == pytest.approx(5.0)


def test_cameras_translate_and_rotate(synthetic_dataset):
    metadata = pandas.read_csv(synthetic_dataset / "metadata.csv")
    for _, row in metadata.iterrows():
        w2c, _, depth, _ = load_scene(synthetic_dataset, row)
        rotations = w2c[:, :, :3]
        np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rotations.shape), atol=1e-6)
        centres = -np.einsum("tji,tj->ti", rotations, w2c[:, :, 3])
        relative = rotations[-1] @ rotations[0].T
        angle = np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1)))
        assert np.linalg.norm(centres[-1] - centres[0]) > 0.1
        assert angle > 5.0


def test_same_seed_gives_same_bytes_and_other_seed_differs(synthetic_dataset, tmp_path):
    args = (SYNTHETIC_SCENES, SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH)
    generate_dataset(tmp_path / "same", *args, SYNTHETIC_SEED)
    generate_dataset(tmp_path / "other", *args, SYNTHETIC_SEED + 1)
    reference = file_digests(synthetic_dataset)
    assert file_digests(tmp_path / "same") == reference
    other = file_digests(tmp_path / "other")
    assert other.keys() == reference.keys()
    # Every scene file differs (metadata.csv may coincide: prompts only count objects).
    assert all(other[name] != digest for name, digest in reference.items() if name.startswith("scene_"))


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "diffsynth.fantasy_world.synthetic", "--out", str(out),
               "--num-scenes", "1", "--frames", "5", "--height", "16", "--width", "24", "--seed", "3"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    metadata = pandas.read_csv(out / "metadata.csv")
    assert len(metadata) == 1
    assert np.load(out / metadata["depth"][0]).shape == (5, 16, 24)
    w2c, intrinsics = read_camera_file(out / metadata["camera"][0])
    assert w2c.shape == (5, 3, 4)
    # The scene's horizontal fov, square pixels, centred principal point, the same for every frame.
    fx, fy, cx, cy = intrinsics[0].tolist()
    fov = 2 * np.degrees(np.arctan(0.5 / fx))
    assert HORIZONTAL_FOV_RANGE_DEGREES[0] <= fov <= HORIZONTAL_FOV_RANGE_DEGREES[1]
    assert fx * 24 == pytest.approx(fy * 16) and (cx, cy) == (0.5, 0.5)
    assert torch.equal(intrinsics, intrinsics[:1].expand_as(intrinsics))


def test_scenes_draw_different_fields_of_view(synthetic_dataset):
    fovs = {round(float(read_camera_file(path)[1][0, 0]), 6) for path in synthetic_dataset.glob("*_cameras.txt")}
    assert len(fovs) > 1


@pytest.mark.parametrize("height, width", [(15, 24), (16, 0)])
def test_rejects_sizes_video_cannot_hold(tmp_path, height, width):
    with pytest.raises(ValueError, match="even"):
        generate_dataset(tmp_path, 1, 1, height, width, 0)


# ----------------------------------------------------------------------------- decorrelated family, augmentation


def relative_rotation_vector(w2c: np.ndarray, first: int, last: int) -> np.ndarray:
    """Axis * angle (radians) of ``R_last R_first^T``, in the first camera's axes' convention."""
    relative = w2c[last, :, :3] @ w2c[first, :, :3].T
    angle = np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))
    axis = np.array([relative[2, 1] - relative[1, 2], relative[0, 2] - relative[2, 0], relative[1, 0] - relative[0, 1]])
    return axis / max(2 * np.sin(angle), 1e-12) * angle


def test_decorrelated_paths_mix_static_orbit_and_free_clips_with_independent_rotation_and_translation():
    rotations, translations, yaw_shares = [], [], []
    for index in range(400):
        w2c = decorrelated_camera_path(np.random.default_rng((7, index)), 9, ROOM_FAMILY)
        rotation = w2c[:, :, :3]
        np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rotation.shape), atol=1e-9)
        centres = -np.einsum("tji,tj->ti", rotation, w2c[:, :, 3])
        assert ROOM_CAMERA_REGION.contains(centres)
        vector = relative_rotation_vector(w2c, 0, -1)
        rotations.append(np.degrees(np.linalg.norm(vector)))
        translations.append(np.linalg.norm(centres[-1] - centres[0]))
        if rotations[-1] > 5:
            yaw_shares.append(abs(vector[1]) / np.linalg.norm(vector))
    rotations, translations = np.array(rotations), np.array(translations)
    static = (rotations < 1e-6) & (translations < 1e-9)
    assert 0.05 < static.mean() < 0.16
    assert rotations.max() <= 45.0 + 1e-6 and (rotations > 30).mean() > 0.15
    # Orbits (the only clips moving further than a free clip can) are at most a quarter of the mix.
    orbits = translations > MAX_TRANSLATION + 1e-9
    assert 0.05 < orbits.mean() < 0.25
    assert np.median(yaw_shares) > 0.85 and min(yaw_shares) < 0.8  # mostly yaw, not only yaw


def test_free_paths_draw_rotation_and_translation_independently():
    rotations, translations = [], []
    for index in range(300):
        w2c = free_camera_path(np.random.default_rng((9, index)), 5, ROOM_CAMERA_REGION)
        centres = -np.einsum("tji,tj->ti", w2c[:, :, :3], w2c[:, :, 3])
        rotations.append(np.linalg.norm(relative_rotation_vector(w2c, 0, -1)))
        translations.append(np.linalg.norm(centres[-1] - centres[0]))
    assert abs(np.corrcoef(rotations, translations)[0, 1]) < 0.15
    assert min(translations) < 0.1 and max(translations) > 1.0


def test_decorrelated_paths_turn_both_ways_from_varied_initial_views():
    yaws, headings = [], []
    for index in range(200):
        w2c = decorrelated_camera_path(np.random.default_rng((8, index)), 5, ROOM_FAMILY)
        yaws.append(relative_rotation_vector(w2c, 0, -1)[1])
        forward = w2c[0, 2, :3]
        headings.append(np.arctan2(forward[2], forward[0]))
    yaws = np.array(yaws)
    assert 0.3 < (yaws > 0).mean() < 0.7
    assert np.histogram(headings, bins=8, range=(-np.pi, np.pi))[0].min() > 5


def mirrored_scene(scene: Scene) -> Scene:
    """The scene reflected by x -> -x (exact for quads, spheres and boxes: a box's yaw changes sign)."""
    flip = np.array([-1.0, 1.0, 1.0])
    primitives = []
    for primitive in scene.primitives:
        if isinstance(primitive, Quad):
            primitives.append(Quad(primitive.centre * flip, primitive.axis_u * flip, primitive.axis_v * flip,
                                   primitive.half_u, primitive.half_v, primitive.texture))
        elif isinstance(primitive, Sphere):
            primitives.append(Sphere(primitive.centre * flip, primitive.radius, primitive.texture))
        else:
            primitives.append(Box(primitive.centre * flip, primitive.half_size, -primitive.yaw, primitive.texture))
    return Scene(primitives, scene.prompt)


@pytest.fixture(scope="module")
def room_clip():
    rng = np.random.default_rng(11)
    scene, clip = sample_clip(rng, ROOM_FAMILY, "decorrelated", 5, 16, 24)
    intrinsics = clip.intrinsics.copy()
    intrinsics[:, 2] = 0.4  # an off-centre principal point: the mirror must move it
    return scene, render_clip(scene, clip.w2c, intrinsics, 16, 24)


def test_mirror_labels_are_those_of_the_mirrored_world(room_clip):
    """Rendering the reflected scene with the mirrored cameras gives the mirrored depth and points exactly."""
    scene, clip = room_clip
    mirrored = mirror_clip(clip)
    assert np.array_equal(mirrored.rgb, clip.rgb[:, :, ::-1])
    np.testing.assert_allclose(np.linalg.det(mirrored.w2c[:, :, :3]), 1.0)
    truth = render_clip(mirrored_scene(scene), mirrored.w2c, mirrored.intrinsics, 16, 24)
    np.testing.assert_allclose(mirrored.depth, truth.depth, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mirrored.points, truth.points, rtol=1e-9, atol=1e-9)
    # Yaw and roll of the motion change sign, pitch does not; the angle is kept.
    original, flipped = relative_rotation_vector(clip.w2c, 0, -1), relative_rotation_vector(mirrored.w2c, 0, -1)
    np.testing.assert_allclose(flipped, original * np.array([1.0, -1.0, -1.0]), atol=1e-9)


def test_time_reversal_labels_are_those_of_the_reversed_path(room_clip):
    scene, clip = room_clip
    reversed_clip = reverse_clip(clip)
    truth = render_clip(scene, clip.w2c[::-1].copy(), clip.intrinsics[::-1].copy(), 16, 24)
    for key in ("rgb", "depth", "points", "w2c", "intrinsics"):
        assert np.array_equal(getattr(reversed_clip, key), getattr(truth, key)), key
    # The motion's rotation is inverted: R_0 R_last^T in place of R_last R_0^T.
    np.testing.assert_allclose(relative_rotation_vector(reversed_clip.w2c, 0, -1),
                               -relative_rotation_vector(clip.w2c, 0, -1), atol=1e-9)


def test_augmented_dataset_files_are_geometrically_consistent(tmp_path):
    """Every written copy (mirrored, reversed, both) passes the projection check of the originals."""
    generate_dataset(tmp_path, 2, 5, 16, 24, 4, "decorrelated", ("mirror", "reverse"))
    metadata = pandas.read_csv(tmp_path / "metadata.csv")
    assert [name.split(".")[0] for name in metadata["video"][:4]] == [
        "scene_000", "scene_000_mirror", "scene_000_reverse", "scene_000_mirror_reverse"]
    for _, row in metadata.iterrows():
        w2c, intrinsics, depth, points = load_scene(tmp_path, row)
        T, H, W = depth.shape
        K = intrinsics_to_matrix(intrinsics, H, W).numpy()
        valid = depth > 0
        camera_points = np.einsum("tij,thwj->thwi", w2c[:, :, :3], points) + w2c[:, None, None, :, 3]
        u = K[:, None, None, 0, 0] * camera_points[..., 0] / camera_points[..., 2] + K[:, None, None, 0, 2]
        columns = np.broadcast_to(np.arange(W) + 0.5, depth.shape)
        assert np.abs(camera_points[..., 2] - depth)[valid].max() < 1e-3
        assert np.abs(u - columns)[valid].max() < 1e-2


def test_unknown_trajectory_or_augmentation_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="trajectory"):
        generate_dataset(tmp_path, 1, 1, 16, 16, 0, trajectory="spiral")
    with pytest.raises(ValueError, match="augmentation"):
        generate_dataset(tmp_path, 1, 1, 16, 16, 0, augmentations=("rotate",))
