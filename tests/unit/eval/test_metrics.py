"""diffsynth/fantasy_world/eval/metrics.py: depth, point-map and camera metrics on constructed clips."""
import math

import pytest
import torch

from diffsynth.fantasy_world.eval import metrics
from diffsynth.fantasy_world.geometry.camera import compose_w2c, intrinsics_to_matrix, pose_encoding_from_cameras, quaternion_to_rotation_matrix

T, H, W = 5, 6, 8


def axis_angle(axis, degrees):
    """Rotation matrix ``[3, 3]`` of ``degrees`` about ``axis``."""
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    half = math.radians(degrees) / 2
    return quaternion_to_rotation_matrix(torch.cat([axis * math.sin(half), torch.tensor([math.cos(half)], dtype=torch.float64)]))


@pytest.fixture
def depth_clip():
    """(depth [T,1,H,W] in [0.5, 3], valid with some invalid pixels holding 0)."""
    generator = torch.Generator().manual_seed(0)
    depth = 0.5 + 2.5 * torch.rand(T, 1, H, W, generator=generator)
    valid = torch.rand(T, 1, H, W, generator=generator) > 0.2
    return torch.where(valid, depth, 0.0), valid


@pytest.fixture
def trajectory():
    """A moving, turning camera path: w2c [T,3,4] float64 and pixel intrinsics [T,3,3] of an HxW image."""
    w2c = []
    for t in range(T):
        rotation = axis_angle([0.2, 1.0, 0.1], 6.0 * t)
        centre = torch.tensor([0.3 * t, 0.05 * t, 0.1 * t * t], dtype=torch.float64)
        w2c.append(torch.cat([rotation, (-rotation @ centre)[:, None]], dim=1))
    K = intrinsics_to_matrix(torch.tensor([0.9, 1.2, 0.5, 0.5], dtype=torch.float64), H, W).expand(T, 3, 3)
    return torch.stack(w2c), K


def test_depth_of_the_truth_is_perfect_under_every_alignment(depth_clip):
    depth, valid = depth_clip
    result = metrics.depth_metrics(depth, depth, valid)
    for name in ("frame", "clip", "unaligned"):
        assert float(result[f"depth_abs_rel_{name}"]) == pytest.approx(0.0, abs=1e-7)
        assert float(result[f"depth_delta_{name}"]) == 1.0
    assert float(result["depth_median_scale"]) == pytest.approx(1.0)


def test_doubled_depth_is_wrong_unaligned_and_right_after_alignment(depth_clip):
    depth, valid = depth_clip
    garbage = torch.where(valid, 2 * depth, 1e6)  # invalid pixels must not count
    result = metrics.depth_metrics(garbage, depth, valid)
    assert float(result["depth_abs_rel_unaligned"]) == pytest.approx(1.0)
    assert float(result["depth_delta_unaligned"]) == 0.0
    assert float(result["depth_median_scale"]) == pytest.approx(2.0)
    for name in ("frame", "clip"):
        assert float(result[f"depth_abs_rel_{name}"]) == pytest.approx(0.0, abs=1e-6)
        assert float(result[f"depth_delta_{name}"]) == 1.0


def test_per_frame_alignment_removes_per_frame_scales_and_per_clip_does_not(depth_clip):
    depth, valid = depth_clip
    scaled = depth * torch.arange(1, T + 1, dtype=torch.float32).reshape(T, 1, 1, 1)
    result = metrics.depth_metrics(scaled, depth, valid)
    assert float(result["depth_abs_rel_frame"]) == pytest.approx(0.0, abs=1e-6)
    assert float(result["depth_abs_rel_clip"]) > 0.3


def test_abs_rel_and_delta_known_values(depth_clip):
    depth, valid = depth_clip
    assert float(metrics.abs_rel(1.1 * depth, depth, valid)) == pytest.approx(0.1, rel=1e-5)
    assert float(metrics.delta_accuracy(1.2 * depth, depth, valid)) == 1.0
    assert float(metrics.delta_accuracy(depth / 1.3, depth, valid)) == 0.0
    # A non-positive prediction fails delta instead of passing through a division.
    assert float(metrics.delta_accuracy(-depth, depth, valid)) == 0.0


def test_point_error_scaled_and_unaligned():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(T, 3, H, W, generator=generator)
    valid = torch.rand(T, 1, H, W, generator=generator) > 0.3
    perfect = metrics.point_metrics(points, points, valid)
    assert float(perfect["points_error_aligned"]) == pytest.approx(0.0, abs=1e-6)
    tripled = metrics.point_metrics(torch.where(valid, 3 * points, 50.0), points, valid)
    expected = 2 * points.norm(dim=1, keepdim=True)[valid].mean()
    assert float(tripled["points_error_unaligned"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(tripled["points_error_aligned"]) == pytest.approx(0.0, abs=1e-5)


def test_rotation_angle_is_accurate_for_small_and_large_angles():
    for degrees in (1e-3, 10.0, 179.9):
        rotation = axis_angle([1.0, -2.0, 0.5], degrees)
        assert float(metrics.rotation_angle(torch.eye(3, dtype=torch.float64), rotation)) == pytest.approx(degrees, rel=1e-6)


def test_a_ten_degree_perturbation_of_the_last_camera(trajectory):
    w2c, K = trajectory
    perturbed = w2c.clone()
    # Rotate the last camera by 10 degrees about its own optical axis: its centre stays put.
    perturbed[-1] = compose_w2c(torch.cat([axis_angle([0.0, 0.0, 1.0], 10.0), torch.zeros(3, 1, dtype=torch.float64)], 1), w2c[-1])
    result = metrics.camera_metrics(perturbed, K, w2c, K, (H, W))
    assert float(result["rotation_error_first_last"]) == pytest.approx(10.0, rel=1e-6)
    assert float(result["rotation_error_consecutive"]) == pytest.approx(10.0 / (T - 1), rel=1e-6)
    perfect = metrics.camera_metrics(w2c, K, w2c, K, (H, W))
    assert float(perfect["rotation_error_first_last"]) == pytest.approx(0.0, abs=1e-6)
    assert float(perfect["pose_auc30"]) == pytest.approx(100.0)
    assert float(perfect["translation_direction_error_pairs"]) == pytest.approx(0.0, abs=1e-4)


def test_camera_errors_ignore_a_similarity_transform_of_the_whole_trajectory(trajectory):
    w2c, K = trajectory
    # World change x_world = s R x' + c: a rigid motion plus a scale of the predicted trajectory.
    motion = torch.cat([axis_angle([0.3, 0.4, 1.0], 70.0), torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)], 1)
    moved = compose_w2c(w2c, motion)
    moved = torch.cat([moved[..., :3], 4.0 * moved[..., 3:]], dim=-1)
    result = metrics.camera_metrics(moved, K, w2c, K, (H, W))
    for key in ("rotation_error_consecutive", "rotation_error_first_last", "translation_direction_error_first_last",
                "translation_direction_error_pairs", "fov_error"):
        assert float(result[key]) == pytest.approx(0.0, abs=1e-4), key
    assert float(result["pose_auc30"]) == pytest.approx(100.0)


def test_translation_direction_signed_sign_agnostic_and_zero_length():
    true = torch.tensor([[1.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    pred = torch.tensor([[0.0, 2.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    signed = metrics.translation_direction_angle(pred, true)
    assert signed.tolist() == pytest.approx([90.0, 180.0, 90.0, 45.0])
    agnostic = metrics.translation_direction_angle(pred, true, sign_agnostic=True)
    assert agnostic.tolist() == pytest.approx([90.0, 0.0, 90.0, 45.0])
    # The true camera did not move: no direction to compare (VGGT's RTA scores it 90).
    static = torch.zeros(1, 3, dtype=torch.float64)
    assert math.isnan(float(metrics.translation_direction_angle(pred[:1], static)))
    assert float(metrics.translation_direction_angle(pred[:1], static, sign_agnostic=True)) == 90.0


def test_static_camera_prediction_scores_ninety_degrees_and_the_path_rotation(trajectory):
    w2c, K = trajectory
    static = torch.eye(3, 4, dtype=torch.float64).expand(T, 3, 4)
    result = metrics.camera_metrics(static, K, w2c, K, (H, W))
    assert float(result["translation_direction_error_first_last"]) == pytest.approx(90.0)
    expected = float(metrics.rotation_angle(w2c[0, :, :3] @ w2c[-1, :, :3].T, torch.eye(3, dtype=torch.float64)))
    assert float(result["rotation_error_first_last"]) == pytest.approx(expected) and expected == pytest.approx(6.0 * (T - 1))


def test_pose_auc_follows_vggt_thresholds():
    zeros = torch.zeros(10)
    assert float(metrics.pose_auc(zeros, zeros)) == pytest.approx(100.0)
    # Pair error = max(RRA, RTA) = 15.5: accurate at thresholds 16..30, i.e. 15 of 30.
    assert float(metrics.pose_auc(torch.full((4,), 15.5), torch.full((4,), 2.0))) == pytest.approx(50.0)
    assert float(metrics.pose_auc(torch.full((4,), 2.0), torch.full((4,), 15.5))) == pytest.approx(50.0)
    # Exactly 30 counts at the last threshold only (numpy's closed last bin).
    assert float(metrics.pose_auc(torch.full((2,), 30.0), zeros[:2])) == pytest.approx(100.0 / 30)
    assert float(metrics.pose_auc(torch.full((2,), 45.0), zeros[:2])) == 0.0


def test_fov_error_in_degrees(trajectory):
    w2c, K = trajectory
    fov = metrics.fov_degrees(w2c, K, (H, W))
    wider = K.clone()
    wider[:, 0, 0] = (W / 2) / torch.tan(torch.deg2rad(fov[:, 1] + 5.0) / 2)
    result = metrics.camera_metrics(w2c, wider, w2c, K, (H, W))
    assert float(result["fov_w_error"]) == pytest.approx(5.0)
    assert float(result["fov_h_error"]) == pytest.approx(0.0, abs=1e-9)
    assert float(result["fov_error"]) == pytest.approx(2.5)


def test_clip_metrics_decodes_pose_encodings_and_marks_missing_heads(depth_clip, trajectory):
    depth, valid = depth_clip
    w2c, K = trajectory
    target = dict(depth=depth, points=torch.zeros(T, 3, H, W), valid=valid, w2c=w2c.float(), intrinsics=K.float())
    encoding = pose_encoding_from_cameras(w2c, K, (H, W))
    result = metrics.clip_metrics(dict(depth=depth, camera=encoding), target, (H, W))
    assert set(result) == set(metrics.METRIC_KEYS)
    assert result["points_error_aligned"] is None and result["points_error_unaligned"] is None
    assert result["depth_abs_rel_unaligned"] == pytest.approx(0.0, abs=1e-7)
    assert result["rotation_error_first_last"] == pytest.approx(0.0, abs=1e-3)
    assert result["fov_error"] == pytest.approx(0.0, abs=1e-4)
    assert result["pose_auc30"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- template probes


def test_first_last_yaw_is_signed_and_flips_under_the_mirror_augmentation():
    import numpy as np

    from diffsynth.fantasy_world.eval.metrics import first_last_yaw
    from diffsynth.fantasy_world.data.synthetic import ROOM_FAMILY, Clip, axis_angle_matrix, free_camera_path, mirror_clip

    turn = torch.from_numpy(np.stack([np.concatenate([axis_angle_matrix(np.array([0.0, 1.0, 0.0]), np.radians(a)), np.zeros((3, 1))], 1)
                                      for a in (0.0, 10.0, 25.0)]))
    assert float(first_last_yaw(turn)) == pytest.approx(25.0)
    for index in range(10):
        w2c = free_camera_path(np.random.default_rng(index), 5, ROOM_FAMILY.camera_region)
        empty = np.zeros((5, 2, 2))
        clip = Clip(np.zeros((5, 2, 2, 3), np.uint8), empty, np.zeros((5, 2, 2, 3)), w2c, np.tile([1.0, 1.0, 0.5, 0.5], (5, 1)))
        yaw, mirrored = first_last_yaw(torch.from_numpy(w2c)), first_last_yaw(torch.from_numpy(mirror_clip(clip).w2c))
        assert float(mirrored) == pytest.approx(-float(yaw), abs=1e-9)


def test_frame_zero_probe_is_zero_for_a_still_camera_and_the_largest_turn_otherwise():
    from diffsynth.fantasy_world.geometry.camera import pose_encoding_from_cameras
    from diffsynth.fantasy_world.eval.metrics import frame_zero_probe_error, mirror_probe_flips

    K = torch.tensor([[10.0, 0, 8], [0, 10.0, 8], [0, 0, 1]], dtype=torch.float64).expand(3, 3, 3)
    still = pose_encoding_from_cameras(torch.eye(3, 4, dtype=torch.float64).expand(3, 3, 4), K, (16, 16))
    assert frame_zero_probe_error(still, (16, 16)) == pytest.approx(0.0, abs=1e-6)
    angles = torch.deg2rad(torch.tensor([0.0, 12.0, 5.0], dtype=torch.float64))
    rotations = torch.zeros(3, 3, 4, dtype=torch.float64)
    rotations[:, 0, 0] = rotations[:, 2, 2] = torch.cos(angles)
    rotations[:, 0, 2], rotations[:, 2, 0], rotations[:, 1, 1] = torch.sin(angles), -torch.sin(angles), 1.0
    turning = pose_encoding_from_cameras(rotations, K, (16, 16))
    assert frame_zero_probe_error(turning, (16, 16)) == pytest.approx(12.0, abs=1e-6)
    # Yaw 5 degrees (first->last) against its mirror image, itself, and a still camera.
    mirrored = turning.clone()
    mirrored[:, [4, 5]] *= -1  # quaternion (x, y, z, w) of a yaw: negating y (and z) mirrors it
    assert mirror_probe_flips(turning, mirrored, (16, 16)) is True
    assert mirror_probe_flips(turning, turning, (16, 16)) is False
    assert mirror_probe_flips(turning, still, (16, 16)) is False
