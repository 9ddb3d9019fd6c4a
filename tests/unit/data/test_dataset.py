"""diffsynth.fantasy_world.data.dataset: upstream's frame sampling, consistent crops, masks, normalisation, bad data."""
import json
import math
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch
from PIL import Image

from diffsynth.core.data.unified_dataset import UnifiedDataset
from conftest import SYNTHETIC_SEED
from diffsynth.fantasy_world.geometry.camera import intrinsics_to_matrix, transform_points
from diffsynth.fantasy_world.data.camera_files import read_camera_file
from diffsynth.fantasy_world.data.dataset import BadSampleError, FantasyWorldDataset, collate_fantasy_world
from diffsynth.fantasy_world.data.synthetic import generate_dataset, random_scene, render_frame

FIRST_SAMPLE, SECOND_SAMPLE = "row 0 (scene_000.mp4)", "row 1 (scene_001.mp4)"


def raw_scene(folder: Path, index: int):
    """Raw files of scene ``index``: depth [T, H, W], points [T, H, W, 3], w2c [T, 3, 4], intrinsics [T, 4]."""
    name = f"scene_{index:03d}"
    w2c, intrinsics = read_camera_file(folder / f"{name}_cameras.txt")
    return np.load(folder / f"{name}_depth.npy"), np.load(folder / f"{name}_points.npy"), w2c, intrinsics


def set_metadata(folder: Path, **columns) -> None:
    """Overwrite columns of ``metadata.csv`` (a list sets one value per row, a scalar all rows)."""
    metadata = pandas.read_csv(folder / "metadata.csv")
    for key, values in columns.items():
        metadata[key] = values
    metadata.to_csv(folder / "metadata.csv", index=False)


def test_sample_keys_shapes_dtypes_and_collate(synthetic_dataset):
    dataset = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=24, width=24, repeat=2)
    assert len(dataset) == 6
    sample = dataset[0]
    T = 9
    expected = {
        "video": ((T, 3, 24, 24), torch.float32), "depth": ((T, 1, 24, 24), torch.float32),
        "points": ((T, 3, 24, 24), torch.float32), "valid": ((T, 1, 24, 24), torch.bool),
        "w2c": ((T, 3, 4), torch.float32), "intrinsics": ((T, 3, 3), torch.float32),
    }
    assert set(sample) == set(expected) | {"prompt", "scale", "sample"}
    for key, (shape, dtype) in expected.items():
        assert sample[key].shape == shape and sample[key].dtype == dtype, key
    assert 0.0 <= sample["video"].min() and sample["video"].max() <= 1.0 and sample["video"].std() > 0.05
    assert isinstance(sample["prompt"], str) and sample["prompt"]
    assert isinstance(sample["scale"], float) and sample["scale"] > 0
    assert sample["sample"] == FIRST_SAMPLE and dataset[3]["sample"] == FIRST_SAMPLE  # repeat wraps around

    batch = collate_fantasy_world([sample, dataset[1]])
    assert batch["video"].shape == (2, T, 3, 24, 24) and batch["valid"].dtype == torch.bool
    assert batch["scale"].shape == (2,) and batch["prompt"][1] == dataset[1]["prompt"]
    assert batch["sample"] == [FIRST_SAMPLE, SECOND_SAMPLE]


def test_frames_and_geometry_follow_upstream_frame_rule(tmp_path):
    """With the opt-in, an 8-frame clip gives 5 frames (largest 4k+1), identical to upstream's video operator, same indices everywhere."""
    generate_dataset(tmp_path, 1, 8, 32, 48, seed=5)
    dataset = FantasyWorldDataset(tmp_path, num_frames=81, height=24, width=24, normalize=False, allow_shorter_clips=True)
    with pytest.warns(UserWarning, match=r"row 0 \(scene_000\.mp4\): video .*scene_000\.mp4 has 8 frames < num_frames 81; using its first 5"):
        sample = dataset[0]
    upstream = UnifiedDataset.default_video_operator(str(tmp_path), height=24, width=24, num_frames=81)("scene_000.mp4")
    assert len(upstream) == 5 and sample["video"].shape[0] == 5
    upstream_frames = torch.from_numpy(np.stack([np.asarray(frame) for frame in upstream])).permute(0, 3, 1, 2)
    assert torch.equal(sample["video"] * 255, upstream_frames.float())
    depth, _, w2c, _ = raw_scene(tmp_path, 0)
    assert torch.equal(sample["w2c"], w2c[:5])
    for t in range(5):  # frame t of the geometry comes from frame t of the raw depth
        assert np.isin(sample["depth"][t].numpy(), depth[t]).all()
    assert FantasyWorldDataset(tmp_path, num_frames=1, height=24, width=24)[0]["video"].shape[0] == 1
    with pytest.raises(ValueError, match="4k\\+1"):
        FantasyWorldDataset(tmp_path, num_frames=8)


# Upstream's cover crop of the 32x48 scenes to 24x24: scale max(24/48, 24/32) = 0.75, resized to 24x36,
# centre crop offset (0, 6). Output pixel (i, j) shows the resized pixel (i, j + 6), whose centre is at the
# normalised position ((j + 6.5) / 36, (i + 0.5) / 24); the geometry pixel containing it is
# row floor((i + 0.5) * 32 / 24), column floor((j + 6.5) * 48 / 36).
CROP_ROWS_24 = (2 * np.arange(24) + 1) * 32 // 48
CROP_COLUMNS_24 = (2 * (np.arange(24) + 6) + 1) * 48 // 72


def back_project(sample, w2c):
    """World points ``[T, H, W, 3]`` (float64) of a sample's depth through its output pixel centres and intrinsics."""
    K = sample["intrinsics"].double().numpy()
    height, width = sample["depth"].shape[-2:]
    rows, columns = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    z = sample["depth"][:, 0].double().numpy()
    points_camera = np.stack([
        (columns - K[:, None, None, 0, 2]) / K[:, None, None, 0, 0] * z,
        (rows - K[:, None, None, 1, 2]) / K[:, None, None, 1, 1] * z,
        z,
    ], axis=-1)
    R, t = w2c[:, :, :3].double().numpy(), w2c[:, :, 3].double().numpy()
    return np.einsum("tji,thwj->thwi", R, points_camera - t[:, None, None, :])


def test_crop_resize_keeps_geometry_consistent(synthetic_dataset):
    """Geometry follows the video's crop through normalised coordinates, and the intrinsics are the video's.

    The ray through an output pixel centre passes within half a source pixel of the centre of the
    geometry pixel sampled there; with a pure crop (no resize) it passes through it exactly.
    """
    dataset = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=24, width=24, normalize=False)
    for index in range(2):
        sample = dataset[index]
        depth, points, w2c, intrinsics = raw_scene(synthetic_dataset, index)
        expected_depth = depth[:, CROP_ROWS_24[:, None], CROP_COLUMNS_24[None, :]]
        expected_points = points[:, CROP_ROWS_24[:, None], CROP_COLUMNS_24[None, :]]
        valid = sample["valid"][:, 0].numpy()
        assert valid.mean() > 0.7
        np.testing.assert_array_equal(sample["depth"][:, 0].numpy(), np.where(valid, expected_depth, 0))
        # The video's intrinsics: normalised values times the resized 24x36 frame, principal point shifted by the crop.
        fx, fy, cx, cy = intrinsics.unbind(-1)
        video_K = torch.zeros(9, 3, 3)
        video_K[:, 0, 0], video_K[:, 1, 1], video_K[:, 0, 2], video_K[:, 1, 2], video_K[:, 2, 2] = fx * 36, fy * 24, cx * 36 - 6, cy * 24, 1
        torch.testing.assert_close(sample["intrinsics"], video_K)

        error = np.linalg.norm(back_project(sample, w2c) - expected_points, axis=-1)
        z = sample["depth"][:, 0].double().numpy()
        source_focal = (fx * 48).double().numpy()[:, None, None]  # square source pixels: fx * 48 == fy * 32
        # Half a source pixel in both directions spans sqrt(0.5) * depth / focal in world units.
        assert (error / (z / source_focal + 1e-12))[valid].max() < math.sqrt(0.5) + 1e-3

    cropped = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=32, width=32, normalize=False)[0]
    depth, points, w2c, _ = raw_scene(synthetic_dataset, 0)
    valid = cropped["valid"][:, 0].numpy()
    np.testing.assert_array_equal(cropped["depth"][:, 0].numpy(), np.where(valid, depth[:, :, 8:40], 0))
    error = np.linalg.norm(back_project(cropped, w2c) - points[:, :, 8:40], axis=-1)
    assert error[valid].max() < 1e-4 * depth[:, :, 8:40][valid].mean()


@pytest.mark.parametrize("height, width", [(24, 24), (20, 44), (40, 64)])
def test_geometry_is_resampled_nearest_neighbour(synthetic_dataset, height, width):
    """Down- and up-sampled depth and points only hold values of the raw files: nothing is blended."""
    sample = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=height, width=width, normalize=False)[2]
    depth, points, _, _ = raw_scene(synthetic_dataset, 2)
    for t in range(9):
        assert np.isin(sample["depth"][t].numpy(), depth[t]).all()
        raw_points = {tuple(point) for point in points[t].reshape(-1, 3).tolist()}
        assert {tuple(point) for point in sample["points"][t].reshape(3, -1).T.tolist()} <= raw_points


def test_invalid_depth_points_and_mask_are_masked(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    depth, points, _, _ = raw_scene(folder, 0)
    corrupted = [(0, 0, 0), (0, 1, 1), (1, 2, 2), (1, 3, 3), (2, 4, 4), (3, 5, 5)]
    assert all(depth[pixel] > 0 for pixel in corrupted), "the corrupted pixels must start valid"
    depth[0, 0, 0], depth[0, 1, 1], depth[1, 2, 2], depth[1, 3, 3] = 0.0, np.nan, np.inf, -1.0
    points[2, 4, 4] = np.nan
    np.save(folder / "scene_000_depth.npy", depth)
    np.save(folder / "scene_000_points.npy", points)
    mask = np.full((9, 32, 48), 255, np.uint8)
    mask[3, 5, 5] = 0
    (folder / "scene_000_mask").mkdir()
    for t, frame in enumerate(mask):
        Image.fromarray(frame).save(folder / "scene_000_mask" / f"{t:05d}.png")
    set_metadata(folder, mask=["scene_000_mask", None, None])

    with np.errstate(invalid="ignore"):
        expected_valid = np.isfinite(depth) & (depth > 0) & np.isfinite(points).all(-1) & (mask != 0)
    # 32x48 output: the crop is the identity, so pixels keep their positions.
    for normalize in (False, True):
        sample = FantasyWorldDataset(folder, num_frames=9, height=32, width=48, normalize=normalize)[0]
        valid = sample["valid"][:, 0]
        np.testing.assert_array_equal(valid.numpy(), expected_valid)
        for pixel in corrupted:
            assert not valid[pixel]
            assert sample["depth"][:, 0][pixel] == 0 and (sample["points"].permute(0, 2, 3, 1)[pixel] == 0).all()
        for key in ("depth", "points", "w2c", "intrinsics", "video"):
            assert torch.isfinite(sample[key]).all(), key


def test_normalize_puts_scene_in_first_camera_with_unit_mean_norm(synthetic_dataset):
    raw = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=24, width=24, normalize=False)[1]
    sample = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=24, width=24)[1]
    torch.testing.assert_close(sample["w2c"][0], torch.eye(3, 4), atol=1e-6, rtol=0)
    valid = sample["valid"][:, 0]
    norms = sample["points"].norm(dim=1)[valid]
    assert abs(norms.mean().item() - 1.0) < 1e-5
    # Same geometry, expressed in the first camera's frame and divided by the scale.
    raw_points = transform_points(raw["w2c"][:1], raw["points"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(sample["points"] * sample["scale"], torch.where(valid[:, None], raw_points, 0.0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sample["depth"] * sample["scale"], raw["depth"], atol=1e-4, rtol=1e-5)
    # Frame 0's camera is the first camera: its points' z is its depth.
    torch.testing.assert_close(sample["points"][0, 2], sample["depth"][0, 0], atol=1e-5, rtol=1e-5)
    assert sample["scale"] == pytest.approx(raw_points.norm(dim=1)[valid].mean().item(), rel=1e-5)


def truncate_depth(folder):
    np.save(folder / "scene_001_depth.npy", np.load(folder / "scene_001_depth.npy")[:-1])


def truncate_points(folder):
    np.save(folder / "scene_001_points.npy", np.load(folder / "scene_001_points.npy")[:-1])


def drop_last_camera_line(folder):
    path = folder / "scene_001_cameras.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def crop_points_spatially(folder):
    np.save(folder / "scene_001_points.npy", np.load(folder / "scene_001_points.npy")[:, :, :-1])


def replace_camera_line(folder, replacement):
    path = folder / "scene_001_cameras.txt"
    lines = path.read_text().splitlines()
    lines[2] = replacement(lines[2])
    path.write_text("\n".join(lines) + "\n")


def write_garbage_video(folder):
    (folder / "scene_001.mp4").write_bytes(np.random.default_rng(0).bytes(4000))


def edit_camera_fields(folder, edit):
    """Apply ``edit(fields)`` to the 19 fields of line 3 of scene 1's camera file."""
    def replacement(line):
        fields = line.split()
        edit(fields)
        return " ".join(fields)
    replace_camera_line(folder, replacement)


def scale_rotation(fields, factor):
    for index in (7, 8, 9, 11, 12, 13, 15, 16, 17):
        fields[index] = repr(float(fields[index]) * factor)


def scale_depth(folder, factor, keep_points):
    np.save(folder / "scene_001_depth.npy", np.load(folder / "scene_001_depth.npy") * np.float32(factor))
    if not keep_points:
        set_metadata(folder, points=["scene_000_points.npy", None, "scene_002_points.npy"])


def ray_length_as_depth(folder):
    """Depth written as the distance to the camera centre instead of z-depth (a common converter bug)."""
    _, points, w2c, _ = raw_scene(folder, 1)
    centres = -np.einsum("tji,tj->ti", w2c[:, :, :3].numpy(), w2c[:, :, 3].numpy())
    depth = np.load(folder / "scene_001_depth.npy")
    distance = np.linalg.norm(points - centres[:, None, None, :], axis=-1)
    np.save(folder / "scene_001_depth.npy", np.where(depth > 0, distance, 0).astype(np.float32))


def truncated_npz_depth(folder):
    np.savez(folder / "scene_001_depth.npz", depth=np.load(folder / "scene_001_depth.npy"))
    data = (folder / "scene_001_depth.npz").read_bytes()
    (folder / "scene_001_depth.npz").write_bytes(data[: len(data) // 2])
    set_metadata(folder, depth=["scene_000_depth.npy", "scene_001_depth.npz", "scene_002_depth.npy"])


BAD_DATA = {
    "missing file": (lambda folder: (folder / "scene_001_depth.npy").unlink(), r"missing depth file .*scene_001_depth\.npy"),
    "depth frame count": (truncate_depth, r"frame-count mismatch: video .*scene_001\.mp4 has 9 frames, depth .*scene_001_depth\.npy has 8"),
    "points frame count": (truncate_points, r"frame-count mismatch: .*points .*scene_001_points\.npy has 8"),
    "camera frame count": (drop_last_camera_line, r"frame-count mismatch: .*camera .*scene_001_cameras\.txt has 8"),
    "shape mismatch": (crop_points_spatially, r"shape mismatch: depth .*scene_001_depth\.npy .*points .*scene_001_points\.npy"),
    "aspect ratio": (
        lambda folder: [np.save(path, np.load(path)[:, :, :40]) for path in folder.glob("scene_001_[dp]*.npy")],
        r"aspect-ratio mismatch: video .*scene_001\.mp4 is 32x48, depth .*scene_001_depth\.npy is 32x40",
    ),
    "unreadable video": (write_garbage_video, r"unreadable video .*scene_001\.mp4"),
    "malformed camera line": (
        lambda folder: replace_camera_line(folder, lambda line: " ".join(line.split()[:-2])),
        r"unreadable camera file .*scene_001_cameras\.txt.*line 3: expected 19 numbers, got 17",
    ),
    "non-finite camera": (
        lambda folder: replace_camera_line(folder, lambda line: line.rsplit(" ", 1)[0] + " nan"),
        r"unreadable camera file .*scene_001_cameras\.txt.*line 3: non-finite",
    ),
    # Issue 12: each of these used to load as silent wrong geometry or escape as a raw error.
    "zero focal length": (
        lambda folder: edit_camera_fields(folder, lambda fields: fields.__setitem__(slice(1, 3), ["0", "0"])),
        r"camera file .*scene_001_cameras\.txt.*line 3: focal lengths must be > 0, got fx=0, fy=0",
    ),
    "principal point outside the image": (
        lambda folder: edit_camera_fields(folder, lambda fields: fields.__setitem__(3, "7.5")),
        r"camera file .*scene_001_cameras\.txt.*line 3: principal point \(cx=7.5",
    ),
    "rotation scaled x3": (
        lambda folder: edit_camera_fields(folder, lambda fields: scale_rotation(fields, 3.0)),
        r"camera file .*scene_001_cameras\.txt.*line 3: the 3x3 block is not a rotation: max \|R R\^T - I\| = 8",
    ),
    "rotation all zeros": (
        lambda folder: edit_camera_fields(folder, lambda fields: scale_rotation(fields, 0.0)),
        r"camera file .*scene_001_cameras\.txt.*line 3: the 3x3 block is not a rotation",
    ),
    "depth x1e30, no points": (
        lambda folder: scale_depth(folder, 1e30, keep_points=False),
        r"cannot normalise the scene of depth .*scene_001_depth\.npy: .*scale .* is inf",
    ),
    "depth x1e30, points given": (
        lambda folder: scale_depth(folder, 1e30, keep_points=True),
        r"points .*scene_001_points\.npy disagree with depth .*scene_001_depth\.npy and camera .*scene_001_cameras\.txt: frame 0",
    ),
    "depth beyond float32": (
        lambda folder: np.save(folder / "scene_001_depth.npy", np.load(folder / "scene_001_depth.npy").astype(np.float64) * 1e40),
        r"unreadable depth file .*scene_001_depth\.npy: .* values beyond the float32 range",
    ),
    "depth as ray length": (
        ray_length_as_depth,
        r"points .*scene_001_points\.npy disagree with depth .*scene_001_depth\.npy .*median distance",
    ),
    "truncated npz depth": (truncated_npz_depth, r"unreadable depth file .*scene_001_depth\.npz: BadZipFile"),
    "string depth": (
        lambda folder: np.save(folder / "scene_001_depth.npy", np.load(folder / "scene_001_depth.npy").astype(str)),
        r"unreadable depth file .*scene_001_depth\.npy: .* holds <U\d+ values; expected real numbers",
    ),
    "non-numeric depth_scale": (
        lambda folder: set_metadata(folder, depth_scale=[None, "abc", None]),
        r"depth_scale 'abc' in metadata .*metadata\.csv is not a finite number > 0",
    ),
}


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("problem", list(BAD_DATA))
def test_bad_data_raises_naming_sample_and_file(synthetic_dataset_copy, problem):
    corrupt, message = BAD_DATA[problem]
    corrupt(synthetic_dataset_copy)
    before = folder_contents(synthetic_dataset_copy)
    dataset = FantasyWorldDataset(synthetic_dataset_copy, num_frames=9, height=24, width=24)
    with pytest.raises(BadSampleError, match=message) as error:
        dataset[1]
    assert error.value.sample == SECOND_SAMPLE and SECOND_SAMPLE in str(error.value)
    assert dataset[0]["sample"] == FIRST_SAMPLE  # the other rows still load
    skipping = FantasyWorldDataset(synthetic_dataset_copy, num_frames=9, height=24, width=24, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample row 1 \(scene_001\.mp4\)"):
        assert skipping[1]["sample"] == "row 2 (scene_002.mp4)"
    assert list(skipping.skipped) == [SECOND_SAMPLE]
    assert folder_contents(synthetic_dataset_copy) == before  # nothing the user wrote is touched


def test_skip_bad_samples_counts_warns_and_raises_when_all_bad(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    write_garbage_video(folder)
    dataset = FantasyWorldDataset(folder, num_frames=9, height=24, width=24, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample row 1 \(scene_001\.mp4\): unreadable video"):
        sample = dataset[1]
    assert sample["sample"] == "row 2 (scene_002.mp4)"
    assert list(dataset.skipped) == [SECOND_SAMPLE] and "unreadable video" in dataset.skipped[SECOND_SAMPLE]

    (folder / "scene_000_depth.npy").unlink()
    (folder / "scene_002_cameras.txt").write_text("not a camera line\n")
    with pytest.warns(UserWarning), pytest.raises(BadSampleError, match="every sample is bad"):
        dataset[0]
    assert len(dataset.skipped) == 3


def write_depth_pngs(folder: Path, depth_scale: float) -> None:
    """Scene 0's depth as a folder of 16-bit PNGs holding depth / depth_scale."""
    depth_folder = folder / "scene_000_depth_png"
    depth_folder.mkdir()
    for t, frame in enumerate(np.load(folder / "scene_000_depth.npy")):
        Image.fromarray(np.round(frame / depth_scale).astype(np.uint16)).save(depth_folder / f"{t:05d}.png")
    set_metadata(folder, depth=["scene_000_depth_png", "scene_001_depth.npy", "scene_002_depth.npy"])


def test_png_depth_folder_with_scale_column_or_argument(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    write_depth_pngs(folder, depth_scale=0.001)
    without_scale = FantasyWorldDataset(folder, num_frames=9, height=24, width=24, normalize=False)
    with pytest.raises(BadSampleError, match=r"scene_000_depth_png.*depth_scale"):
        without_scale[0]
    from_argument = FantasyWorldDataset(folder, num_frames=9, height=24, width=24, normalize=False, depth_png_scale=0.001)
    set_metadata(folder, depth_scale=[0.001, None, None])
    # The column wins over the argument.
    from_column = FantasyWorldDataset(folder, num_frames=9, height=24, width=24, normalize=False, depth_png_scale=123.0)
    depth, _, _, _ = raw_scene(folder, 0)
    expected = depth[:, CROP_ROWS_24[:, None], CROP_COLUMNS_24[None, :]]
    for dataset in (from_argument, from_column):
        png_depth = dataset[0]["depth"][:, 0].numpy()
        assert np.abs(png_depth - expected).max() <= 0.0005 + 1e-6  # half a millimetre of quantisation


def test_npz_files_and_npy_frame_folders(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    reference = FantasyWorldDataset(folder, num_frames=9, height=24, width=24)[0]
    depth, points, _, _ = raw_scene(folder, 0)
    np.savez(folder / "depth.npz", depth=depth, other=np.zeros(3))  # several arrays: the one named "depth"
    np.savez(folder / "points.npz", points)  # a single unnamed array
    (folder / "depth_frames").mkdir()
    for t, frame in enumerate(depth):
        np.save(folder / "depth_frames" / f"{t:05d}.npy", frame)
    for depth_entry, points_entry in (("depth.npz", "points.npz"), ("depth_frames", "scene_000_points.npy")):
        set_metadata(folder, depth=[depth_entry, "scene_001_depth.npy", "scene_002_depth.npy"],
                     points=[points_entry, "scene_001_points.npy", "scene_002_points.npy"])
        sample = FantasyWorldDataset(folder, num_frames=9, height=24, width=24)[0]
        for key in ("depth", "points", "valid", "w2c"):
            assert torch.equal(sample[key], reference[key]), (depth_entry, key)


def test_json_and_jsonl_metadata(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    rows = pandas.read_csv(folder / "metadata.csv").to_dict(orient="records")
    (folder / "meta.json").write_text(json.dumps(rows))
    (folder / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    csv_sample = FantasyWorldDataset(folder, num_frames=5, height=16, width=16)[2]
    for name in ("meta.json", "meta.jsonl"):
        dataset = FantasyWorldDataset(folder, metadata_path=folder / name, num_frames=5, height=16, width=16)
        assert len(dataset) == 3
        sample = dataset[2]
        assert sample["prompt"] == csv_sample["prompt"] and sample["sample"] == csv_sample["sample"]
        assert torch.equal(sample["depth"], csv_sample["depth"])


def test_points_are_derived_from_depth_when_absent(synthetic_dataset_copy):
    folder = synthetic_dataset_copy
    with_points = FantasyWorldDataset(folder, num_frames=9, height=32, width=48, normalize=False)[0]
    set_metadata(folder, points=None)
    derived = FantasyWorldDataset(folder, num_frames=9, height=32, width=48, normalize=False)[0]
    scene_scale = with_points["depth"][with_points["valid"]].mean()
    assert (derived["points"] - with_points["points"]).abs().max() < 1e-5 * scene_scale
    assert torch.equal(derived["valid"], with_points["valid"])


def duplicate_depth_column(folder: Path) -> Path:
    path = folder / "metadata.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",depth"] + [line + ",other_depth.npy" for line in lines[1:]]) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


BAD_METADATA = {
    "zero-byte csv": (lambda folder: write_text(folder / "metadata.csv", ""), r"empty file"),
    "malformed jsonl": (
        lambda folder: write_text(folder / "meta.jsonl", '{"video": "scene_000.mp4"}\n{"video": "scene_001.mp4",\n'),
        r"line 2: Expecting",
    ),
    "json object instead of a list": (
        lambda folder: write_text(folder / "meta.json", json.dumps({"video": "scene_000.mp4", "prompt": "a room"})),
        r"expected a JSON list of objects, got a dict",
    ),
    "json list of strings": (lambda folder: write_text(folder / "meta.json", '["scene_000.mp4"]'), r"row 0 is a str, expected an object"),
    "duplicate csv column": (duplicate_depth_column, r"duplicate column\(s\) \['depth'\]"),
    "duplicate json key": (
        lambda folder: write_text(folder / "meta.json", '[{"video": "scene_000.mp4", "depth": "a.npy", "depth": "b.npy"}]'),
        r"duplicate key\(s\) \['depth'\]",
    ),
    "csv that is not utf-8": (lambda folder: write_text(folder / "metadata.csv", "video,prompt\nscene_000.mp4,caf\xe9\n"), r"codec can't decode"),
}


@pytest.mark.parametrize("problem", list(BAD_METADATA))
def test_bad_metadata_raises_naming_the_metadata_file(synthetic_dataset_copy, problem):
    write, message = BAD_METADATA[problem]
    path = write(synthetic_dataset_copy)
    with pytest.raises(ValueError, match=rf"metadata .*{path.name}: .*{message}"):
        FantasyWorldDataset(synthetic_dataset_copy, metadata_path=path, num_frames=9, height=24, width=24)


def test_missing_metadata_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata file not found: .*nothing\.csv"):
        FantasyWorldDataset(tmp_path, metadata_path=tmp_path / "nothing.csv")


def test_clip_shorter_than_num_frames_is_a_bad_sample_unless_opted_in(tmp_path):
    """A 3-frame clip with num_frames 9 used to give a silent 1-frame sample."""
    generate_dataset(tmp_path, 1, 3, 32, 48, seed=1)
    with pytest.raises(BadSampleError, match=r"row 0 \(scene_000\.mp4\): clip too short: video .*scene_000\.mp4 has 3 frames, num_frames is 9"):
        FantasyWorldDataset(tmp_path, num_frames=9, height=16, width=16)[0]
    opted_in = FantasyWorldDataset(tmp_path, num_frames=9, height=16, width=16, allow_shorter_clips=True)
    with pytest.warns(UserWarning, match=r"scene_000\.mp4 has 3 frames < num_frames 9; using its first 1"):
        assert opted_in[0]["video"].shape[0] == 1


def test_shorter_clips_are_skipped_before_batching(mixed_length_dataset):
    """5- and 9-frame clips with num_frames 9, batch 2, skip_bad_samples: collate only ever sees 9-frame clips."""
    dataset = FantasyWorldDataset(mixed_length_dataset, num_frames=9, height=16, width=16, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample row 0 \(short/scene_000\.mp4\): clip too short"):
        batch = collate_fantasy_world([dataset[0], dataset[1]])
    assert batch["video"].shape[:2] == (2, 9)
    assert batch["sample"] == ["row 1 (long/scene_000.mp4)", "row 1 (long/scene_000.mp4)"]
    assert list(dataset.skipped) == ["row 0 (short/scene_000.mp4)"]


def test_depth_scale_and_png_scale_must_be_positive_numbers(synthetic_dataset_copy):
    with pytest.raises(ValueError, match="depth_png_scale must be a finite number > 0, got 0"):
        FantasyWorldDataset(synthetic_dataset_copy, depth_png_scale=0)
    set_metadata(synthetic_dataset_copy, depth_scale=[-1.0, None, None])
    with pytest.raises(BadSampleError, match=r"row 0 .*depth_scale -1.0 in metadata .*metadata\.csv is not a finite number > 0"):
        FantasyWorldDataset(synthetic_dataset_copy, num_frames=9, height=16, width=16)[0]


def test_geometry_at_another_resolution_follows_the_video_crop(synthetic_dataset_copy):
    """Geometry rendered at 65x98 (aspect 0.5% off the 32x48 video) is sampled where the video's pixels are.

    Scene 0 re-rendered exactly at the geometry resolution with the same normalised intrinsics: output
    pixel (i, j) of the 24x24 cover crop (resized 24x36, crop offset 6) must hold geometry pixel
    (floor((i + 0.5) * 65 / 24), floor((j + 6.5) * 98 / 36)), the intrinsics must be the video's, and the
    sampled points must project within half a geometry pixel of the output pixel centres. Cropping the
    geometry on its own (as before) sampled other pixels and gave intrinsics of the geometry's crop.
    """
    folder = synthetic_dataset_copy
    _, _, w2c, intrinsics = raw_scene(folder, 0)
    scene = random_scene(np.random.default_rng((SYNTHETIC_SEED, 0)))
    K = intrinsics_to_matrix(intrinsics[0].double(), 65, 98).numpy()
    views = [render_frame(scene, matrix.double().numpy(), K, 65, 98) for matrix in w2c]
    depth, points = (np.stack([view[part] for view in views]).astype(np.float32) for part in (1, 2))
    np.save(folder / "scene_000_depth.npy", depth)
    np.save(folder / "scene_000_points.npy", points)

    sample = FantasyWorldDataset(folder, num_frames=9, height=24, width=24, normalize=False)[0]
    rows, columns = (2 * np.arange(24) + 1) * 65 // 48, (2 * np.arange(24) + 13) * 98 // 72
    valid = sample["valid"][:, 0].numpy()
    np.testing.assert_array_equal(sample["depth"][:, 0].numpy(), np.where(valid, depth[:, rows[:, None], columns[None, :]], 0))
    fx, fy, cx, cy = intrinsics.unbind(-1)
    torch.testing.assert_close(sample["intrinsics"][:, 0, 0], fx * 36)
    torch.testing.assert_close(sample["intrinsics"][:, :2, 2], torch.stack([cx * 36 - 6, cy * 24], dim=-1))

    camera_points = transform_points(w2c.double(), sample["points"].permute(0, 2, 3, 1).double())
    projected = camera_points[..., :2] / camera_points[..., 2:] * torch.stack([fx * 36, fy * 24], -1).double()[:, None, None]
    projected += sample["intrinsics"][:, None, None, :2, 2].double()
    centres = torch.stack(torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="xy"), dim=-1).double()
    offset = (projected - centres)[torch.from_numpy(valid)].abs()
    half_geometry_pixel = torch.tensor([0.5 * 36 / 98, 0.5 * 24 / 65], dtype=torch.float64)
    assert (offset <= half_geometry_pixel + 1e-4).all()
