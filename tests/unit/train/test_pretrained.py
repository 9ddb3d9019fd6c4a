"""diffsynth.fantasy_world.train.pretrained: the training script's model options, parsed as upstream does."""
import pytest

from diffsynth.fantasy_world.train.pretrained import model_configs_from_options, tokenizer_config


def test_real_weight_options_parse_like_training(tmp_path):
    local = tmp_path / "dit.safetensors"
    configs = model_configs_from_options(f'["{local}"]', "Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth")
    assert [(c.path, c.model_id, c.origin_file_pattern) for c in configs] == [
        (str(local), None, None), (None, "Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth"),
    ]
    with pytest.raises(ValueError, match="--model_paths or --model_id_with_origin_paths"):
        model_configs_from_options(None, None)


def test_tokenizer_config_is_the_local_folder_or_upstreams_default(tmp_path):
    assert (tokenizer_config(None).model_id, tokenizer_config(None).origin_file_pattern) == ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/")
    local = tokenizer_config(tmp_path)
    assert local.path == str(tmp_path) and not local.require_downloading()
    with pytest.raises(FileNotFoundError, match="--tokenizer_path"):
        tokenizer_config(tmp_path / "missing")
