"""diffsynth/fantasy_world/config.py: the one place of the branch's options, defaults and checks."""
import argparse
import dataclasses
import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.fantasy_world.config import (
    FantasyWorldConfig,
    add_config_arguments,
    default_of,
    given_options,
    option_names,
)
from diffsynth.fantasy_world.model.branch import FantasyWorldBranch
from diffsynth.fantasy_world.model.weights import CONFIG_KEY, fantasy_world_state_dict, load_fantasy_world_weights
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.train.args import build_parser

# The metadata a stage-1 run of the tiny model wrote before the config existed (a plain dict).
OLD_TINY_METADATA = {
    "split_layer": 2, "token_layout": "global", "num_register_tokens": 4, "geo_dim": 64, "heads": ["depth", "points", "camera"],
    "cross_attn_heads": 1, "camera_condition": "plucker", "camera_adapter_blocks": [1], "init_from_video": True,
    "head_features": 128, "head_resolution_factor": 1, "camera_hidden": 256,
}


def test_every_option_has_a_doc_and_the_branch_takes_no_option_of_its_own():
    for option in dataclasses.fields(FantasyWorldConfig):
        assert option.metadata["doc"], option.name
    assert list(inspect.signature(FantasyWorldBranch.__init__).parameters) == ["self", "dit", "config"]


def test_resolving_fills_the_defaults_derived_from_the_dit():
    resolved = FantasyWorldConfig().resolve(num_layers=30, dim=1536, num_heads=12)
    assert (resolved.split_layer, resolved.geo_dim, resolved.cross_attn_heads, resolved.camera_adapter_blocks) == (12, 1536, 3, (11,))
    assert FantasyWorldConfig(split_layer=0).resolve(5, 64, 2).camera_adapter_blocks == ()
    assert FantasyWorldConfig(split_layer=3, camera_adapter_blocks=[0, 2]).resolve(5, 64, 2).camera_adapter_blocks == (0, 2)


@pytest.mark.parametrize("options, message", [
    (dict(token_layout="diagonal"), "token_layout must be one of"),
    (dict(num_register_tokens=-1), "num_register_tokens must be >= 0"),
    (dict(heads=("depth", "normals")), "heads must be a non-empty subset"),
    (dict(heads=()), "heads must be a non-empty subset"),
    (dict(camera_condition="rays"), "camera_condition must be one of"),
    (dict(head_resolution_factor=0), "must be >= 1"),
    (dict(camera_head="histogram"), "camera_head must be one of"),
])
def test_a_bad_option_is_refused_with_its_name(options, message):
    with pytest.raises(ValueError, match=message):
        FantasyWorldConfig(**options)


@pytest.mark.parametrize("options, message", [
    (dict(split_layer=5), r"split_layer must be in \[0, 4\]"),
    (dict(geo_dim=48), "must be a multiple of the DiT head dim 32"),
    (dict(geo_dim=96), "init_from_video needs geo_dim == the DiT width 64"),
    (dict(camera_adapter_blocks=(7,)), r"camera_adapter_blocks \[7\] are outside"),
])
def test_options_the_dit_constrains_are_checked_against_it(options, message):
    with pytest.raises(ValueError, match=message):
        FantasyWorldConfig(**options).resolve(num_layers=5, dim=64, num_heads=2)


def test_metadata_round_trips_and_reads_files_written_before_the_config(tmp_path):
    # A file written before camera_head existed holds the correlation head: that is what it means.
    old_config = FantasyWorldConfig.from_metadata(OLD_TINY_METADATA)
    assert old_config.camera_head == "correlation" and default_of("camera_head") == "motion"
    assert old_config.to_metadata() == OLD_TINY_METADATA | {"camera_head": "correlation"}
    dit = build_dit("tiny")
    dit.enable_fantasy_world_mode(camera_head="correlation")
    assert dit.fantasy_world.config.to_metadata() == OLD_TINY_METADATA | {"camera_head": "correlation"}
    old_file = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in fantasy_world_state_dict(dit).items()}, str(old_file),
              {CONFIG_KEY: json.dumps(OLD_TINY_METADATA)})
    fresh = build_dit("tiny")
    load_fantasy_world_weights(fresh, old_file)
    # init_from_video is off for a loaded branch: the file's weights replace the initialisation.
    assert fresh.fantasy_world.config == FantasyWorldConfig.from_metadata(dict(OLD_TINY_METADATA, init_from_video=False))
    assert type(fresh.fantasy_world.camera_head).__name__ == "CameraHead"
    older = {k: v for k, v in OLD_TINY_METADATA.items() if k != "camera_hidden"}  # an option the file predates
    assert FantasyWorldConfig.from_metadata(older).camera_hidden == default_of("camera_hidden")


def test_a_new_file_keeps_its_camera_head_and_new_branches_get_the_motion_head(tmp_path):
    dit = build_dit("tiny")
    dit.enable_fantasy_world_mode()
    assert type(dit.fantasy_world.camera_head).__name__ == "MotionCameraHead"
    path = tmp_path / "new.safetensors"
    save_file({k: v.contiguous() for k, v in fantasy_world_state_dict(dit).items()}, str(path),
              {CONFIG_KEY: json.dumps(dit.fantasy_world.config.to_metadata())})
    fresh = build_dit("tiny")
    load_fantasy_world_weights(fresh, path)
    assert fresh.fantasy_world.config.camera_head == "motion"
    for name, value in fantasy_world_state_dict(dit).items():
        assert torch.equal(fantasy_world_state_dict(fresh)[name], value), name


def test_an_option_this_version_does_not_know_is_named():
    with pytest.raises(ValueError, match=r"run/fantasy_world.safetensors stores FantasyWorld options .*\['mystery'\]"):
        FantasyWorldConfig.from_metadata(dict(OLD_TINY_METADATA, mystery=1), "run/fantasy_world.safetensors")


def test_command_line_options_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert {action.dest for action in parser._actions} - {"help"} == set(option_names(cli_only=True))
    args = parser.parse_args(["--split_layer", "3", "--camera_condition", "none", "--camera_adapter_blocks", "0,2",
                              "--token_layout", "per_frame"])
    assert given_options(args) == dict(split_layer=3, camera_condition=None, camera_adapter_blocks=(0, 2), token_layout="per_frame")
    assert given_options(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--token_layout", "diagonal"])
    # The training script's help shows the config's default, not a copy of it.
    help_text = " ".join(build_parser().format_help().split())
    assert f"register tokens beside each camera token (default: {default_of('num_register_tokens')})" in help_text.lower()
