"""diffsynth.fantasy_world.train.losses: depth, point-map, camera and combined geometry losses."""
import math

import pytest
import torch

from diffsynth.fantasy_world.geometry.camera import compose_w2c, invert_w2c, quaternion_to_rotation_matrix
from diffsynth.fantasy_world.train.losses import (
    CAMERA_PASS_GAMMA,
    camera_loss,
    depth_loss,
    geometry_loss,
    point_loss,
    refined_camera_loss,
    relative_pose_loss,
    relative_poses_of_pairs,
    resize_targets_nearest,
)

B, T, H, W = 2, 3, 4, 5


def make_target(seed: int = 0, height: int = H, width: int = W):
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, T, 1, height, width, generator=generator) > 0.25
    depth = torch.rand(B, T, 1, height, width, generator=generator) * 4 + 1
    points = torch.randn(B, T, 3, height, width, generator=generator)
    # Values under a false mask are garbage and must never matter.
    depth = torch.where(valid, depth, torch.tensor(float("nan")))
    points = torch.where(valid, points, torch.tensor(float("inf")))
    camera = torch.randn(B, T, 9, generator=generator)
    return {"depth": depth, "points": points, "valid": valid, "camera": camera}


def perfect_prediction(target, conf: float = 1.0):
    valid = target["valid"]
    return {
        "depth": torch.where(valid, target["depth"], 1.0).requires_grad_(),
        "depth_conf": torch.full_like(target["depth"], conf).requires_grad_(),
        "points": torch.where(valid, target["points"], 0.0).requires_grad_(),
        "points_conf": torch.full_like(target["depth"], conf).requires_grad_(),
        "camera": target["camera"].clone().requires_grad_(),
    }


def noisy_prediction(target, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    noisy = {}
    for key, value in perfect_prediction(target).items():
        value = value.detach() + 0.3 * torch.randn(value.shape, generator=generator)
        if key in ("depth", "depth_conf", "points_conf"):
            value = value.abs() + 0.1  # positive, like the heads' outputs
        noisy[key] = value.requires_grad_()
    return noisy


def first_pixel(mask: torch.Tensor):
    return [int(index) for index in torch.nonzero(mask)[0]]


# ----------------------------------------------------------------------------- perfect predictions


def test_error_terms_and_gradients_vanish_for_a_perfect_prediction():
    target = make_target()
    pred = perfect_prediction(target, conf=1.7)
    losses = geometry_loss(pred, target)
    log_term = -0.2 * math.log(1.7)  # only the confidence regulariser remains
    assert losses["depth_conf"].item() == pytest.approx(log_term, abs=1e-6)
    assert losses["depth_tgm"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["points_conf"].item() == pytest.approx(log_term, abs=1e-6)
    assert losses["points_grad"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["camera"].item() == 0.0

    losses["total"].backward()
    for key in ("depth", "points", "camera"):
        assert torch.isfinite(pred[key].grad).all()
        assert pred[key].grad.abs().max() < 1e-6, key
    # The confidence gradient is c-only: d/dc (c * 0 - gamma log c) = -gamma / c per valid pixel.
    assert (pred["depth_conf"].grad < 0).any()


# ----------------------------------------------------------------------------- hand-computed values


def test_depth_loss_hand_computed():
    # One sample, two frames of 2x2.
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 2.0], [2.0, float("nan")]]]])[None]
    valid = torch.tensor([[[[True, True], [True, True]]], [[[True, True], [True, False]]]])[None]
    pred = torch.ones(1, 2, 1, 2, 2)
    conf = torch.tensor([2.0, 1.0])[None, :, None, None, None].expand(1, 2, 1, 2, 2)
    terms = depth_loss(pred, conf, target, valid, gamma=0.2)
    # No alignment. Frame 0: errors 0 1 2 3 at conf 2. Frame 1: errors 1 1 1 at conf 1.
    expected_conf = (2 * (0 + 1 + 2 + 3) - 4 * 0.2 * math.log(2.0) + 3) / 7
    # Pixels valid in both frames: (1 - 1) - (2 - d0) for d0 = 1, 2, 3.
    expected_tgm = (1 + 0 + 1) / 3
    assert terms["depth_conf"].item() == pytest.approx(expected_conf, rel=1e-6)
    assert terms["depth_tgm"].item() == pytest.approx(expected_tgm, rel=1e-6)
    assert terms["depth"].item() == pytest.approx(expected_conf + expected_tgm, rel=1e-6)


def test_point_loss_hand_computed():
    # One frame of 1x2 pixels: prediction (0,0,0) and (3,4,0), target zero, confidences 1 and 2.
    pred = torch.tensor([[0.0, 3.0], [0.0, 4.0], [0.0, 0.0]]).reshape(1, 1, 3, 1, 2)
    target = torch.zeros(1, 1, 3, 1, 2)
    conf = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 1, 2)
    valid = torch.ones(1, 1, 1, 1, 2, dtype=torch.bool)
    terms = point_loss(pred, conf, target, valid, gamma=0.2)
    assert terms["points_conf"].item() == pytest.approx((2 * 5 - 0.2 * math.log(2.0)) / 2, rel=1e-6)
    assert terms["points_grad"].item() == pytest.approx(1.5 * 5, rel=1e-6)  # one x pair, mean conf 1.5


def test_camera_loss_hand_computed_l1_per_part():
    pred = torch.zeros(1, 1, 9)
    target = torch.zeros(1, 1, 9)
    target[0, 0, 2] = 0.03  # translation
    target[0, 0, 6] = -0.04  # quaternion w
    target[0, 0, 7:] = 0.1  # both fovs
    terms = camera_loss(pred, target)
    assert terms["camera_translation"].item() == pytest.approx(0.03 / 3, rel=1e-6)
    assert terms["camera_rotation"].item() == pytest.approx(0.04 / 4, rel=1e-6)
    assert terms["camera_fov"].item() == pytest.approx(0.1, rel=1e-6)
    assert terms["camera"].item() == pytest.approx(0.01 + 0.01 + 0.5 * 0.1, rel=1e-6)


def test_camera_loss_pulls_on_small_pose_errors():
    # The regime of normalised poses: an L1 gradient keeps its size as the error shrinks (a Huber
    # loss's would shrink with it: the camera term could not pull).
    target = torch.zeros(1, 2, 9)
    for error in (0.3, 0.01):
        pred = torch.full((1, 2, 9), error, requires_grad=True)
        camera_loss(pred, target)["camera"].backward()
        assert pred.grad[0, 0, 0].item() == pytest.approx(1 / (2 * 3), rel=1e-6)


# ----------------------------------------------------------------------------- invariances and masks


def test_depth_loss_supervises_scale():
    # Scenes are normalised, so depth is supervised in scene units: a prediction at the wrong scale
    # costs, and the gradient pulls a rescaled prediction back (a per-frame least-squares
    # alignment would leave the loss exactly invariant and the scale unsupervised).
    target = make_target()
    exact = torch.where(target["valid"], target["depth"], 1.0)
    conf = torch.ones_like(exact)
    reference = depth_loss(exact, conf, target["depth"], target["valid"])
    for scale in (2.0, 0.5):
        scaled = (exact * scale).requires_grad_()
        terms = depth_loss(scaled, conf, target["depth"], target["valid"])
        assert terms["depth_conf"].item() > reference["depth_conf"].item() + 0.5, scale
        terms["depth"].backward()
        along_scaling = (scaled.grad * exact).sum()
        assert (along_scaling > 0) == (scale > 1), scale  # descent moves the scale back towards 1
    # Frame-wise drift of the scale costs too, in the temporal term.
    drift = torch.linspace(1.0, 1.3, T)[None, :, None, None, None]
    drifted = depth_loss(exact * drift, conf, target["depth"], target["valid"])
    assert drifted["depth_tgm"].item() > reference["depth_tgm"].item() + 0.05


def test_masked_out_pixels_change_nothing():
    target = make_target()
    pred = noisy_prediction(target)
    reference = geometry_loss(pred, target)
    b, t, i, j = first_pixel(~target["valid"][:, :, 0])

    changed_target = {key: value.clone() for key, value in target.items()}
    changed_target["depth"][b, t, 0, i, j] = 123.0
    changed_target["points"][b, t, :, i, j] = -77.0
    changed_pred = {key: value.detach().clone() for key, value in pred.items()}
    changed_pred["depth"][b, t, 0, i, j] = 55.0
    changed_pred["depth_conf"][b, t, 0, i, j] = 9.0
    changed_pred["points"][b, t, :, i, j] = 31.0
    changed_pred["points_conf"][b, t, 0, i, j] = 9.0
    changed = geometry_loss(changed_pred, changed_target)
    for key in reference:
        assert changed[key].item() == pytest.approx(reference[key].item(), rel=1e-6), key

    # The same change at a valid pixel does change the dense terms (the test can fail).
    valid_b, valid_t, valid_i, valid_j = first_pixel(target["valid"][:, :, 0])
    changed_pred["depth"][valid_b, valid_t, 0, valid_i, valid_j] = 55.0
    changed_pred["points"][valid_b, valid_t, :, valid_i, valid_j] = 31.0
    changed = geometry_loss(changed_pred, changed_target)
    assert changed["depth"].item() != pytest.approx(reference["depth"].item())
    assert changed["points"].item() != pytest.approx(reference["points"].item())


def test_camera_loss_counts_every_sample_and_frame():
    generator = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 6, 9, generator=generator)
    target = torch.randn(2, 6, 9, generator=generator)
    def l1_reference(pred, target):
        return sum(weight * (pred[..., part] - target[..., part]).abs().mean() for part, weight in
                   ((slice(0, 3), 1.0), (slice(3, 7), 1.0), (slice(7, 9), 0.5)))

    reference = camera_loss(pred, target)["camera"]
    assert reference.item() == pytest.approx(l1_reference(pred, target).item(), rel=1e-6)

    moved = pred.clone()
    moved[1, 5] += 2.0
    assert camera_loss(moved, target)["camera"].item() > reference.item() + 1e-3

    # A frame marked invalid is excluded: changing it or its (NaN) target changes nothing.
    camera_valid = torch.ones(2, 6, dtype=torch.bool)
    camera_valid[1, 5] = False
    masked_target = target.clone()
    masked_target[1, 5] = float("nan")
    expected = l1_reference(pred[camera_valid], target[camera_valid])
    assert camera_loss(moved, masked_target, camera_valid)["camera"].item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- resizing


def test_nearest_target_resize_copies_values_without_blending():
    height, width, out_h, out_w = 9, 13, 4, 6
    target = make_target(height=height, width=width)
    target["depth"] = torch.arange(B * T * height * width, dtype=torch.float32).reshape(target["valid"].shape)
    resized = resize_targets_nearest(target, (out_h, out_w))
    assert resized["depth"].shape == (B, T, 1, out_h, out_w)
    assert resized["points"].shape == (B, T, 3, out_h, out_w)
    assert resized["valid"].dtype == torch.bool and resized["camera"] is target["camera"]

    # The source pixel under each output pixel's centre: floor((dst + 0.5) * in / out).
    rows = [math.floor((i + 0.5) * height / out_h) for i in range(out_h)]
    cols = [math.floor((j + 0.5) * width / out_w) for j in range(out_w)]
    assert torch.equal(resized["depth"], target["depth"][..., rows, :][..., cols])
    assert set(resized["depth"].unique().tolist()) <= set(target["depth"].unique().tolist())
    # Validity and points travel with the depth pixel they belong to.
    source = resized["depth"].long()
    source_i, source_j = (source % (height * width)) // width, source % width
    for b in range(B):
        for t in range(T):
            valid_source = target["valid"][b, t, 0][source_i[b, t, 0], source_j[b, t, 0]]
            assert torch.equal(resized["valid"][b, t, 0], valid_source)


def test_target_resize_samples_block_centres():
    # At stride 8 each output pixel takes the pixel at offset 4 of its 8x8 block (the block centre
    # that latents and Plücker rays refer to), not the top-left one.
    target = make_target(height=16, width=16)
    target["depth"] = torch.arange(16, dtype=torch.float32)[None, :].expand(16, 16).expand(B, T, 1, 16, 16)
    resized = resize_targets_nearest(target, (2, 2))
    assert resized["depth"][0, 0, 0].tolist() == [[4.0, 12.0], [4.0, 12.0]]


def test_geometry_loss_resizes_high_resolution_targets():
    target = make_target(height=2 * H, width=3 * W)
    pred = noisy_prediction(resize_targets_nearest(target, (H, W)))
    from_high_resolution = geometry_loss(pred, target)
    from_resized = geometry_loss(pred, resize_targets_nearest(target, (H, W)))
    for key in from_resized:
        assert from_high_resolution[key].item() == pytest.approx(from_resized[key].item(), rel=1e-6), key


# ----------------------------------------------------------------------------- combination and robustness


def test_geometry_loss_weights_and_missing_heads():
    target = make_target()
    pred = noisy_prediction(target)
    losses = geometry_loss(pred, target, depth_weight=0.5, point_weight=2.0, camera_weight=3.0)
    unweighted = depth_loss(pred["depth"], pred["depth_conf"], target["depth"], target["valid"])
    assert losses["depth"].item() == pytest.approx(0.5 * unweighted["depth"].item(), rel=1e-6)
    unweighted_camera = camera_loss(pred["camera"], target["camera"])["camera"]
    assert losses["camera"].item() == pytest.approx(3.0 * unweighted_camera.item(), rel=1e-6)
    assert losses["total"].item() == pytest.approx(
        losses["depth"].item() + losses["points"].item() + losses["camera"].item(), rel=1e-6
    )
    # Default camera weight is 3.
    camera_only = geometry_loss({"camera": pred["camera"]}, target)
    assert camera_only["camera"].item() == pytest.approx(losses["camera"].item())

    assert set(camera_only) == {"camera", "camera_translation", "camera_rotation", "camera_fov", "total"}
    with pytest.raises(KeyError, match="depth_conf"):
        geometry_loss({"depth": pred["depth"]}, target)
    with pytest.raises(ValueError, match="no depth, points or camera"):
        geometry_loss({}, target)


def test_gradients_are_finite_with_empty_masks():
    target = make_target()
    target["valid"][0, 1] = False  # one empty frame
    target["depth"][0, 1] = float("nan")
    pred = noisy_prediction(target)
    losses = geometry_loss(pred, target)
    losses["total"].backward()
    for key, value in pred.items():
        assert torch.isfinite(value.grad).all(), key
        if key != "camera":
            assert (value.grad[0, 1] == 0).all(), key  # the empty frame contributes nothing

    # A batch with no valid pixel and no valid camera: zero, still connected, zero gradients.
    target["valid"][:] = False
    target["camera_valid"] = torch.zeros(B, T, dtype=torch.bool)
    pred = noisy_prediction(make_target())
    losses = geometry_loss(pred, target)
    assert losses["total"].item() == 0.0 and losses["total"].grad_fn is not None
    losses["total"].backward()
    for key, value in pred.items():
        assert torch.isfinite(value.grad).all() and (value.grad == 0).all(), key


# ----------------------------------------------------------------------------- refined camera passes


def test_relative_poses_of_pairs_are_the_composed_cameras():
    camera = make_target()["camera"]
    first, second = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    rotation, translation = relative_poses_of_pairs(camera, first, second)
    w2c = torch.cat([quaternion_to_rotation_matrix(camera[..., 3:7]), camera[..., :3, None]], dim=-1)
    expected = compose_w2c(w2c[:, second], invert_w2c(w2c[:, first]))
    assert torch.allclose(rotation, expected[..., :3], atol=1e-5)
    assert torch.allclose(translation, expected[..., 3], atol=1e-5)


def test_the_relative_pose_term_sees_a_wrong_step_between_frames():
    target = make_target()["camera"]
    valid = torch.ones(B, T, dtype=torch.bool)
    assert relative_pose_loss(target.clone(), target, valid).item() < 1e-6
    moved = target.clone()
    moved[:, 2, :3] += 0.5  # frame 2 alone is off: its steps from 0 and from 1 are wrong
    assert relative_pose_loss(moved, target, valid).item() > 0.1
    valid[:, 2] = False  # ... unless frame 2 has no camera
    assert relative_pose_loss(moved, target, valid).item() < 1e-6


def test_refined_camera_loss_weights_the_passes_as_vggt_and_supervises_each():
    target = make_target()["camera"]
    perfect = target[:, None].expand(B, 3, T, 9).clone()
    assert refined_camera_loss(perfect, target)["camera"].item() < 1e-6
    bad_first, bad_last = perfect.clone(), perfect.clone()
    bad_first[:, 0] += 0.3
    bad_last[:, -1] += 0.3
    first_loss = refined_camera_loss(bad_first, target)["camera"].item()
    last_loss = refined_camera_loss(bad_last, target)["camera"].item()
    weights = [CAMERA_PASS_GAMMA ** 2, CAMERA_PASS_GAMMA, 1.0]
    assert first_loss > 0 and first_loss / last_loss == pytest.approx(weights[0] / weights[2], rel=1e-4)
    # The logged parts are the last pass's; geometry_loss takes the passes when the head gives them.
    terms = refined_camera_loss(bad_last, target)
    assert terms["camera_translation"].item() == pytest.approx(0.3, rel=1e-5)
    combined = geometry_loss({"camera": bad_last[:, -1], "camera_iterations": bad_last}, {"camera": target})
    assert combined["camera"].item() == pytest.approx(3.0 * last_loss, rel=1e-6)
    assert "camera_relative" in combined


def test_the_relative_pose_term_of_several_passes_is_each_pass_own():
    target = make_target()["camera"]
    valid = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3
    passes = target[:, None] + 0.2 * torch.randn(B, 4, T, 9, generator=torch.Generator().manual_seed(4))
    together = relative_pose_loss(passes, target, valid)
    alone = torch.stack([relative_pose_loss(passes[:, k], target, valid) for k in range(4)])
    assert together.shape == (4,) and torch.allclose(together, alone, atol=1e-6)
