"""diffsynth.fantasy_world.geometry.camera: intrinsics, pose encoding, rays, scene normalisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffsynth.fantasy_world.geometry.camera import (
    FOV_EPSILON,
    cameras_from_pose_encoding,
    crop_resize_intrinsics,
    depth_to_points,
    intrinsics_to_matrix,
    invert_w2c,
    matrix_to_intrinsics,
    normalize_scene,
    plucker_rays,
    pose_encoding_from_cameras,
    quaternion_to_rotation_matrix,
    relative_to_first_frame,
    rotation_matrix_to_quaternion,
)

from conftest import random_cameras, random_rotations, rotation_about


# ----------------------------------------------------------------------------- intrinsics


def test_intrinsics_matrix_round_trip():
    intrinsics = torch.tensor([[0.9, 1.6, 0.5, 0.45]])
    K = intrinsics_to_matrix(intrinsics, height=480, width=832)
    assert torch.allclose(K[0], torch.tensor([[748.8, 0, 416.0], [0, 768.0, 216.0], [0, 0, 1]]))
    assert torch.allclose(matrix_to_intrinsics(K, 480, 832), intrinsics)


def plane_depth(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Z-depth of the world plane z = 0 seen by a camera, at the pixel centres (j + 0.5, i + 0.5)."""
    u = torch.arange(width, dtype=torch.float64) + 0.5
    v = torch.arange(height, dtype=torch.float64) + 0.5
    K, w2c = K.double(), w2c.double()
    x = (u[None, :] - K[0, 2]) / K[0, 0]
    y = (v[:, None] - K[1, 2]) / K[1, 1]
    rays = torch.stack(torch.broadcast_tensors(x, y, torch.ones(1, 1)), dim=-1)  # camera frame, z = 1
    R, t = w2c[:, :3], w2c[:, 3]
    center = -R.T @ t
    directions = rays @ R  # world directions of the z = 1 rays
    # Point on the ray: center + depth * direction; solve for world z = 0.
    return (-center[2] / directions[..., 2]).float()


@pytest.mark.parametrize(
    "crop, size",
    [((6, 10), (24, 32)), ((3, 0), (12, 16)), ((0, 5), (48, 64))],  # down x2, down x4, identity
)
def test_crop_resize_intrinsics_matches_nearest_resized_depth(crop, size):
    height, width = 60, 80
    K = torch.tensor([[70.0, 0.0, 41.0], [0.0, 72.0, 29.5], [0.0, 0.0, 1.0]])
    # Camera 3 units above the plane z = 0, looking down at it with a slight tilt.
    R = rotation_about([1.0, 0.3, 0.0], math.pi - 0.3)
    center = torch.tensor([0.2, -0.1, 3.0])
    w2c = torch.cat([R, (-R @ center)[:, None]], dim=-1)
    depth = plane_depth(K, w2c, height, width)
    assert (depth > 2.0).all()  # the whole plane is in front of the camera
    world = depth_to_points(depth, K, w2c)
    assert world[..., 2].abs().max() < 1e-4  # back-projection itself lands on the plane

    crop_top, crop_left = crop
    crop_h, crop_w = 48, 64
    cropped = depth[crop_top:crop_top + crop_h, crop_left:crop_left + crop_w]
    resized = F.interpolate(cropped[None, None], size=size, mode="nearest")[0, 0]
    K_new = crop_resize_intrinsics(K, crop_top, crop_left, size[0] / crop_h, size[1] / crop_w)
    world_new = depth_to_points(resized, K_new, w2c)

    for i, j in [(0, 0), (size[0] - 1, size[1] - 1), (size[0] // 2, size[1] // 3), (5, 7)]:
        source_i = crop_top + i * crop_h // size[0]
        source_j = crop_left + j * crop_w // size[1]
        assert torch.allclose(world_new[i, j], world[source_i, source_j], atol=1e-4), (i, j)


# ----------------------------------------------------------------------------- rotations and pose encoding


def test_quaternion_of_near_180_degree_rotations_is_accurate():
    angles = [math.pi, math.pi - 1e-4, math.pi - 1e-2, 1e-6, 0.0, 2.0]
    axes = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -2, 3], [-0.3, 0.1, 0.9]]
    rotations = torch.stack([rotation_about(axis, angle) for axis in axes for angle in angles])
    quaternions = rotation_matrix_to_quaternion(rotations)
    assert (quaternions[:, 3] >= 0).all()
    assert torch.allclose(quaternions.norm(dim=-1), torch.ones(len(rotations)), atol=1e-6)
    assert torch.allclose(quaternion_to_rotation_matrix(quaternions), rotations, atol=1e-5)


def test_pose_encoding_round_trip_on_random_cameras():
    generator = torch.Generator().manual_seed(1)
    axes = torch.randn(8, 3, generator=generator).tolist()
    near_half_turns = [rotation_about(axis, math.pi - 1e-3) for axis in axes]
    rotations = torch.cat([random_rotations(64, generator), torch.stack(near_half_turns)]).reshape(8, 9, 3, 3)
    w2c = torch.cat([rotations, torch.randn(8, 9, 3, 1, generator=generator)], dim=-1)
    height, width = 336, 592
    K = intrinsics_to_matrix(torch.tensor([0.8, 1.3, 0.5, 0.5]).expand(8, 9, 4), height, width)

    encoding = pose_encoding_from_cameras(w2c, K, (height, width))
    assert encoding.shape == (8, 9, 9)
    assert (encoding[..., 6] >= 0).all()
    w2c_back, K_back = cameras_from_pose_encoding(encoding, (height, width))
    assert torch.allclose(w2c_back, w2c, atol=1e-5)
    assert torch.allclose(K_back, K, rtol=1e-5)


def test_pose_encoding_of_a_known_camera():
    w2c = torch.tensor([[1.0, 0, 0, 0.5], [0, 1, 0, -2.0], [0, 0, 1, 3.0]])
    height, width = 200, 400
    K = torch.tensor([[200.0, 0, 200], [0, 100.0, 100], [0, 0, 1]])  # 90-degree fov both ways
    encoding = pose_encoding_from_cameras(w2c, K, (height, width))
    expected = [0.5, -2.0, 3.0, 0.0, 0.0, 0.0, 1.0, math.pi / 2, math.pi / 2]
    assert encoding.tolist() == pytest.approx(expected, abs=1e-6)

    # A non-normalised quaternion is normalised; the principal point is the image centre.
    unnormalised = torch.tensor(expected[:3] + [0, 0, 0, 5.0] + expected[7:])
    w2c_back, K_back = cameras_from_pose_encoding(unnormalised, (height, width))
    assert torch.allclose(w2c_back, w2c, atol=1e-6)
    assert torch.allclose(K_back, K, atol=1e-4)


def test_relative_to_first_frame():
    w2c, _ = random_cameras(10, seed=3)
    batched = w2c.reshape(2, 5, 3, 4)
    relative = relative_to_first_frame(batched)
    identity = torch.eye(3, 4).expand(2, 3, 4)
    assert torch.allclose(relative[:, 0], identity, atol=1e-6)
    assert torch.allclose(relative[0], relative_to_first_frame(batched[0]))

    def homogeneous(matrix):
        bottom = torch.tensor([0.0, 0, 0, 1]).expand(matrix.shape[:-2] + (1, 4))
        return torch.cat([matrix, bottom], dim=-2)

    # w2c_rel[t] = w2c[t] @ inverse(w2c[0]) and relative poses between frames 2 and 4 unchanged.
    expected = homogeneous(batched) @ torch.linalg.inv(homogeneous(batched[:, :1]))
    assert torch.allclose(relative, expected[..., :3, :], atol=1e-5)
    pose_before = homogeneous(batched[:, 4]) @ homogeneous(invert_w2c(batched[:, 2]))
    pose_after = homogeneous(relative[:, 4]) @ homogeneous(invert_w2c(relative[:, 2]))
    assert torch.allclose(pose_before, pose_after, atol=1e-5)


# ----------------------------------------------------------------------------- rays


def test_plucker_rays_of_identity_camera():
    height, width = 5, 7
    K = torch.tensor([[10.0, 0, 3.5], [0, 10.0, 2.5], [0, 0, 1]])
    rays = plucker_rays(torch.eye(3, 4), K, height, width)
    assert rays.shape == (6, height, width)
    assert torch.allclose(rays[:3, 2, 3], torch.tensor([0.0, 0.0, 1.0]))  # centre pixel
    assert torch.allclose(rays[3:], torch.zeros(3, height, width))
    assert torch.allclose(rays[:3].norm(dim=0), torch.ones(height, width))
    # Pixel right of centre points right (+x), pixel below points down (+y).
    assert rays[0, 2, 4] > 0 and rays[1, 3, 3] > 0


def test_plucker_rays_of_translated_rotated_cameras():
    w2c, intrinsics = random_cameras(3, seed=5)
    height, width = 6, 8
    K = intrinsics_to_matrix(intrinsics, height, width)
    rays = plucker_rays(w2c, K, height, width)
    assert rays.shape == (3, 6, height, width)
    directions, moments = rays[:, :3], rays[:, 3:]
    assert torch.allclose(directions.norm(dim=1), torch.ones(3, height, width), atol=1e-6)

    centers = invert_w2c(w2c)[..., 3]
    expected_moments = torch.linalg.cross(centers[:, :, None, None].expand_as(directions), directions, dim=1)
    assert torch.allclose(moments, expected_moments, atol=1e-5)
    assert moments.abs().max() > 0.1  # the test would catch a zero moment

    # Each ray passes through the world point back-projected at that pixel (depth 2).
    points = depth_to_points(torch.full((3, height, width), 2.0), K, w2c)
    to_points = points - centers[:, None, None, :]
    expected_directions = (to_points / to_points.norm(dim=-1, keepdim=True)).movedim(-1, 1)
    assert torch.allclose(directions, expected_directions, atol=1e-5)


# ----------------------------------------------------------------------------- scene normalisation


def test_normalize_scene_first_camera_identity_and_unit_mean_norm():
    generator = torch.Generator().manual_seed(7)
    frames, height, width = 3, 4, 6
    w2c, intrinsics = random_cameras(frames, seed=8)
    w2c[..., 3] *= 10.0
    K = intrinsics_to_matrix(intrinsics, height, width)
    depth = torch.rand(frames, height, width, generator=generator) * 20 + 5
    valid = torch.rand(frames, height, width, generator=generator) > 0.3
    depth = torch.where(valid, depth, torch.tensor(float("inf")))  # invalid depth must not leak

    from_depth = normalize_scene(w2c, depth, K, valid)
    assert torch.allclose(from_depth["w2c"][0], torch.eye(3, 4), atol=1e-5)
    assert torch.allclose(from_depth["points"].norm(dim=-1)[valid].mean(), torch.tensor(1.0))
    assert torch.isfinite(from_depth["points"]).all() and torch.isfinite(from_depth["depth"]).all()

    # The normalised cameras, depth and points are consistent with each other.
    reprojected = depth_to_points(from_depth["depth"], K, from_depth["w2c"])
    assert torch.allclose(reprojected[valid], from_depth["points"][valid], atol=1e-4)

    # Given world points, the same result.
    world_points = depth_to_points(torch.where(valid, depth, 1.0), K, w2c)
    from_points = normalize_scene(w2c, depth, K, valid, points=world_points)
    assert torch.allclose(from_points["points"], from_depth["points"], atol=1e-4)
    assert torch.allclose(from_points["scale"], from_depth["scale"], rtol=1e-5)

    with pytest.raises(ValueError, match="no valid"):
        normalize_scene(w2c, depth, K, torch.zeros_like(valid))

    # Overflow is caught, not masked: squared norms of 5e30 overflow float32, so the scale would be inf.
    with pytest.raises(ValueError, match=r"scale .* is inf; it must be finite and > 0"):
        normalize_scene(w2c, depth * 1e30, K, valid)
    first_camera_at_origin = torch.cat([torch.eye(3, 4)[None], w2c[1:]])
    with pytest.raises(ValueError, match=r"scale .* is 0;"):  # every point at the first camera's centre
        normalize_scene(first_camera_at_origin, depth, K, valid, points=torch.zeros_like(world_points))


def test_decoding_a_degenerate_pose_encoding_stays_finite():
    """FoV <= 0 or >= pi and a zero quaternion (what an untrained head can output) decode to usable cameras."""
    height, width = 48, 64
    encoding = torch.tensor([
        [0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],        # zero quaternion, FoV 0 and negative
        [0.0, 0.0, 0.0, 0.0, 0.0, 1e-12, 0.0, math.pi, 4.0],   # near-zero quaternion, FoV pi and beyond
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, math.pi / 2, math.pi / 2],  # an ordinary camera is unchanged
    ], requires_grad=True)
    w2c, K = cameras_from_pose_encoding(encoding, (height, width))
    assert torch.isfinite(w2c).all() and torch.isfinite(K).all()
    assert torch.equal(w2c[:2, :, :3], torch.eye(3).expand(2, 3, 3))
    assert torch.equal(w2c[0, :, 3], torch.tensor([0.1, 0.2, 0.3]))
    focal = torch.stack([K[:, 0, 0], K[:, 1, 1]], dim=-1)
    assert (focal > 0).all()
    narrowest = (height / 2) / math.tan(FOV_EPSILON / 2)
    assert K[0, 1, 1].item() == pytest.approx(narrowest, rel=1e-5)  # FoV 0 -> the narrowest FoV
    assert K[1, 1, 1].item() == pytest.approx((height / 2) * math.tan(FOV_EPSILON / 2), rel=1e-3)  # FoV pi -> the widest
    assert torch.allclose(K[2], torch.tensor([[32.0, 0, 32], [0, 24.0, 24], [0, 0, 1]]), atol=1e-4)
    (w2c.sum() + K.sum()).backward()
    assert torch.isfinite(encoding.grad).all()
    # NaN is not hidden.
    assert torch.isnan(cameras_from_pose_encoding(torch.full((9,), float("nan")), (height, width))[0]).all()
