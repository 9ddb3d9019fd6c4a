"""diffsynth/fantasy_world/eval/evaluate.py and baselines.py: baselines, the next-scene control, the noise
level of the prediction and the CLI's reports (tiny model, synthetic scenes)."""
import json
import math

import pytest
import torch

from diffsynth.fantasy_world.eval import evaluate as evaluation
from diffsynth.fantasy_world.eval.baselines import TrainingSetBaselines, fit_pixel_ridge
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.data.dataset import FantasyWorldDataset, collate_fantasy_world
from diffsynth.fantasy_world.geometry.shapes import latent_frame_of_video_frame
from diffsynth.fantasy_world.eval.metrics import METRIC_KEYS
from diffsynth.fantasy_world.model.noise import final_geometry_sigma
from diffsynth.fantasy_world.data.synthetic import generate_dataset
from diffsynth.fantasy_world.train.module import build_training_module
from diffsynth.fantasy_world.model.weights import save_fantasy_world_weights

from conftest import SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH

T, H, W = 5, 4, 4  # 5 video frames = 2 latent frames; latents 2x2, each cell covers 2x2 output pixels
# The learning test: a short stage-1 run of the tiny model (about a minute on 2 CPU cores).
LEARNING_TRAIN_SCENES, LEARNING_STEPS = 32, 400


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny branch as fantasy_world.safetensors."""
    dit = build_dit("tiny")
    dit.enable_fantasy_world_mode(split_layer=2)
    path = tmp_path_factory.mktemp("checkpoint") / "fantasy_world.safetensors"
    save_fantasy_world_weights(dit, path)
    return path


@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory):
    """Two held-out scenes: the generator with another seed than the training fixture."""
    folder = tmp_path_factory.mktemp("heldout")
    generate_dataset(folder, 2, SYNTHETIC_FRAMES, SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH, seed=1)
    return folder


@pytest.fixture
def eval_argv(synthetic_dataset, heldout_dataset, checkpoint, tmp_path):
    """Command line of an evaluation: the tiny model on the held-out scenes, baselines from the training fixture."""
    def make(*extra):
        return [
            "--checkpoint", str(checkpoint), "--dataset_base_path", str(heldout_dataset),
            "--train_dataset_base_path", str(synthetic_dataset), "--output_path", str(tmp_path / "eval"),
            "--model_source", "tiny", "--height", str(SYNTHETIC_HEIGHT), "--width", str(SYNTHETIC_WIDTH),
            "--num_frames", str(SYNTHETIC_FRAMES), *extra,
        ]
    return make


@pytest.fixture
def eval_args(eval_argv):
    return lambda *extra: evaluation.parse_args(eval_argv(*extra))


# ----------------------------------------------------------------------------- baselines


def pose(translation, quaternion, fov):
    return torch.tensor([*translation, *quaternion, *fov], dtype=torch.float32).expand(T, 9)


def constructed_clip(depth_value, camera, invalid=()):
    """A clip of constant depth ``depth_value`` and points (depth, 0, 0); ``invalid`` (t, y, x) pixels hold 0."""
    valid = torch.ones(T, 1, H, W, dtype=torch.bool)
    for t, y, x in invalid:
        valid[t, 0, y, x] = False
    depth = torch.where(valid, torch.tensor(float(depth_value)), 0.0)
    points = torch.cat([depth, torch.zeros(T, 2, H, W)], dim=1)
    return dict(depth=depth, points=points, valid=valid, camera=camera)


def test_baselines_of_a_constructed_training_set_have_the_known_values():
    quarter_turn = (0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4))
    never_valid = (4, 3, 3)
    clips = [
        constructed_clip(1.0, pose((0, 0, 0), (0, 0, 0, 1), (1.0, 1.2)), [never_valid]),
        constructed_clip(2.0, pose((1, 0, 0), quarter_turn, (0.5, 0.6)), [never_valid]),
        constructed_clip(6.0, pose((2, 0, 0), (0, 0, 0, 1), (0.9, 0.9)), [never_valid, (0, 0, 0)]),
    ]
    baselines = TrainingSetBaselines()
    for clip in clips:
        baselines.add(clip, torch.randn(1, 2, 2, 2))
    constants = baselines.fit()
    # 79 + 79 + 78 valid values: 1s, 2s, 6s; the median is 2.
    assert constants["train_median_depth"] == 2.0
    assert constants["train_mean_fov_h_deg"] == pytest.approx(math.degrees(0.8))
    assert constants["train_mean_fov_w_deg"] == pytest.approx(math.degrees(0.9))
    predicted = baselines.predict(torch.randn(1, 2, 2, 2))

    constant = predicted["constant_depth_static_camera"]
    assert torch.equal(constant["depth"], torch.full((T, 1, H, W), 2.0))
    assert torch.allclose(constant["points"][:, 2], torch.tensor(2.0))  # z of depth 2 back-projected
    assert torch.allclose(constant["camera"], pose((0, 0, 0), (0, 0, 0, 1), (0.8, 0.9)))

    mean = predicted["per_pixel_mean"]
    expected_depth = torch.full((T, 1, H, W), 3.0)
    expected_depth[0, 0, 0, 0] = 1.5  # only the first two clips are valid there
    expected_depth[4, 0, 3, 3] = 2.0  # never valid: the training median
    assert torch.allclose(mean["depth"], expected_depth)
    expected_x = expected_depth[:, 0].clone()
    expected_x[4, 3, 3] = (79 * 1 + 79 * 2 + 78 * 6) / 236  # never valid: the mean valid training point
    assert torch.allclose(mean["points"][:, 0], expected_x) and not mean["points"][:, 1:].any()
    # Mean trajectory: the mean translation and the mean quaternion, renormalised.
    quaternion = torch.tensor([0.0, 0.0, quarter_turn[2], 2 + quarter_turn[3]])
    assert torch.allclose(mean["camera"], pose((1, 0, 0), (quaternion / quaternion.norm()).tolist(), (0.8, 0.9)), atol=1e-6)
    assert set(predicted["latent_probe"]) == {"depth"}


def test_latent_probe_recovers_an_exact_linear_depth_law():
    """Depth of video frame t at pixel (y, x) = 3 + 0.5 * (latent channel 0 of its latent frame at the covering cell).

    A probe reading the wrong latent frame or position cannot fit it."""
    generator = torch.Generator().manual_seed(0)
    frame = latent_frame_of_video_frame(T)
    rows = torch.arange(H) * 2 // H

    def clip(latents):
        cells = latents[0][frame][:, rows][:, :, rows]  # [T, H, W] (square grid)
        depth = (3.0 + 0.5 * cells)[:, None]
        return dict(depth=depth, points=torch.zeros(T, 3, H, W), valid=torch.ones(T, 1, H, W, dtype=torch.bool),
                    camera=pose((0, 0, 0), (0, 0, 0, 1), (1, 1)))

    baselines = TrainingSetBaselines(ridge_lambda=1e-9)
    for _ in range(24):  # more clips than the 2 x 9 features: the primal path
        latents = torch.randn(2, 2, 2, 2, generator=generator)
        baselines.add(clip(latents), latents)
    baselines.fit()
    heldout = torch.randn(2, 2, 2, 2, generator=generator)
    predicted = baselines.predict(heldout)
    truth = clip(heldout)["depth"]
    assert torch.allclose(predicted["latent_probe"]["depth"], truth, atol=1e-4)
    assert not torch.allclose(predicted["per_pixel_mean"]["depth"], truth, atol=0.1)


@pytest.mark.parametrize("num_samples", [5, 12])  # dual (N < F) and primal solves
def test_pixel_ridge_equals_the_explicit_solution_over_valid_samples(num_samples):
    generator = torch.Generator().manual_seed(num_samples)
    features = torch.randn(num_samples, 3, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(num_samples, 3, generator=generator, dtype=torch.float64)
    valid = torch.rand(num_samples, 3, generator=generator) > 0.25
    valid[:2] = True
    # Values of invalid samples must not matter, even non-finite ones.
    weights, feature_mean, target_mean = fit_pixel_ridge(features.where(valid[..., None], math.inf),
                                                         targets.where(valid, math.nan), valid, ridge_lambda=0.3)
    for pixel in range(3):
        x, y = features[valid[:, pixel], pixel], targets[valid[:, pixel], pixel]
        n = len(y)
        xc, yc = x - x.mean(0), y - y.mean()
        expected = torch.linalg.solve(xc.T @ xc / n + 0.3 * torch.eye(8, dtype=torch.float64), xc.T @ yc / n)
        assert torch.allclose(weights[pixel], expected, atol=1e-10)
        assert torch.allclose(feature_mean[pixel], x.mean(0)) and torch.allclose(target_mean[pixel], y.mean())


# ----------------------------------------------------------------------------- the evaluation


def truth_predictor(module, batch, sigma, generator):
    """A fake branch that reads its input perfectly: its prediction is the clip's own truth."""
    latents = batch["latents"]  # a model batch: the encoders already ran
    target = evaluation.clip_targets(module, batch, evaluation.prediction_size(module, latents))
    return dict(depth=target["depth"], points=target["points"], camera=target["camera"]), latents[0].float().cpu()


def constant_predictor(module, batch, sigma, generator):
    """A fake branch that ignores its input."""
    prediction, latents = truth_predictor(module, batch, sigma, generator)
    return {key: torch.ones_like(value) for key, value in prediction.items()}, latents


def test_next_scene_control_exposes_a_prediction_that_depends_on_the_input(eval_args, monkeypatch):
    monkeypatch.setattr(evaluation, "predict_clip", truth_predictor)
    rows = evaluation.evaluate(eval_args())["rows"]
    model, control = rows["model"], rows["next_scene_control"]
    assert model["depth_abs_rel_unaligned"] == pytest.approx(0.0, abs=1e-6)
    assert model["points_error_unaligned"] == pytest.approx(0.0, abs=1e-6)
    assert model["rotation_error_first_last"] == pytest.approx(0.0, abs=1e-2)
    assert model["pose_auc30"] == pytest.approx(100.0)
    assert control["depth_abs_rel_unaligned"] > 0.05
    assert control["points_error_unaligned"] > 0.05
    assert control["rotation_error_first_last"] > 1.0


def test_next_scene_control_equals_the_model_for_an_input_independent_prediction(eval_args, monkeypatch):
    monkeypatch.setattr(evaluation, "predict_clip", constant_predictor)
    rows = evaluation.evaluate(eval_args())["rows"]
    for key in METRIC_KEYS:
        model, control = rows["model"][key], rows["next_scene_control"][key]
        assert (model is None and control is None) or model == pytest.approx(control, nan_ok=True), key


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_geometry_is_read_from_latents_noised_to_sigma(eval_args, monkeypatch, sigma):
    args = eval_args() if sigma is None else eval_args("--sigma", str(sigma))
    module, encoder = build_training_module(args, torch.device("cpu"))
    batch = encoder(collate_fantasy_world([FantasyWorldDataset(args.dataset_base_path, num_frames=args.num_frames,
                                                               height=args.height, width=args.width)[0]]))
    seen = {}
    real_model_fn = evaluation.model_fn_wan_video

    def spy(dit, **kwargs):
        seen.update(kwargs)
        return real_model_fn(dit, **kwargs)

    monkeypatch.setattr(evaluation, "model_fn_wan_video", spy)
    expected_sigma = final_geometry_sigma() if sigma is None else sigma
    resolved = evaluation.resolve_sigma(args)
    assert resolved == pytest.approx(expected_sigma)
    prediction, clean = evaluation.predict_clip(module, batch, resolved, torch.Generator().manual_seed(7))
    noise = torch.randn(clean[None].shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(seen["latents"], (1 - expected_sigma) * clean[None] + expected_sigma * noise)
    assert float(seen["timestep"]) == pytest.approx(1000 * expected_sigma, rel=1e-6)
    assert seen["return_geometry"] is True
    assert prediction["depth"].shape[0] == SYNTHETIC_FRAMES and prediction["camera"].shape == (SYNTHETIC_FRAMES, 9)


def test_cli_writes_both_reports_with_every_row(eval_argv, checkpoint, tmp_path, capsys):
    evaluation.main(eval_argv("--sigma", "0.3"))
    out = tmp_path / "eval"
    report = json.loads((out / "report.json").read_text())
    assert set(report["rows"]) == set(evaluation.ROWS)
    for row, values in report["rows"].items():
        assert set(values) == set(METRIC_KEYS), row
    assert all(value is not None for value in report["rows"]["model"].values())
    assert report["rows"]["latent_probe"]["pose_auc30"] is None and report["rows"]["latent_probe"]["depth_abs_rel_frame"] is not None
    settings = report["settings"]
    assert settings["sigma"] == 0.3 and settings["timestep"] == pytest.approx(300.0)
    assert settings["num_clips"] == 2 and settings["num_train_clips"] == 3
    assert settings["checkpoint"] == str(checkpoint)
    markdown = (out / "report.md").read_text()
    for label in evaluation.ROWS.values():
        assert f"| {label} |" in markdown
    for _, header, _ in evaluation.COLUMNS:
        assert header in markdown
    assert markdown in capsys.readouterr().out
    assert [check["description"] for check in report["checks"]] == [check[0] for check in evaluation.LEARNING_CHECKS]
    for check in evaluation.LEARNING_CHECKS:
        assert f"| {check[0]} |" in markdown


def test_learning_checks_compare_with_the_named_rows():
    rows = {key: {metric: 1.0 for metric in METRIC_KEYS} for key in evaluation.ROWS}
    rows["model"].update(depth_abs_rel_frame=0.2, depth_median_scale=1.3, rotation_error_first_last=None)
    rows["per_pixel_mean"]["depth_abs_rel_frame"] = 0.3   # 0.2 <= 0.8 * 0.3: pass
    rows["next_scene_control"]["depth_abs_rel_frame"] = 0.2  # the model's own error: input ignored
    checks = {check["description"]: check for check in evaluation.learning_checks(rows)}
    by_start = lambda text: next(check for description, check in checks.items() if description.startswith(text))
    assert by_start("depth beats the per-pixel")["passed"] is True
    assert by_start("depth beats the per-pixel")["threshold"] == pytest.approx(0.24)
    assert by_start("depth depends on the input")["passed"] is False
    assert by_start("depth scale without alignment: median pred/true <=")["passed"] is False
    assert by_start("rotation first->last")["passed"] is None


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learning_scenes(tmp_path_factory):
    """Training and held-out scenes for a short learning run (other seeds than every other fixture)."""
    folder = tmp_path_factory.mktemp("learning")
    generate_dataset(folder / "train", LEARNING_TRAIN_SCENES, 9, 64, 64, seed=1000)
    generate_dataset(folder / "heldout", 4, 9, 64, 64, seed=2000)
    return folder


def test_a_short_stage_one_run_learns_depth_that_depends_on_the_input(learning_scenes, tmp_path):
    # Learning is shown on held-out scenes, not by a falling loss: the branch's depth for a scene
    # must score clearly better than its depth for the next scene (a branch predicting the training
    # mean scores the same on both), and better than the per-pixel training mean.
    from diffsynth.fantasy_world.train.loop import run_training
    from diffsynth.fantasy_world.train.args import parse_args

    size = ["--height", "64", "--width", "64", "--num_frames", "9", "--model_source", "tiny"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, and the test is timing-insensitive
    try:
        run_training(parse_args([
            "--dataset_base_path", str(learning_scenes / "train"), *size, "--stage", "1", "--max_steps", str(LEARNING_STEPS),
            "--batch_size", "2", "--learning_rate", "1e-3", "--dataset_cache_in_memory", "--output_path", str(tmp_path / "run"),
        ]))
        report = evaluation.evaluate(evaluation.parse_args([
            "--checkpoint", str(tmp_path / "run" / "fantasy_world.safetensors"), *size,
            "--dataset_base_path", str(learning_scenes / "heldout"), "--train_dataset_base_path", str(learning_scenes / "train"),
            "--output_path", str(tmp_path / "eval"),
        ]))
    finally:
        torch.set_num_threads(threads)
    rows = report["rows"]
    model, control = rows["model"]["depth_abs_rel_frame"], rows["next_scene_control"]["depth_abs_rel_frame"]
    # A branch that ignores its input scores exactly its own error on the control (ratio 1.00).
    assert control > 1.1 * model, (model, control)
    assert model < rows["per_pixel_mean"]["depth_abs_rel_frame"], (model, rows["per_pixel_mean"])
    assert 0.7 < rows["model"]["depth_median_scale"] < 1.4  # depth is supervised in scene units


# ----------------------------------------------------------------------------- camera baselines and probes


def linear_latents(shift=(0.0, 0.0), zoom=0.0, frames=3, size=(6, 8)):
    """Two-channel latents, each a different linear image of x, y in [-1, 1], moved between frames
    by a constant flow ``shift`` (u, v) plus ``zoom * (x, y)`` per frame pair."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size[0], dtype=torch.float64), torch.linspace(-1, 1, size[1], dtype=torch.float64), indexing="ij")
    gains = torch.tensor([[1.0, 0.3], [-0.4, 0.8]], dtype=torch.float64)
    latents = []
    for step in range(frames):
        # I_k(p) = I_0(p - k * flow(p)): for linear images and u = a + s x this stays linear.
        moved_x = x - step * (shift[0] + zoom * x)
        moved_y = y - step * (shift[1] + zoom * y)
        latents.append(torch.stack([gain[0] * moved_x + gain[1] * moved_y for gain in gains]))
    return torch.stack(latents, dim=1)


def test_affine_flow_features_recover_a_known_translation_and_zoom():
    from diffsynth.fantasy_world.eval.baselines import affine_flow_features

    features = affine_flow_features(linear_latents(shift=(0.2, -0.1))).reshape(2, 6)
    expected = torch.tensor([0.2, 0.0, 0.0, -0.1, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(features, expected.expand(2, 6), atol=1e-5)
    # A zoom of s per pair, measured on the pair's mean image (scaled by 1 - (k + 1/2) s): s / (1 - (k + 1/2) s).
    zoom = affine_flow_features(linear_latents(zoom=0.05)).reshape(2, 6)
    for pair in range(2):
        rate = 0.05 / (1 - (pair + 0.5) * 0.05)
        assert torch.allclose(zoom[pair], torch.tensor([0.0, rate, 0.0, 0.0, 0.0, rate], dtype=torch.float64), atol=1e-5)


def yaw_pose(degrees):
    """Pose encodings [T, 9] of a camera yawing linearly to ``degrees`` (about the camera y axis)."""
    angles = torch.deg2rad(torch.linspace(0, degrees, T, dtype=torch.float64))
    quaternion = torch.stack([torch.zeros_like(angles), torch.sin(angles / 2), torch.zeros_like(angles), torch.cos(angles / 2)], -1)
    return torch.cat([torch.zeros(T, 3, dtype=torch.float64), quaternion, torch.full((T, 2), 0.9, dtype=torch.float64)], -1).float()


def test_one_bit_template_uses_the_true_yaw_sign_and_that_directions_mean():
    """Training clips turning +10 and +30 degrees and -20: a positive test clip gets the +20 mean, a negative one -20."""
    from diffsynth.fantasy_world.geometry.camera import cameras_from_pose_encoding
    from diffsynth.fantasy_world.eval.metrics import first_last_yaw

    baselines = TrainingSetBaselines()
    for degrees in (10.0, 30.0, -20.0):
        baselines.add(constructed_clip(1.0, yaw_pose(degrees)), torch.randn(1, 2, 2, 2))
    baselines.fit()
    for truth, expected in ((5.0, 20.0), (-40.0, -20.0)):
        true_w2c = cameras_from_pose_encoding(yaw_pose(truth).double(), (H, W))[0]
        template = baselines.predict(torch.randn(1, 2, 2, 2), true_w2c)["one_bit_template"]["camera"]
        yaw = first_last_yaw(cameras_from_pose_encoding(template.double(), (H, W))[0])
        assert float(yaw) == pytest.approx(expected, abs=0.2)
    assert "one_bit_template" not in baselines.predict(torch.randn(1, 2, 2, 2))


def test_affine_flow_read_out_learns_a_linear_law_from_flow_to_camera():
    """Translation of the pose encoding = the flow of the clip: the read-out reproduces it on a new clip."""
    baselines = TrainingSetBaselines(flow_ridge_lambda=1e-6)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        shift = torch.rand(2, generator=generator) * 0.4 - 0.2
        camera = pose((float(shift[0]), float(shift[1]), 0.0), (0, 0, 0, 1), (0.9, 0.9))
        baselines.add(constructed_clip(1.0, camera), linear_latents(tuple(shift.tolist()), frames=2).float())
    baselines.fit()
    predicted = baselines.predict(linear_latents((0.1, -0.15), frames=2).float())["affine_flow"]["camera"]
    assert torch.allclose(predicted[:, :2], torch.tensor([0.1, -0.15]).expand(T, 2), atol=1e-3)


def test_an_input_ignoring_camera_fails_both_probes_and_extra_splits_are_reported(eval_argv, heldout_dataset, monkeypatch, tmp_path):
    """The truth of the unmodified clip (what a template predicts at best) moves on frame-0 clips and
    does not flip on mirrored ones; every split gets its table, probes and checks."""
    monkeypatch.setattr(evaluation, "predict_clip", truth_predictor)  # reads the targets, never the frames
    report = evaluation.evaluate(evaluation.parse_args(eval_argv("--extra_split", f"again={heldout_dataset}")))
    assert set(report["splits"]) == {"heldout", "again"}
    assert report["splits"]["again"]["rows"] == report["rows"]
    probes = report["probes"]["model"]
    assert probes["probe_frame_zero_rotation"] > 2.0
    assert probes["probe_mirror_flip_fraction"] == 0.0
    checks = {check["description"][:12]: check["passed"] for check in report["checks"]}
    assert checks["frame-0 prob"] is False and checks["mirror probe"] is False
    assert set(report["rows"]["one_bit_template"]) == set(METRIC_KEYS)
    assert report["rows"]["one_bit_template"]["rotation_error_first_last"] is not None
    assert report["rows"]["affine_flow"]["rotation_error_first_last"] is not None
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "## Split `again`" in markdown and "frame 0 repeated" in markdown
    with pytest.raises(ValueError, match="NAME=PATH"):
        evaluation.evaluate(evaluation.parse_args(eval_argv("--extra_split", "nopath")))
