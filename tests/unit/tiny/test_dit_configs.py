"""diffsynth/fantasy_world/tiny/dit_configs.py: every named configuration is one upstream's RoPE can run."""
import pytest
import torch

from diffsynth.fantasy_world.tiny.dit_configs import DIT_CONFIGS, build_dit
from diffsynth.models.wan_video_dit import precompute_freqs_cis_3d


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_rope_tables_cover_the_head_dim(name):
    config = DIT_CONFIGS[name]
    head_dim = config["dim"] // config["num_heads"]
    assert sum(table.shape[1] for table in precompute_freqs_cis_3d(head_dim)) * 2 == head_dim


def test_build_dit_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_dit("tiny", seed=3), build_dit("tiny", seed=3)
    assert torch.rand(1) == expected_next
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="unknown DiT configuration"):
        build_dit("huge")
