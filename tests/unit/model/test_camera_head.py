"""diffsynth/fantasy_world/model/camera_head.py: the motion-reading camera head."""
import pytest
import torch

from diffsynth.fantasy_world.model.camera_head import (
    REFINEMENT_PASSES,
    MotionCameraHead,
    MAX_COST_VOLUME_SIDE,
    local_cost_volume,
    mirror_pose_encoding,
    pooled_for_cost_volume,
)
from diffsynth.fantasy_world.geometry.camera import pose_encoding_from_cameras, quaternion_to_rotation_matrix

LATENT_CHANNELS = 16
TOKEN_DIM = 32


@pytest.fixture
def head() -> MotionCameraHead:
    """A head whose update layer is random (it starts at zero: every output would be the initial pose)."""
    torch.manual_seed(0)
    head = MotionCameraHead(TOKEN_DIM, LATENT_CHANNELS, hidden=64).eval()
    with torch.no_grad():
        head.update.weight.normal_(std=0.3)
        head.update.bias.normal_(std=0.3)
    return head


def moving_latents(frames: int = 4, shift: int = 1, size: int = 8) -> torch.Tensor:
    """``[1, 16, frames, size, size]``: one random latent frame translated by ``shift`` cells per frame."""
    base = torch.randn(1, LATENT_CHANNELS, 1, size + frames * abs(shift), size + frames * abs(shift))
    return torch.cat([base[..., :size, k * shift if shift >= 0 else -k * shift:][..., :size] for k in range(frames)], dim=2)


def test_the_cost_volume_peaks_at_the_motion_whatever_the_content():
    torch.manual_seed(1)
    radius = 2
    for dy, dx in [(0, 0), (1, -2), (-2, 1)]:
        first = torch.randn(3, 8, 10, 10)
        second = torch.roll(first, shifts=(dy, dx), dims=(-2, -1))
        cost = local_cost_volume(first, second, radius)
        assert cost.shape == (3, 25, 10, 10)
        interior = cost[..., 2:-2, 2:-2]
        assert (interior.argmax(dim=1) == (dy + radius) * 5 + (dx + radius)).all()


def test_the_first_frame_is_the_identity_and_every_pass_is_returned(head):
    camera, passes = head(torch.randn(2, 1, TOKEN_DIM), torch.randn(2, LATENT_CHANNELS, 3, 8, 8))
    assert camera.shape == (2, 9, 9) and passes.shape == (2, REFINEMENT_PASSES, 9, 9)
    assert torch.equal(passes[:, -1], camera)
    assert torch.equal(camera[:, 0, :7], torch.tensor([0.0, 0, 0, 0, 0, 0, 1]).expand(2, 7))
    assert not torch.allclose(passes[:, 0], passes[:, -1])  # each pass updates the estimate


def test_a_static_clip_gives_every_frame_the_same_camera(head):
    # No input-independent path: without motion, nothing tells the frames apart (a frame-index
    # embedding, or motion tokens that are not zero for an unmoved frame, would).
    still = torch.randn(1, LATENT_CHANNELS, 1, 8, 8).expand(-1, -1, 4, -1, -1)
    camera, _ = head(torch.randn(1, 1, TOKEN_DIM), still)
    latent_frame_cameras = camera[0, 4::4]  # the last video frame of latent frames 1..3
    assert torch.allclose(latent_frame_cameras, latent_frame_cameras[:1].expand_as(latent_frame_cameras), atol=1e-6)


def test_the_cameras_follow_the_motion_of_the_latents(head):
    tokens = torch.randn(1, 1, TOKEN_DIM)
    to_the_right, _ = head(tokens, moving_latents(shift=1))
    to_the_left, _ = head(tokens, moving_latents(shift=-1))
    assert (to_the_right[0, 1:] - to_the_left[0, 1:]).abs().max() > 1e-2


def test_a_mirrored_clip_gives_exactly_the_mirrored_cameras(head):
    tokens, latents = torch.randn(2, 1, TOKEN_DIM), torch.randn(2, LATENT_CHANNELS, 3, 8, 8)
    camera, passes = head(tokens, latents)
    mirrored_camera, mirrored_passes = head(tokens, latents.flip(-1))
    assert torch.allclose(mirrored_camera, mirror_pose_encoding(camera), atol=1e-5)
    assert torch.allclose(mirrored_passes, mirror_pose_encoding(passes), atol=1e-5)
    assert (camera[..., 4] - mirrored_camera[..., 4]).abs().max() > 1e-3  # the yaw part changes sign, not zero


def test_the_mirror_of_a_pose_encoding_is_that_of_the_reflected_camera():
    torch.manual_seed(2)
    quaternion = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    w2c = torch.cat([quaternion_to_rotation_matrix(quaternion), torch.randn(5, 3, 1)], dim=-1)
    K = torch.tensor([[40.0, 0, 32], [0, 40, 32], [0, 0, 1]]).expand(5, 3, 3)
    reflection = torch.diag(torch.tensor([-1.0, 1, 1]))
    mirrored = torch.cat([reflection @ w2c[..., :3] @ reflection, reflection @ w2c[..., 3:]], dim=-1)
    expected = pose_encoding_from_cameras(mirrored, K, (64, 64))
    got = mirror_pose_encoding(pose_encoding_from_cameras(w2c, K, (64, 64)))
    sign = torch.where(got[:, 6:7] * expected[:, 6:7] < 0, -1.0, 1.0)  # q and -q are one rotation
    assert torch.allclose(got[:, 3:7] * sign, expected[:, 3:7], atol=1e-5)
    assert torch.allclose(got[:, :3], expected[:, :3], atol=1e-6) and torch.allclose(got[:, 7:], expected[:, 7:])


def test_the_scene_tokens_reach_the_cameras(head):
    latents = moving_latents()
    first, _ = head(torch.randn(1, 1, TOKEN_DIM), latents)
    second, _ = head(torch.randn(1, 1, TOKEN_DIM), latents)
    assert (first - second).abs().max() > 1e-3


def test_large_latents_are_pooled_before_the_cost_volume(head):
    small = torch.randn(2, LATENT_CHANNELS, 8, 12)
    assert pooled_for_cost_volume(small) is small
    large = torch.randn(2, LATENT_CHANNELS, 60, 104)  # a 480x832 clip's latents: blocks of 7x7 cells
    pooled = pooled_for_cost_volume(large)
    assert pooled.shape == (2, LATENT_CHANNELS, 9, 15) and max(pooled.shape[-2:]) <= MAX_COST_VOLUME_SIDE
    assert torch.allclose(pooled[..., 0, 0], large[..., :7, :7].mean(dim=(-2, -1)), atol=1e-6)
    camera, _ = head(torch.randn(1, 1, TOKEN_DIM), large[:1, :, None].expand(-1, -1, 2, -1, -1))
    assert camera.shape == (1, 5, 9) and torch.isfinite(camera).all()
