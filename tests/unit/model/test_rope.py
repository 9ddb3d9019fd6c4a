"""diffsynth/fantasy_world/model/rope.py: identity rotation for extra tokens, on every forward path."""
import pytest
import torch

from diffsynth.fantasy_world.model import rope_real
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.model.rope import GeometryTokenLayout, extend_freqs_for_extra_tokens
from diffsynth.models import wan_video_dit
from diffsynth.pipelines.wan_video import model_fn_wan_video

GRID = (2, 3, 4)


def video_table(dit, grid):
    f, h, w = grid
    return torch.cat([
        dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)


@pytest.fixture(scope="module")
def dit():
    return build_dit("tiny")


@pytest.mark.parametrize("layout_name", ["global", "per_frame"])
def test_extra_tokens_are_not_rotated_and_video_tokens_keep_their_rotation(dit, layout_name):
    layout = GeometryTokenLayout(layout_name, GRID, num_register_tokens=4)
    freqs = video_table(dit, GRID)
    table = extend_freqs_for_extra_tokens(freqs, layout)
    assert table.shape[0] == 24 + layout.num_extra_tokens
    heads, head_dim = 2, 32
    q = torch.randn(3, layout.sequence_length, heads * head_dim)
    rotated = wan_video_dit.rope_apply(q, table, heads)
    q_video, q_extra = layout.split(q)
    out_video, out_extra = layout.split(rotated)
    torch.testing.assert_close(out_extra, q_extra, rtol=0, atol=1e-6)  # zeros as padding would erase these rows
    torch.testing.assert_close(out_video, wan_video_dit.rope_apply(q_video, freqs, heads), rtol=0, atol=0)
    assert not torch.equal(out_video, q_video)  # the video rows really are rotated


def test_per_frame_layout_puts_special_tokens_before_each_frame():
    layout = GeometryTokenLayout("per_frame", GRID, num_register_tokens=2)
    video = torch.arange(24.0).view(1, 24, 1)
    special = -torch.ones(1, 2, 3, 1)
    sequence = layout.insert(video, special)[0, :, 0]
    assert sequence[:3].tolist() == [-1, -1, -1] and sequence[3:15].tolist() == list(range(12))
    assert sequence[15:18].tolist() == [-1, -1, -1] and sequence[18:].tolist() == list(range(12, 24))


def test_table_shorter_than_video_tokens_names_the_counts(dit):
    layout = GeometryTokenLayout("global", GRID, num_register_tokens=4)
    with pytest.raises(ValueError, match=r"23 rows .* 24 video tokens .* 5 extra tokens"):
        extend_freqs_for_extra_tokens(video_table(dit, GRID)[:23], layout)


def test_geo_block_refuses_an_unextended_table(dit):
    from diffsynth.models.wan_video_dit import GeoDiTBlock

    block = GeoDiTBlock(False, 64, 2, 128)
    table = rope_real.real_rope_table(video_table(dit, GRID), torch.float32)
    with pytest.raises(ValueError, match=r"24 rows but the sequence has 29 tokens"):
        block(torch.randn(1, 29, 64), torch.randn(1, 3, 64), torch.randn(1, 6, 64), table)


@pytest.mark.parametrize("layout_name", ["global", "per_frame"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_geometry_rope_call_uses_identity_for_extra_tokens(monkeypatch, layout_name, checkpointing):
    """Through model_fn: each rotation of the geometry stream leaves extra rows exactly as they came in,
    rotates video rows as upstream's complex ``rope_apply`` would, and upstream's is never used for it."""
    dit = build_dit("tiny")
    dit.enable_fantasy_world_mode(token_layout=layout_name, split_layer=2)
    latents = torch.randn(1, 16, 2, 6, 8)
    layout = GeometryTokenLayout(layout_name, GRID, 4)
    original, upstream = rope_real.apply_rotary, wan_video_dit.rope_apply
    seen, upstream_lengths = [], []

    def recording_apply_rotary(x, table, num_heads):
        out = original(x, table, num_heads)
        if x.shape[1] == layout.sequence_length:
            seen.append(table.shape[0])
            x_video, x_extra = layout.split(x)
            out_video, out_extra = layout.split(out)
            assert torch.equal(out_extra, x_extra)  # zeros as padding would erase these rows
            torch.testing.assert_close(out_video, upstream(x_video, video_table(dit, GRID), num_heads), rtol=1e-5, atol=1e-6)
        return out

    def recording_rope_apply(x, freqs, num_heads):
        upstream_lengths.append(x.shape[1])
        return upstream(x, freqs, num_heads)

    monkeypatch.setattr(rope_real, "apply_rotary", recording_apply_rotary)
    monkeypatch.setattr(wan_video_dit, "rope_apply", recording_rope_apply)
    context = torch.randn(1, 5, 32)
    _, geometry = model_fn_wan_video(
        dit, latents=latents.requires_grad_(checkpointing), timestep=torch.tensor([300.0]), context=context,
        return_geometry=True, use_gradient_checkpointing=checkpointing,
    )
    sum(v.sum() for v in geometry.values()).backward()  # recomputation under checkpointing is checked too
    # 3 geometry blocks: self-attention q,k + cross-attention q (geo side) + k (geo side) each.
    assert len(seen) >= 3 * 4
    assert set(seen) == {layout.sequence_length}
    assert upstream_lengths and set(upstream_lengths) == {24}  # only the video blocks use upstream's rotation
