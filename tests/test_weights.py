"""diffsynth/fantasy_world/weights.py: FantasyWorld parameters in safetensors, and upstream loading."""
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.core.loader.model import load_model
from diffsynth.fantasy_world.configs import DIT_CONFIGS, build_dit
from diffsynth.fantasy_world.weights import fantasy_world_state_dict, load_fantasy_world_weights, save_fantasy_world_weights
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.pipelines.wan_video import model_fn_wan_video

INPUTS = dict(latents=torch.randn(1, 16, 2, 4, 4), timestep=torch.tensor([500.0]), context=torch.randn(1, 3, 32))


@pytest.fixture
def trained_branch():
    dit = build_dit("tiny", seed=1)
    dit.enable_fantasy_world_mode(token_layout="per_frame", split_layer=3)
    with torch.no_grad():  # stand-in for training: every parameter moves away from its initialisation
        for parameter in dit.fantasy_world.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return dit


def test_save_load_round_trip_is_exact(tmp_path, trained_branch):
    path = tmp_path / "fw.safetensors"
    save_fantasy_world_weights(trained_branch, path)
    other = build_dit("tiny", seed=1)
    load_fantasy_world_weights(other, path)  # enables the mode from the options stored in the file
    options = lambda dit: {k: v for k, v in dit.fantasy_world.config.items() if k != "init_from_video"}  # noqa: E731
    assert options(other) == options(trained_branch)
    saved, loaded = fantasy_world_state_dict(trained_branch), fantasy_world_state_dict(other)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    a = model_fn_wan_video(trained_branch, **INPUTS, return_geometry=True)
    b = model_fn_wan_video(other, **INPUTS, return_geometry=True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_wrong_keys_and_shapes_are_named(tmp_path, trained_branch):
    tensors = fantasy_world_state_dict(trained_branch)
    tensors.pop("fantasy_world.camera_token")
    tensors["fantasy_world.not_a_layer.weight"] = torch.zeros(2)
    tensors["fantasy_world.geo_projector.bias"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(ValueError) as error:
        load_fantasy_world_weights(trained_branch, path)
    message = str(error.value)
    assert "missing keys: fantasy_world.camera_token" in message
    assert "unexpected keys: fantasy_world.not_a_layer.weight" in message
    assert "fantasy_world.geo_projector.bias (checkpoint (3,), model (64,))" in message


def test_upstream_loader_then_enable_then_restore(tmp_path, trained_branch):
    """Upstream builds on the meta device and loads strictly; the mode is enabled afterwards."""
    base = build_dit("tiny", seed=1)
    base_path = tmp_path / "wan.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    loaded = load_model(WanModel, str(base_path), config=DIT_CONFIGS["tiny"], torch_dtype=torch.float32, device="cpu")
    reference = model_fn_wan_video(loaded, **INPUTS)
    loaded.enable_fantasy_world_mode(token_layout="per_frame", split_layer=3)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(model_fn_wan_video(loaded, **INPUTS), reference)
    fw_path = tmp_path / "fw.safetensors"
    save_fantasy_world_weights(trained_branch, fw_path)
    load_fantasy_world_weights(loaded, fw_path)
    for key, value in fantasy_world_state_dict(trained_branch).items():
        assert torch.equal(loaded.state_dict()[key], value), key
