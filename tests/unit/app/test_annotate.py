"""diffsynth/fantasy_world/annotate: DA3 data engine (random weights, no downloads)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch
from safetensors.torch import save_file, save_model

from diffsynth.fantasy_world.app.annotate import AnnotationError, build_network, load_network
from diffsynth.fantasy_world.app.annotate.cli import main
from diffsynth.fantasy_world.app.annotate.scale_fit import fit_scale
from diffsynth.fantasy_world.app.annotate.video import processed_size
from diffsynth.fantasy_world.data.camera_files import read_camera_file
from diffsynth.fantasy_world.data.dataset import FantasyWorldDataset
from diffsynth.fantasy_world.data.synthetic import generate_dataset, look_at_w2c

# A 48x80 video processed at longest side 84 becomes 56x84: 1.5 instead of 1.667, far beyond rounding.
HEIGHT, WIDTH, RESOLUTION, FRAMES = 48, 80, 84, 9


@pytest.fixture(scope="module")
def network():
    return build_network("da3-small")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One synthetic clip (video, cameras, depth) at 48x80, laid out as the engine's inputs."""
    folder = tmp_path_factory.mktemp("scene")
    generate_dataset(folder / "truth", 1, FRAMES, HEIGHT, WIDTH, 3)
    (folder / "videos").mkdir()
    (folder / "cameras").mkdir()
    shutil.copy(folder / "truth/scene_000.mp4", folder / "videos/scene_000.mp4")
    shutil.copy(folder / "truth/scene_000_cameras.txt", folder / "cameras/scene_000.txt")
    return folder


class GroundTruthNetwork(torch.nn.Module):
    """The real DA3 network, whose numeric outputs are replaced by the scene's truth in DA3's format.

    DA3 gives depth and cameras up to scale: the truth is returned divided by ``scale``.
    """

    def __init__(self, network, truth: Path, scale: float):
        super().__init__()
        self.network, self.scale = network, scale
        self.depth = torch.from_numpy(np.load(truth / "scene_000_depth.npy")).float()
        self.w2c, self.intrinsics = read_camera_file(truth / "scene_000_cameras.txt")
        self.calls = []

    def forward(self, images, extrinsics, intrinsics, *rest):
        output = self.network(images, extrinsics, intrinsics)
        self.calls.append(extrinsics)
        height, width = images.shape[-2:]
        depth = torch.nn.functional.interpolate(self.depth[:, None], size=(height, width), mode="nearest-exact")[:, 0]
        w2c = self.w2c.clone()
        w2c[:, :, 3] /= self.scale
        K = torch.zeros(len(w2c), 3, 3)
        K[:, 0, 0], K[:, 1, 1] = self.intrinsics[:, 0] * width, self.intrinsics[:, 1] * height
        K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = self.intrinsics[:, 2] * width, self.intrinsics[:, 3] * height, 1
        replaced = {"depth": depth / self.scale, "depth_conf": torch.ones_like(depth) + depth, "extrinsics": w2c, "intrinsics": K}
        for key, value in replaced.items():
            assert output[key].shape[1:] == value.shape, key  # the truth really is in DA3's own format
        return {key: value[None] for key, value in replaced.items()} | {"aux": {}}


def annotate(monkeypatch, network, inputs: Path, output: Path, *extra):
    monkeypatch.setattr("diffsynth.fantasy_world.app.annotate.cli.build_network", lambda name: network)
    return main(["--videos", str(inputs / "videos"), "--random_weights", "da3-small", "--output_path", str(output),
                 "--num_frames", str(FRAMES), "--resolution", str(RESOLUTION), "--mask_quantile", "0", *extra])


def test_processed_size_breaks_the_aspect_ratio_as_the_round_trip_needs():
    assert processed_size(HEIGHT, WIDTH, RESOLUTION) == (56, 84)
    assert processed_size(480, 832, 504) == (294, 504)


@pytest.mark.parametrize("known_cameras", [False, True])
def test_round_trip_reproduces_the_scene_through_the_dataset(network, scene, tmp_path, monkeypatch, known_cameras):
    truth_network = GroundTruthNetwork(network, scene / "truth", scale=2.5)
    extra = ["--cameras", str(scene / "cameras")] if known_cameras else []
    assert annotate(monkeypatch, truth_network, scene, tmp_path / "out", *extra) == 0
    assert (truth_network.calls[0] is not None) == known_cameras  # pose-conditioned only with known cameras
    quality = pandas.read_csv(tmp_path / "out/quality.csv")
    assert quality["passed"].all() and quality["consistency"].min() > 0.9  # a true scene is consistent
    assert (tmp_path / "out/pictures/scene_000.png").is_file()
    # Without cameras the scale is DA3's: compare after the dataset's normalisation; with them, in metres.
    normalize = not known_cameras
    options = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, normalize=normalize)
    written = FantasyWorldDataset(tmp_path / "out", **options)[0]
    expected = FantasyWorldDataset(scene / "truth", **options)[0]
    both = written["valid"] & expected["valid"]
    assert both.float().mean() > 0.9
    depth_error = (written["depth"] - expected["depth"]).abs()[both] / expected["depth"][both]
    assert depth_error.median() < 1e-3 and (depth_error < 0.01).float().mean() > 0.95
    point_error = (written["points"] - expected["points"]).norm(dim=1, keepdim=True)[both] / expected["depth"][both]
    assert point_error.median() < 1e-3
    torch.testing.assert_close(written["w2c"], expected["w2c"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(written["intrinsics"], expected["intrinsics"], atol=1e-3, rtol=1e-4)


def dolly(frames, step):
    return torch.from_numpy(np.stack([look_at_w2c(np.array([0.0, 0.0, step * t]), np.array([0.0, 0.0, 10.0]))
                                      for t in range(frames)])).float()


@pytest.mark.parametrize("step", [0.3, 1e-4])  # a straight dolly, and a near-static camera
def test_scale_fit_recovers_a_known_scale(step):
    known = dolly(12, step)
    predicted = known.clone()
    predicted[:, :, 3] /= 3.7
    predicted[5, :, 3] += 100 * step  # one bad frame: the median ignores it
    assert fit_scale(predicted, known) == pytest.approx(3.7, rel=1e-3)


def test_scale_fit_on_a_static_camera_falls_back():
    known = dolly(5, 0.0)
    assert fit_scale(known, known, fallback=2.0) == 2.0


def test_end_to_end_with_the_real_network_then_training(network, tmp_path, monkeypatch):
    from diffsynth.fantasy_world.train.loop import run_training
    from diffsynth.fantasy_world.train.args import build_parser

    generate_dataset(tmp_path / "raw", 1, 9, 70, 126, 1)
    (tmp_path / "in/videos").mkdir(parents=True)
    shutil.copy(tmp_path / "raw/scene_000.mp4", tmp_path / "in/videos/clip.mp4")
    monkeypatch.setattr("diffsynth.fantasy_world.app.annotate.cli.build_network", lambda name: network)
    assert main(["--videos", str(tmp_path / "in/videos"), "--random_weights", "da3-small", "--output_path",
                 str(tmp_path / "out"), "--num_frames", "9", "--resolution", "126", "--keep_failed"]) == 0
    metadata = pandas.read_csv(tmp_path / "out/metadata.csv")
    assert list(metadata["video"]) == ["clips/clip/video.mp4"] and "quality_passed" in metadata
    args = build_parser().parse_args(["--dataset_base_path", str(tmp_path / "out"), "--height", "32", "--width", "48",
                                      "--num_frames", "9", "--model_source", "tiny", "--output_path", str(tmp_path / "run"),
                                      "--max_steps", "2"])
    assert run_training(args)["steps"] == 2


def test_failing_clips_are_left_out_of_metadata_but_listed(network, scene, tmp_path, monkeypatch):
    assert annotate(monkeypatch, network, scene, tmp_path / "out") == 0  # random weights: inconsistent geometry
    assert len(pandas.read_csv(tmp_path / "out/metadata.csv")) == 0
    assert not pandas.read_csv(tmp_path / "out/quality.csv")["passed"].any()


def test_existing_output_resumes_and_never_rewrites_a_finished_clip(network, scene, tmp_path, monkeypatch):
    truth_network = GroundTruthNetwork(network, scene / "truth", scale=1.0)
    annotate(monkeypatch, truth_network, scene, tmp_path / "out")
    depth = tmp_path / "out/clips/scene_000/depth.npy"
    before = depth.stat().st_mtime_ns
    (tmp_path / "out/clips/other.partial").mkdir()  # a half-written clip never counts as finished
    annotate(monkeypatch, truth_network, scene, tmp_path / "out")
    assert len(truth_network.calls) == 1 and depth.stat().st_mtime_ns == before
    assert len(pandas.read_csv(tmp_path / "out/metadata.csv")) == 1


def test_nan_from_the_model_refuses_the_clip_by_name(network, scene, tmp_path, monkeypatch):
    class NaNNetwork(GroundTruthNetwork):
        def forward(self, *args):
            output = super().forward(*args)
            output["depth"][0, 0, 0, 0] = float("nan")
            return output

    assert annotate(monkeypatch, NaNNetwork(network, scene / "truth", 1.0), scene, tmp_path / "out") == 1
    refused = pandas.read_csv(tmp_path / "out/quality.csv")["refused"][0]
    assert "scene_000" in refused and "'depth'" in refused and "non-finite" in refused
    assert not (tmp_path / "out/clips/scene_000").exists()


def test_unreadable_video_and_short_camera_file_are_refused_by_name(network, scene, tmp_path, monkeypatch):
    inputs = Path(shutil.copytree(scene, tmp_path / "in"))
    (inputs / "videos/broken.mp4").write_bytes(b"not a video")
    lines = (inputs / "cameras/scene_000.txt").read_text().splitlines()
    (inputs / "cameras/scene_000.txt").write_text("\n".join(lines[:-2]) + "\n")
    shutil.copy(inputs / "cameras/scene_000.txt", inputs / "cameras/broken.txt")
    assert annotate(monkeypatch, network, inputs, tmp_path / "out", "--cameras", str(inputs / "cameras")) == 1
    refused = dict(pandas.read_csv(tmp_path / "out/quality.csv")[["clip", "refused"]].values)
    assert "unreadable video" in refused["broken"] and "broken.mp4" in refused["broken"]
    assert "scene_000.txt has 7 lines" in refused["scene_000"]


def model_folder(folder: Path, config, weights=None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, folder / "model.safetensors")
    return folder


def test_a_local_model_folder_loads_its_weights(network, tmp_path):
    # As published: the network inside a wrapper ("model." keys), tied tensors saved once.
    wrapper = torch.nn.Module()
    wrapper.model = build_network("da3-small")
    folder = model_folder(tmp_path / "m", {"model_name": "da3-small"})
    save_model(wrapper, folder / "model.safetensors")
    loaded, name = load_network(folder)
    assert name == "da3-small"
    for key, value in wrapper.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_named(network, tmp_path):
    weights = {key: value.clone() for key, value in network.state_dict().items()}
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(AnnotationError, match="model.safetensors") as error:
        load_network(model_folder(tmp_path / "m", {"model_name": "da3-small"}, weights))
    assert dropped in str(error.value) and "extra.weight" in str(error.value)


@pytest.mark.parametrize("config, message", [
    ({"model_name": "da3-huge"}, "not a shipped configuration"),
    ({"model_name": "da3-small", "head": {"dim_in": "${eval:__import__('pathlib').Path('PWNED').touch()}"}}, "refused"),
    (["da3-small"], "model_name"),
])
def test_a_config_must_only_name_a_shipped_configuration(tmp_path, config, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnnotationError, match=message) as error:
        load_network(model_folder(tmp_path / "m", config))
    assert "config.json" in str(error.value) and not (tmp_path / "PWNED").exists()


def test_quality_gate_sees_inconsistent_depth_and_a_jerky_path(scene):
    from diffsynth.fantasy_world.app.annotate.quality import QualityThresholds, clip_quality
    from diffsynth.fantasy_world.geometry.camera import intrinsics_to_matrix

    depth = torch.from_numpy(np.load(scene / "truth/scene_000_depth.npy")).float()
    w2c, intrinsics = read_camera_file(scene / "truth/scene_000_cameras.txt")
    K = intrinsics_to_matrix(intrinsics, HEIGHT, WIDTH)
    good = clip_quality(depth, depth, depth > 0, K, w2c, QualityThresholds())
    assert good["passed"] and good["consistency"] > 0.9 and good["jerk"] < 1
    warped = depth * (1 + 0.5 * torch.rand(depth.shape, generator=torch.Generator().manual_seed(0)))  # noisy depth
    assert clip_quality(warped, depth, depth > 0, K, w2c, QualityThresholds())["consistency"] < 0.5
    jerky = w2c.clone()
    jerky[4, :, 3] += 5 * (w2c[1, :, 3] - w2c[0, :, 3]).norm()
    assert not clip_quality(depth, depth, depth > 0, K, jerky, QualityThresholds())["passed"]
