"""diffsynth.fantasy_world.data.visualize: colour maps, PLY files, camera-path and depth pictures."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.fantasy_world.geometry.camera import quaternion_to_rotation_matrix
from diffsynth.fantasy_world.data.visualize import (
    PREDICTED_COLOUR,
    TRUE_COLOUR,
    VIRIDIS_STOPS,
    apply_colormap,
    depth_to_colormap,
    plot_camera_path,
    point_cloud_from_geometry,
    read_ply,
    save_frames_depth_png,
    write_ply,
)


def random_cloud(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(count, 3)).astype(np.float32)
    colours = rng.integers(0, 256, size=(count, 3), dtype=np.uint8)
    confidence = rng.uniform(1.0, 5.0, size=count)
    return points, colours, confidence


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


# ----------------------------------------------------------------------------- PLY


def test_ply_is_binary_little_endian_and_reads_back_exactly(tmp_path):
    points, colours, _ = random_cloud(100)
    path = tmp_path / "cloud.ply"
    assert write_ply(path, torch.from_numpy(points), colours) == 100
    data = path.read_bytes()
    header = data[: data.index(b"end_header\n") + len(b"end_header\n")].decode("ascii").splitlines()
    assert header == [
        "ply", "format binary_little_endian 1.0", "element vertex 100",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue", "end_header",
    ]
    assert len(data) - len("\n".join(header)) - 1 == 100 * 15  # 3 float32 + 3 uint8 per vertex
    read_points, read_colours = read_ply(path)
    assert read_points.dtype == np.float32 and read_colours.dtype == np.uint8
    np.testing.assert_array_equal(read_points, points)
    np.testing.assert_array_equal(read_colours, colours)
    # Little-endian float32 on disk, whatever the machine.
    first_x = np.frombuffer(data[len("\n".join(header)) + 1:][:4], dtype="<f4")[0]
    assert first_x == points[0, 0]


def test_ply_confidence_filter_and_seeded_subsampling(tmp_path):
    points, colours, confidence = random_cloud(1000)
    points[5] = np.nan  # non-finite points never reach the file
    threshold = 3.0
    expected = (confidence >= threshold) & np.isfinite(points).all(axis=1)
    count = write_ply(tmp_path / "filtered.ply", points, colours, confidence, min_confidence=threshold)
    read_points, read_colours = read_ply(tmp_path / "filtered.ply")
    assert count == len(read_points) == expected.sum()
    np.testing.assert_array_equal(read_points, points[expected])
    np.testing.assert_array_equal(read_colours, colours[expected])

    def subset(seed):
        write_ply(tmp_path / f"sub{seed}.ply", points, colours, confidence, min_confidence=threshold, max_points=50, seed=seed)
        return read_ply(tmp_path / f"sub{seed}.ply")[0]

    first, again, other = subset(0), subset(0), subset(1)
    assert len(first) == 50
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # A subset of the filtered points, in their original order.
    kept = points[expected]
    rows = [int(np.flatnonzero((kept == row).all(axis=1))[0]) for row in first]
    assert rows == sorted(rows)


def test_ply_rejects_bad_inputs_and_files(tmp_path):
    points, colours, confidence = random_cloud(10)
    with pytest.raises(ValueError, match="uint8"):
        write_ply(tmp_path / "a.ply", points, colours.astype(np.float32))
    with pytest.raises(ValueError, match="needs the per-point confidence"):
        write_ply(tmp_path / "a.ply", points, colours, min_confidence=1.0)
    path = tmp_path / "cut.ply"
    write_ply(path, points, colours)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="10 vertices"):
        read_ply(path)


def test_point_cloud_from_geometry_colours_points_with_their_frame_pixels():
    frames, height, width = 2, 3, 4
    points = torch.arange(frames * 3 * height * width, dtype=torch.float32).reshape(frames, 3, height, width)
    confidence = torch.rand(frames, 1, height, width) + 1
    # Video frames at twice the resolution, each 2x2 block one colour: area averaging recovers it.
    block_colours = np.random.default_rng(0).integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    video = block_colours.repeat(2, axis=1).repeat(2, axis=2)
    cloud, colours, cloud_confidence = point_cloud_from_geometry(points, confidence, video)
    assert cloud.shape == (frames * height * width, 3) and colours.shape == cloud.shape
    np.testing.assert_array_equal(cloud[5], points[0, :, 1, 1].numpy())  # row-major over (frame, y, x)
    np.testing.assert_array_equal(colours, block_colours.reshape(-1, 3))
    np.testing.assert_array_equal(cloud_confidence, confidence.reshape(-1).numpy())


# ----------------------------------------------------------------------------- colour maps


def test_colormap_endpoints_are_viridis():
    np.testing.assert_array_equal(apply_colormap(np.array([0.0, 1.0, -3.0, 7.0])), VIRIDIS_STOPS[[0, -1, 0, -1]].astype(np.uint8))


def test_depth_colormap_near_is_bright_invalid_is_black_and_outliers_do_not_wash_it_out():
    depth = np.tile(np.linspace(1.0, 10.0, 16), (3, 4, 1))  # [T=3, H=4, W=16], depth grows to the right
    depth[0, 0, 0] = 0.0  # invalid
    depth[1, 0, 0] = np.nan  # invalid
    depth[2, 0, 1] = 1e6  # a far outlier
    colours = depth_to_colormap(torch.from_numpy(depth))
    assert colours.shape == (3, 4, 16, 3) and colours.dtype == np.uint8
    assert (colours[0, 0, 0] == 0).all() and (colours[1, 0, 0] == 0).all()
    row = luminance(colours[1, 1])
    assert np.all(np.diff(row) < 0)  # farther is darker, strictly
    # Percentile range: the outlier does not compress the rest into one colour.
    assert luminance(colours[1, 1, :1]) - luminance(colours[1, 1, -1:]) > 100
    # One normalisation per video: the same depth has the same colour in every frame.
    np.testing.assert_array_equal(colours[1, 2], colours[2, 2])


def test_depth_colormap_of_constant_or_empty_depth_is_well_defined():
    constant = depth_to_colormap(np.full((2, 3, 3), 4.0))
    assert (constant == constant[0, 0, 0]).all() and constant[0, 0, 0].any()
    assert (depth_to_colormap(np.zeros((2, 3, 3))) == 0).all()


# ----------------------------------------------------------------------------- pictures


def camera_path(count: int, shift: float = 0.0) -> torch.Tensor:
    angles = torch.linspace(0, 1.0, count)
    quaternions = torch.stack([torch.zeros_like(angles), torch.sin(angles / 2), torch.zeros_like(angles), torch.cos(angles / 2)], dim=1)
    translations = torch.stack([angles + shift, torch.zeros_like(angles), 0.5 * angles], dim=1)
    return torch.cat([quaternion_to_rotation_matrix(quaternions), translations[:, :, None]], dim=2)


def colour_pixels(image: Image.Image, colour) -> int:
    return int((np.asarray(image) == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def test_camera_path_plot_draws_predicted_and_true_paths(tmp_path):
    path = tmp_path / "path.png"
    plot_camera_path(path, camera_path(9), camera_path(9, shift=0.3).numpy(), size=256)
    image = Image.open(path).convert("RGB")
    assert image.size == (256, 256)
    assert colour_pixels(image, PREDICTED_COLOUR) > 50 and colour_pixels(image, TRUE_COLOUR) > 50
    only_predicted = tmp_path / "predicted.png"
    plot_camera_path(only_predicted, camera_path(9))
    assert colour_pixels(Image.open(only_predicted).convert("RGB"), TRUE_COLOUR) == 0
    static = tmp_path / "static.png"
    plot_camera_path(static, camera_path(1))  # one camera: no extent, still a picture
    assert colour_pixels(Image.open(static).convert("RGB"), PREDICTED_COLOUR) > 0


def test_frames_depth_strip_layout(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 16, 24, 3), dtype=np.uint8)
    depth = np.random.default_rng(1).uniform(1, 5, size=(9, 2, 3))
    path = tmp_path / "strip.png"
    save_frames_depth_png(path, frames, torch.from_numpy(depth), depth * 2, max_columns=5, min_tile_height=32)
    image = np.asarray(Image.open(path).convert("RGB"))
    # 3 rows of 32-pixel tiles (16 enlarged twice), 5 columns of 48 pixels, 2-pixel gaps, 72-pixel labels.
    assert image.shape == (3 * (32 + 2), 72 + 5 * (48 + 2), 3)
    # The first tile is the first frame, enlarged by nearest neighbour.
    np.testing.assert_array_equal(image[:32:2, 72:72 + 48:2], frames[0])
    two_rows = tmp_path / "two_rows.png"
    save_frames_depth_png(two_rows, frames, depth, min_tile_height=16)
    assert Image.open(two_rows).size[1] == 2 * (16 + 2)
    with pytest.raises(ValueError, match="predicted row has 8 frames, the video has 9"):
        save_frames_depth_png(path, frames, depth[:8])
