"""diffsynth/fantasy_world/model/weights.py and export.py: FantasyWorld parameters in safetensors, and upstream loading."""
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.core import load_state_dict
from diffsynth.core.loader.model import load_model
from diffsynth.fantasy_world.tiny.dit_configs import DIT_CONFIGS, build_dit
from diffsynth.fantasy_world.app.export import main as export_main
from diffsynth.fantasy_world.model.weights import (
    export_full_dit,
    fantasy_world_options,
    fantasy_world_state_dict,
    load_fantasy_world_weights,
    save_fantasy_world_weights,
)
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
    options = lambda dit: {k: v for k, v in dit.fantasy_world.config.to_metadata().items() if k != "init_from_video"}  # noqa: E731
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


# ----------------------------------------------------------------------------- whole-DiT files and upstream-style loading


def test_full_export_loads_the_upstream_way_and_through_load_fantasy_world_weights(tmp_path, trained_branch):
    path = tmp_path / "dit_fw.safetensors"
    export_full_dit(trained_branch, path)
    reference = model_fn_wan_video(trained_branch, **INPUTS, return_geometry=True)
    upstream_way = build_dit("tiny", seed=7)  # other base weights: the file must replace them too
    upstream_way.enable_fantasy_world_mode(**fantasy_world_options(path))  # the two lines of weights.py's docstring
    upstream_way.load_state_dict(load_state_dict(str(path)))
    ours = build_dit("tiny", seed=7)
    load_fantasy_world_weights(ours, path)
    for dit in (upstream_way, ours):
        output = model_fn_wan_video(dit, **INPUTS, return_geometry=True)
        assert torch.equal(output[0], reference[0]) and all(torch.equal(output[1][k], reference[1][k]) for k in reference[1])


def test_export_cli_joins_the_base_dit_and_the_branch(tmp_path):
    trained = build_dit("tiny", seed=3)  # the training run's --model_seed 3
    trained.enable_fantasy_world_mode(split_layer=2)
    branch = tmp_path / "fantasy_world.safetensors"
    save_fantasy_world_weights(trained, branch)
    output = tmp_path / "full.safetensors"
    export_main(["--model_source", "tiny", "--model_seed", "3", "--fantasy_world_checkpoint", str(branch), "--output", str(output)])
    assert load_state_dict(str(output)).keys() == trained.state_dict().keys()
    assert all(torch.equal(load_state_dict(str(output))[k], v) for k, v in trained.state_dict().items())


def test_export_cli_loads_real_weights_without_a_tokenizer(tmp_path, monkeypatch, trained_branch):
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    requested = {}

    def fake_from_pretrained(**kwargs):
        requested.update(kwargs)
        pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
        pipe.dit = build_dit("tiny", seed=1)
        return pipe

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    branch = tmp_path / "fantasy_world.safetensors"
    save_fantasy_world_weights(trained_branch, branch)
    output = tmp_path / "full.safetensors"
    export_main(["--model_paths", '["dit.safetensors"]', "--fantasy_world_checkpoint", str(branch), "--output", str(output)])
    assert [c.path for c in requested["model_configs"]] == ["dit.safetensors"] and requested["tokenizer_config"] is None
    assert all(torch.equal(load_state_dict(str(output))[k], v) for k, v in trained_branch.state_dict().items())


@pytest.mark.parametrize("strict", [True, False])
def test_branch_only_file_loaded_the_upstream_way_into_a_plain_dit_is_refused(tmp_path, trained_branch, strict):
    path = tmp_path / "fantasy_world.safetensors"
    save_fantasy_world_weights(trained_branch, path)
    with pytest.raises(ValueError, match=r"only FantasyWorld branch tensors.*load_fantasy_world_weights.*diffsynth\.fantasy_world\.export"):
        build_dit("tiny").load_state_dict(load_state_dict(str(path)), strict=strict)


def test_a_dit_with_the_mode_takes_branch_tensors_alone(trained_branch):
    """What resuming does (strict=False): the branch loads, the base stays."""
    other = build_dit("tiny", seed=1)
    other.enable_fantasy_world_mode(token_layout="per_frame", split_layer=3, init_from_video=False)
    other.load_state_dict(fantasy_world_state_dict(trained_branch), strict=False)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in trained_branch.state_dict().items())


@pytest.mark.parametrize("strict", [True, False])
def test_branch_tensors_into_a_dit_without_the_mode_are_refused(tmp_path, trained_branch, strict):
    plain = build_dit("tiny")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=r"no FantasyWorld mode.*load_fantasy_world_weights"):
        plain.load_state_dict(trained_branch.state_dict(), strict=strict)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())  # refused before anything was copied


def test_the_check_reads_keys_under_the_wrappers_prefix(trained_branch):
    """A DiT inside a training module (``pipe.dit.``): the same refusal; plain Wan keys still load."""
    wrapper = torch.nn.Module()
    wrapper.dit = build_dit("tiny")
    branch_only = {"dit." + k: v for k, v in fantasy_world_state_dict(trained_branch).items()}
    with pytest.raises(ValueError, match="only FantasyWorld branch tensors"):
        wrapper.load_state_dict(branch_only, strict=False)
    plain = {"dit." + k: v for k, v in build_dit("tiny", seed=5).state_dict().items()}
    wrapper.load_state_dict(plain)
    assert torch.equal(wrapper.dit.head.head.weight, plain["dit.head.head.weight"])


def test_plain_wan_state_dicts_still_load_strict_and_partial():
    source, target = build_dit("tiny", seed=2), build_dit("tiny", seed=4)
    target.load_state_dict(source.state_dict())
    target.load_state_dict({"head.head.bias": torch.zeros_like(source.head.head.bias)}, strict=False)
    assert torch.equal(target.blocks[0].self_attn.q.weight, source.blocks[0].self_attn.q.weight)
    assert not target.head.head.bias.any()
