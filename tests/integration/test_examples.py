"""examples/wanvideo/model_training: the launch scripts and accelerate configs, checked without running them.

Each script runs with a stub ``accelerate`` on PATH that records its arguments, so the checks see
the options exactly as bash expands them: they parse as the trainer's, the files they name exist,
and every model file is one upstream downloads as named (nothing that its redirect would replace).
"""
import ast
import inspect
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch.nn as nn
from accelerate.commands.config.config_args import ClusterConfig

from diffsynth.fantasy_world.train.args import build_parser, validate_training_args
from diffsynth.models import wan_video_dit
from diffsynth.pipelines.wan_video import WanVideoPipeline

from conftest import REPO_ROOT

TRAINING = REPO_ROOT / "examples/wanvideo/model_training"
SCRIPTS = sorted(TRAINING.rglob("*fantasy_world*.sh"))  # ours: an upstream checkout holds its own scripts beside them
SMOKE = TRAINING / "full/test_fantasy_world_training.sh"  # runs python itself; test_smoke.py runs it
LAUNCH_SCRIPTS = [script for script in SCRIPTS if script != SMOKE]
SPLIT = TRAINING / "special/split_training"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors"


def script_id(script: Path) -> str:
    return str(script.relative_to(TRAINING))


def upstream_redirects() -> dict[str, tuple[str, str]]:
    """The table inside ``WanVideoPipeline.from_pretrained``: origin file -> (model id, file) it downloads instead."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(WanVideoPipeline.from_pretrained)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "redirect_dict" for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("WanVideoPipeline.from_pretrained has no redirect_dict any more: update this test")


def launch(script: Path, tmp_path: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """Run ``script`` with a recording ``accelerate``: (launcher options, trainer options as {--name: value})."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "accelerate"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGS_FILE"\n')
    stub.chmod(0o755)
    record = tmp_path / "args"
    environment = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGS_FILE": str(record)}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = record.read_text().split("\0")[:-1]
    assert args[0] == "launch"
    trainer = next(i for i, arg in enumerate(args) if arg.endswith("train_fantasy_world.py"))
    assert Path(args[trainer]).is_file()
    options, name = {}, None
    for arg in args[trainer + 1:]:
        if arg.startswith("--"):
            name = arg
            options[name] = ""
        else:
            options[name] = arg
    parsed = build_parser().parse_args(args[trainer + 1:])  # an unknown option or bad choice exits here
    validate_training_args(parsed)
    return args[1:trainer], options


def model_entries(options: dict[str, str]) -> list[tuple[str, str]]:
    return [tuple(entry.split(":", 1)) for entry in options["--model_id_with_origin_paths"].split(",")]


@pytest.mark.parametrize("script", SCRIPTS, ids=script_id)
def test_script_is_strict_bash_with_a_header(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# "), "shebang, then a header comment"
    assert "set -euo pipefail" in lines
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=script_id)
def test_launch_options_parse_and_name_files_upstream_downloads(script, tmp_path):
    launcher, options = launch(script, tmp_path)
    if "--config_file" in launcher:
        assert Path(launcher[launcher.index("--config_file") + 1]).is_file()
    redirects = upstream_redirects()
    targets = {model_id: set() for model_id, _ in redirects.values()}
    for model_id, file in redirects.values():
        targets[model_id].add(file)
    for model_id, pattern in model_entries(options):
        assert pattern not in redirects, f"{model_id}:{pattern}: upstream downloads {redirects[pattern]} instead"
        assert pattern in targets.get(model_id, {pattern}), f"{model_id} holds only {sorted(targets[model_id])}"
    assert model_entries(options)[0][1] == "diffusion_pytorch_model*.safetensors"  # the DiT comes first, from its own repo


def test_split_training_pair_shares_its_cache_and_trains_with_the_dit_only(tmp_path):
    _, process = launch(SPLIT / "fantasy_world_data_process.sh", tmp_path)
    _, train = launch(SPLIT / "fantasy_world_train.sh", tmp_path)
    assert process["--task"] == "data_process" and train["--task"] == "train"
    assert train["--dataset_base_path"] == process["--output_path"]
    assert all(process[size] == train[size] for size in ("--height", "--width", "--num_frames"))
    assert "--tokenizer_path" not in process  # upstream's download unless TOKENIZER_PATH is set
    assert [file for _, file in model_entries(process)] == [
        "diffusion_pytorch_model*.safetensors", "models_t5_umt5-xxl-enc-bf16.safetensors", "Wan2.1_VAE.safetensors",
    ]
    assert [file for _, file in model_entries(train)] == ["diffusion_pytorch_model*.safetensors"]


def test_data_process_takes_a_local_tokenizer_and_adds_clip_for_i2v(tmp_path):
    _, process = launch(SPLIT / "fantasy_world_data_process.sh", tmp_path,
                        TOKENIZER_PATH="/models/umt5-xxl", MODEL="Wan-AI/Wan2.1-I2V-14B-480P")
    assert process["--tokenizer_path"] == "/models/umt5-xxl"
    assert model_entries(process)[0] == ("Wan-AI/Wan2.1-I2V-14B-480P", "diffusion_pytorch_model*.safetensors")
    assert model_entries(process)[-1][1] == CLIP_FILE


def test_14b_i2v_script_uses_zero3_with_cpu_offload_and_clip(tmp_path):
    launcher, options = launch(TRAINING / "full/train_fantasy_world_14B_I2V_stage1.sh", tmp_path)
    config = ClusterConfig.from_yaml_file(launcher[launcher.index("--config_file") + 1])
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision == "bf16" and config.num_processes == 8
    assert config.deepspeed_config["zero_stage"] == 3
    assert config.deepspeed_config["offload_optimizer_device"] == config.deepspeed_config["offload_param_device"] == "cpu"
    assert model_entries(options)[-1][1] == CLIP_FILE and options["--split_layer"] == "16"


def test_fsdp_config_shards_fully_and_wraps_every_dit_block():
    config = ClusterConfig.from_yaml_file(TRAINING / "full/accelerate_config_fsdp.yaml")
    fsdp = config.fsdp_config
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16" and config.num_processes == 8
    # FSDP2 (fully_shard): original parameters (only some train), no sync_module_states (it cannot run on a CPU).
    assert fsdp["fsdp_version"] == 2 and "fsdp_sync_module_states" not in fsdp and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # full sharding
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    block = getattr(wan_video_dit, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    # FSDP's wrap policy tests isinstance: the geometry blocks subclass the video block, so they are wrapped too.
    assert issubclass(block, nn.Module) and issubclass(wan_video_dit.GeoDiTBlock, block)
