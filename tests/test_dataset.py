"""diffsynth.fantasy_world.dataset: upstream's frame sampling, consistent crops, masks, normalisation, bad data."""
import json
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch
from PIL import Image

from diffsynth.core.data.unified_dataset import UnifiedDataset
from diffsynth.fantasy_world.camera import read_camera_file, transform_points
from diffsynth.fantasy_world.dataset import BadSampleError, FantasyWorldDataset, collate_fantasy_world
from diffsynth.fantasy_world.synthetic import generate_dataset

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
    dataset = FantasyWorldDataset(synthetic_dataset, num_frames=81, height=24, width=24, repeat=2)
    assert len(dataset) == 6
    sample = dataset[0]
    T = 9  # the video has 9 frames < 81: the largest 4k+1 count available
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
    """An 8-frame clip gives 5 frames (largest 4k+1), identical to upstream's video operator, same indices everywhere."""
    generate_dataset(tmp_path, 1, 8, 32, 48, seed=5)
    dataset = FantasyWorldDataset(tmp_path, num_frames=81, height=24, width=24, normalize=False)
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


def test_crop_resize_keeps_geometry_consistent(synthetic_dataset):
    """Back-projecting the cropped depth with the adjusted intrinsics lands on the raw world points.

    Upstream's cover crop of 32x48 to 24x24: scale max(24/48, 24/32) = 0.75, resized to 24x36, centre
    crop offset (0, 6). Nearest sampling copies source pixel floor((i + offset) * 32 / 24) for rows and
    floor((j + 6) * 48 / 36) for columns; when that division is exact the ray through the output pixel
    centre passes through the source pixel centre, so the points must agree exactly; elsewhere they
    agree within one source pixel.
    """
    dataset = FantasyWorldDataset(synthetic_dataset, num_frames=9, height=24, width=24, normalize=False)
    for index in range(2):
        sample = dataset[index]
        depth, points, w2c, _ = raw_scene(synthetic_dataset, index)
        source_rows = np.arange(24) * 32 // 24
        source_columns = (np.arange(24) + 6) * 48 // 36
        expected_depth = depth[:, source_rows[:, None], source_columns[None, :]]
        expected_points = points[:, source_rows[:, None], source_columns[None, :]]
        valid = sample["valid"][:, 0].numpy()
        assert valid.mean() > 0.7
        np.testing.assert_array_equal(sample["depth"][:, 0].numpy(), np.where(valid, expected_depth, 0))

        K = sample["intrinsics"].double().numpy()
        rows, columns = np.meshgrid(np.arange(24) + 0.5, np.arange(24) + 0.5, indexing="ij")
        z = sample["depth"][:, 0].double().numpy()
        points_camera = np.stack([
            (columns - K[:, None, None, 0, 2]) / K[:, None, None, 0, 0] * z,
            (rows - K[:, None, None, 1, 2]) / K[:, None, None, 1, 1] * z,
            z,
        ], axis=-1)
        R, t = w2c[:, :, :3].double().numpy(), w2c[:, :, 3].double().numpy()
        back_projected = np.einsum("tji,thwj->thwi", R, points_camera - t[:, None, None, :])
        error = np.linalg.norm(back_projected - expected_points, axis=-1)
        exact = ((np.arange(24) * 32) % 24 == 0)[:, None] & (((np.arange(24) + 6) * 48) % 36 == 0)[None, :]
        scene_scale = z[valid].mean()
        assert exact.sum() == 64
        assert error[valid & exact].max() < 1e-4 * scene_scale
        # One source pixel spans depth / focal in world units at that depth.
        source_focal = sample["intrinsics"][:, 0, 0].double().numpy() / 0.75
        assert (error / (z / source_focal[:, None, None] + 1e-12))[valid].max() < 1.0


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
}


@pytest.mark.parametrize("problem", list(BAD_DATA))
def test_bad_data_raises_naming_sample_and_file(synthetic_dataset_copy, problem):
    corrupt, message = BAD_DATA[problem]
    corrupt(synthetic_dataset_copy)
    dataset = FantasyWorldDataset(synthetic_dataset_copy, num_frames=9, height=24, width=24)
    with pytest.raises(BadSampleError, match=message) as error:
        dataset[1]
    assert error.value.sample == SECOND_SAMPLE and SECOND_SAMPLE in str(error.value)
    assert dataset[0]["sample"] == FIRST_SAMPLE  # the other rows still load


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
    source_rows, source_columns = np.arange(24) * 32 // 24, (np.arange(24) + 6) * 48 // 36
    expected = depth[:, source_rows[:, None], source_columns[None, :]]
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
