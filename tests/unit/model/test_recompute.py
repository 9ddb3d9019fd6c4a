"""diffsynth/fantasy_world/model/recompute.py: the geometry checkpointing policy and its command-line spelling."""
import pytest

from diffsynth.fantasy_world.model.recompute import GeometryCheckpointing


@pytest.mark.parametrize("spec, layers", [("all", [0, 1, 2, 3, 4]), ("every_k:2", [0, 2, 4]), ("every_k:3", [0, 3]), ("none", [])])
def test_policy_picks_the_layers(spec, layers):
    policy = GeometryCheckpointing.parse(spec)
    assert [i for i in range(5) if policy.checkpoints(i)] == layers


def test_every_k_1_is_all():
    assert all(GeometryCheckpointing.parse("every_k:1").checkpoints(i) for i in range(4))


@pytest.mark.parametrize("spec, message", [
    ("some", "must be one of"), ("every_k", "needs its k"), ("every_k:x", "needs its k"),
    ("every_k:0", "k >= 1"), ("all:2", "only every_k takes a value"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        GeometryCheckpointing.parse(spec)
