"""diffsynth.fantasy_world.model.heads: output activations stay finite and trainable everywhere; the camera head sees motion."""
import math

import pytest
import torch

from diffsynth.fantasy_world.model.heads import (
    MAX_LOG_CONFIDENCE,
    MAX_LOG_DEPTH,
    CameraHead,
    activate_confidence,
    activate_positive,
    shifted_correlation,
)
from diffsynth.fantasy_world.train.losses import depth_loss


def test_activations_are_bounded_and_keep_a_gradient_far_out():
    # A hard clamp at exp(15) had zero gradient above it: a head that drifted there stayed pinned
    # (measured: depth loss 2e6). The soft bound keeps values finite and a gradient everywhere.
    logits = torch.tensor([-1e4, -20.0, 0.0, 20.0, 1e4], requires_grad=True)
    depth, confidence = activate_positive(logits), activate_confidence(logits)
    assert torch.isfinite(depth).all() and torch.isfinite(confidence).all()
    assert depth.max() <= math.exp(MAX_LOG_DEPTH) * 1.0001 and depth.min() >= math.exp(-MAX_LOG_DEPTH) * 0.9999
    assert confidence.min() >= 1 and confidence.max() <= (1 + math.exp(MAX_LOG_CONFIDENCE)) * 1.0001
    assert activate_positive(torch.tensor(0.0)).item() == 1.0
    (depth.sum() + confidence.sum()).backward()
    assert (logits.grad[1:4] > 0).all() and logits.grad[3] > 1  # at 20 the old clamp (15) gave exactly 0


def test_a_head_pinned_at_large_outputs_is_pulled_back():
    target = torch.ones(1, 2, 1, 2, 2)
    valid = torch.ones_like(target, dtype=torch.bool)
    depth_logit = torch.full_like(target, 20.0, requires_grad=True)
    confidence_logit = torch.full_like(target, 20.0, requires_grad=True)
    loss = depth_loss(activate_positive(depth_logit), activate_confidence(confidence_logit), target, valid)["depth"]
    assert torch.isfinite(loss)
    loss.backward()
    assert (depth_logit.grad > 0).all() and (confidence_logit.grad > 0).all()  # descent lowers both


def test_camera_head_sees_where_content_moved():
    # Wan tokens carry no absolute position: a camera read from pooled features alone could not tell
    # a static clip from a panning one. The head keeps each latent frame's spatial layout.
    torch.manual_seed(0)
    head = CameraHead(in_dim=32, hidden=64).eval()
    grid = (2, 4, 6)
    first = torch.randn(1, 1, 4, 6, 32)
    static = torch.cat([first, first], dim=1).reshape(1, -1, 32)
    panned = torch.cat([first, first.roll(2, dims=3)], dim=1).reshape(1, -1, 32)  # same tokens, moved
    camera_tokens = torch.randn(1, 1, 32)
    with torch.no_grad():
        still, moved = head(camera_tokens, static, grid), head(camera_tokens, panned, grid)
    assert still.shape == (1, 5, 9)
    assert torch.equal(still[:, 0], moved[:, 0])  # the first frame is the reference either way
    assert (still[:, 1:] - moved[:, 1:]).abs().max() > 1e-3


def test_shifted_correlation_peaks_at_the_motion_whatever_the_content():
    radius = 2
    for seed in (0, 1):
        first = torch.randn(1, 1, 8, 6, 6, generator=torch.Generator().manual_seed(seed))
        moved = torch.zeros_like(first)
        moved[..., 1:, :5] = first[..., :5, 1:]  # content one cell down and one cell left
        correlation = shifted_correlation(torch.cat([first, moved], dim=1), radius)
        assert correlation.shape == (1, 2, (2 * radius + 1) ** 2)
        shifts = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
        assert shifts[int(correlation[0, 0].argmax())] == (0, 0)  # the first frame against itself
        assert correlation[0, 0].max().item() == pytest.approx(1.0, abs=1e-5)
        assert shifts[int(correlation[0, 1].argmax())] == (1, -1)
