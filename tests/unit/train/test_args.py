"""diffsynth/fantasy_world/train/args.py: option validation and where the branch's architecture comes from."""
import re

import pytest

from diffsynth.fantasy_world.train import args as training_args
from diffsynth.fantasy_world.train.loop import run_training
from diffsynth.fantasy_world.config import FantasyWorldConfig
from diffsynth.fantasy_world.train.args import branch_config, build_parser

VALID_ARGV = ["--dataset_base_path", "data", "--height", "32", "--width", "48", "--num_frames", "9", "--model_source", "tiny"]


@pytest.mark.parametrize("extra, message", [
    (["--dataset_repeat", "0"], r"--dataset_repeat 0: must be >= 1"),
    (["--max_steps", "0"], r"--max_steps 0: must be >= 1 when given"),
    (["--save_steps", "0"], r"--save_steps 0: must be >= 1 when given"),
    (["--batch_size", "0"], r"--batch_size 0: must be >= 1"),
    (["--keep_checkpoints", "0"], r"--keep_checkpoints 0: must be >= 1"),
    (["--keep_checkpoints", "-1"], r"--keep_checkpoints -1: must be >= 1"),
    (["--dataset_num_workers", "-1"], r"--dataset_num_workers -1: must be >= 0"),
    (["--geometry_checkpointing", "every_k"], r"--geometry_checkpointing every_k: every_k needs its k"),
    (["--height", "50"], r"--height 50: must be a positive multiple of 16 .*round it up to 64"),
    (["--width", "-16"], r"--width -16: must be a positive multiple of 16"),
    (["--num_frames", "8"], r"--num_frames 8: must be 4k\+1"),
])
def test_bad_options_are_refused_at_parse_time(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        training_args.parse_args(VALID_ARGV + extra)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    # Namespaces built in code are checked by run_training before anything is read or written.
    args = build_parser().parse_args(VALID_ARGV + extra + ["--output_path", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=message):
        run_training(args)
    assert not (tmp_path / "run").exists()


def test_every_bad_option_is_named_in_one_message():
    args = build_parser().parse_args(VALID_ARGV + ["--dataset_repeat", "0", "--max_steps", "0"])
    with pytest.raises(ValueError, match=r"--dataset_repeat 0.*\n.*--max_steps 0"):
        training_args.validate_training_args(args)
    assert training_args.parse_args(VALID_ARGV).height == 32


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ValueError, match=r"--output_path .*run: is an existing file, not a folder"):
        run_training(build_parser().parse_args(VALID_ARGV + ["--output_path", str(tmp_path / "run")]))


def test_more_workers_than_cores_are_capped_with_a_warning(monkeypatch):
    monkeypatch.setattr(training_args.os, "cpu_count", lambda: 2)
    with pytest.warns(UserWarning, match=r"--dataset_num_workers 48 is more than the 2 CPU cores; using 2"):
        args = training_args.parse_args(VALID_ARGV + ["--dataset_num_workers", "48"])
    assert args.dataset_num_workers == 2


def test_branch_options_come_from_the_command_line_or_the_config_defaults():
    assert branch_config(build_parser().parse_args(VALID_ARGV)) == FantasyWorldConfig()
    given = branch_config(build_parser().parse_args(VALID_ARGV + ["--split_layer", "1", "--camera_condition", "none",
                                                                  "--camera_adapter_blocks", "0"]))
    assert given == FantasyWorldConfig(split_layer=1, camera_condition=None, camera_adapter_blocks=(0,))


def test_a_checkpoint_defines_the_branch_and_a_disagreeing_option_is_refused():
    stored = FantasyWorldConfig(split_layer=2, token_layout="per_frame").to_metadata()
    args = build_parser().parse_args(VALID_ARGV + ["--fantasy_world_checkpoint", "stage1.safetensors"])
    assert branch_config(args, stored) == FantasyWorldConfig(split_layer=2, token_layout="per_frame")  # not the defaults
    args = build_parser().parse_args(VALID_ARGV + ["--fantasy_world_checkpoint", "stage1.safetensors", "--split_layer", "3",
                                                   "--token_layout", "per_frame"])
    with pytest.raises(ValueError, match=r"stage1\.safetensors defines the branch's architecture.*--split_layer 3 \(the checkpoint has 2\)") as error:
        branch_config(args, stored)
    assert "token_layout" not in str(error.value)  # the same value is not a conflict
