"""diffsynth/fantasy_world/model/rope_real.py: upstream's rotation in the compute dtype, saving only the table."""
import pytest
import torch

from diffsynth.fantasy_world.model.rope import GeometryTokenLayout
from diffsynth.fantasy_world.model.rope_real import apply_rotary, real_rope_table
from diffsynth.models import wan_video_dit

GRID = (2, 3, 4)
HEADS, HEAD_DIM = 3, 32


def video_freqs(grid=GRID):
    """Upstream's complex128 table of a (f, h, w) grid: ``[f*h*w, 1, HEAD_DIM/2]``."""
    f, h, w = grid
    freqs = wan_video_dit.precompute_freqs_cis_3d(HEAD_DIM, end=16)
    return torch.cat([
        freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)


@pytest.mark.parametrize("layout_name", ["global", "per_frame"])
# bf16: inputs up to ~12 have a spacing of 2**-4 there, so one rounding step may differ from upstream's complex128.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -4)])
def test_matches_upstream_on_video_rows_and_is_exactly_identity_on_extra_rows(layout_name, dtype, tolerance):
    layout = GeometryTokenLayout(layout_name, GRID, num_register_tokens=4)
    freqs = layout.extend_freqs(video_freqs())
    x = (3 * torch.randn(2, layout.sequence_length, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(0))).to(dtype)
    out = apply_rotary(x, real_rope_table(freqs, dtype), HEADS)
    assert out.dtype == dtype
    # A wrong channel pairing or sign would be off by O(1), far outside either tolerance.
    torch.testing.assert_close(out, wan_video_dit.rope_apply(x, freqs, HEADS), rtol=tolerance, atol=tolerance)
    x_video, x_extra = layout.split(x)
    out_video, out_extra = layout.split(out)
    assert torch.equal(out_extra, x_extra)
    assert not torch.allclose(out_video, x_video)


def test_extra_rows_of_the_table_are_exactly_cos_1_sin_0():
    layout = GeometryTokenLayout("per_frame", GRID, num_register_tokens=2)
    table = real_rope_table(layout.extend_freqs(video_freqs()), torch.bfloat16)
    assert table.shape == (layout.sequence_length, 1, HEAD_DIM // 2, 2)
    _, extra = layout.split(table.reshape(1, layout.sequence_length, -1))
    assert torch.equal(extra[..., 0::2], torch.ones_like(extra[..., 0::2]))
    assert torch.equal(extra[..., 1::2], torch.zeros_like(extra[..., 1::2]))


def test_gradcheck_in_float64():
    table = real_rope_table(video_freqs((1, 2, 2)), torch.float64)  # small: gradcheck is quadratic in size
    x = torch.randn(1, table.shape[0], 2 * HEAD_DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, table, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: apply_rotary(t, table, 2), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_saves_only_the_table(dtype):
    table = real_rope_table(video_freqs(), dtype)
    x = torch.randn(2, table.shape[0], HEADS * HEAD_DIM, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = apply_rotary(x * 1, table, HEADS)  # x * 1: a non-leaf input, as q/k are in the model
    assert saved and all(t.data_ptr() == table.data_ptr() and t.shape == table.shape for t in saved)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad.dtype == dtype


def test_a_table_in_another_dtype_is_cast_to_the_input_dtype():
    freqs = video_freqs()
    x = torch.randn(1, freqs.shape[0], HEADS * HEAD_DIM, dtype=torch.bfloat16)
    out = apply_rotary(x, real_rope_table(freqs, torch.float32), HEADS)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rotary(x, real_rope_table(freqs, torch.bfloat16), HEADS))
