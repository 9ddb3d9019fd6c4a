"""diffsynth/fantasy_world/train/engines.py: DeepSpeed settings from the command line, its CPU optimizer, the gradient check;
which engine runs and the refusal of another; engine checkpoints read without executing code (checkpoints.py).
The engines themselves, launched: tests/integration/test_engines_cpu.py."""
import os
import pickle
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from diffsynth.fantasy_world.train import checkpoints, engines
from diffsynth.fantasy_world.train.engines import GradientCheck, configure_engine, make_optimizer
from diffsynth.fantasy_world.train.args import build_parser

ARGV = ["--dataset_base_path", "data", "--height", "32", "--width", "48", "--num_frames", "9", "--model_source", "tiny"]


def deepspeed_accelerator(zero: dict, processes: int = 8):
    """An accelerator stand-in under DeepSpeed with a config as accelerate's yaml leaves it ("auto" values)."""
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": "auto",
              "zero_optimization": zero}
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
                           num_processes=processes, distributed_type=SimpleNamespace(name="DEEPSPEED"), is_main_process=True)


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_command_line():
    args = build_parser().parse_args(ARGV + ["--batch_size", "2", "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5"])
    accelerator = deepspeed_accelerator({"stage": 3})
    configure_engine(accelerator, args)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    # "auto" micro-batch needs a DataLoader in prepare(); clip_grad_norm_ does nothing under DeepSpeed: its config clips.
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 2 * 4 * 8 and config["gradient_clipping"] == 0.5


def test_without_deepspeed_nothing_is_configured():
    accelerator = SimpleNamespace(state=SimpleNamespace(), num_processes=1)
    configure_engine(accelerator, build_parser().parse_args(ARGV))
    assert vars(accelerator.state) == {}


def test_an_offloaded_optimizer_is_deepspeeds_cpu_adam(monkeypatch):
    made = {}

    class FakeCPUAdam(torch.optim.AdamW):
        def __init__(self, parameters, lr, weight_decay, adamw_mode):
            made.update(lr=lr, weight_decay=weight_decay, adamw_mode=adamw_mode)
            super().__init__(parameters, lr=lr, weight_decay=weight_decay)

    adam = ModuleType("deepspeed.ops.adam")
    adam.DeepSpeedCPUAdam = FakeCPUAdam
    for name in ("deepspeed", "deepspeed.ops"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", adam)
    args = build_parser().parse_args(ARGV + ["--learning_rate", "3e-5"])
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    offloaded = deepspeed_accelerator({"stage": 3, "offload_optimizer": {"device": "cpu"}})
    assert isinstance(make_optimizer(parameters, args, offloaded), FakeCPUAdam)
    assert made == dict(lr=3e-5, weight_decay=0.01, adamw_mode=True)
    on_gpu = deepspeed_accelerator({"stage": 2})
    assert type(make_optimizer(parameters, args, on_gpu)) is torch.optim.AdamW


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dit = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        self.trainable_names = ["0.weight", "1.weight"]


@pytest.mark.parametrize("engine", ["NO", "FSDP"])
def test_the_gradient_check_names_unused_parameters_except_under_fsdp(engine, capsys):
    model = TwoLayers()
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=engine), is_main_process=True)
    check = GradientCheck(model, accelerator)
    model.dit[0](torch.ones(2)).sum().backward()  # layer 1 unused
    if engine == "FSDP":
        check.after_backward()
        assert "skipped" in capsys.readouterr().out
        return
    with pytest.raises(RuntimeError, match=r"without a gradient after the first step: \['1.weight'\]"):
        check.after_backward()


# Which engine runs, and refusing another than the one configured (issue 22).

def test_the_requested_engine_comes_from_the_launchers_variables_or_its_config_file(monkeypatch, tmp_path):
    for variable in engines.ENGINE_REQUEST_VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(engines, "launch_config_file", lambda: None)
    assert engines.requested_engine() is None
    # `accelerate launch --cpu --config_file <DeepSpeed yaml>` exports nothing about DeepSpeed: the file says it.
    config = tmp_path / "zero2.yaml"
    config.write_text("distributed_type: DEEPSPEED\nuse_cpu: true\n")
    monkeypatch.setattr(engines, "launch_config_file", lambda: str(config))
    assert engines.requested_engine() == "DEEPSPEED"
    config.write_text("distributed_type: MULTI_GPU\n")
    assert engines.requested_engine() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engines.requested_engine() == "FSDP"


def test_an_engine_other_than_the_configured_one_is_refused_naming_both(monkeypatch):
    monkeypatch.setattr(engines, "launch_config_file", lambda: "full/accelerate_config_zero2.yaml")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    fallback = SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_CPU"), num_processes=2, device=torch.device("cpu"))
    with pytest.raises(engines.EngineMismatchError, match=r"accelerate_config_zero2.yaml asks for DEEPSPEED .*ZERO_STAGE=2.* "
                                                          r"but accelerate gave MULTI_CPU on 2 process"):
        engines.check_engine(fallback, "DEEPSPEED")
    engines.check_engine(SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED")), "DEEPSPEED")
    engines.check_engine(fallback, None)  # nothing asked for: DDP is what was configured


def test_the_launch_config_is_read_from_the_launchers_command_line(monkeypatch, tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"python\0-m\0accelerate.commands.launch\0--config_file\0zero3.yaml\0--num_processes\0002\0")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cmdline if str(path).startswith("/proc/") else path, *a, **k))
    assert engines.launch_config_file() == "zero3.yaml"


def engine_state(name: str, mixed_precision: str = "no", device: str = "cpu", **state):
    return SimpleNamespace(distributed_type=SimpleNamespace(name=name), mixed_precision=mixed_precision, num_processes=2,
                           device=torch.device(device), state=SimpleNamespace(backend="gloo", **state))


def test_deepspeed_is_described_from_its_own_config():
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    accelerator = engine_state("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=config))
    described = engines.describe_engine(accelerator, torch.nn.Linear(2, 2).bfloat16(), torch.bfloat16)
    # accelerate says "no" under DeepSpeed: the precision is DeepSpeed's.
    assert described == dict(distributed_type="DEEPSPEED", backend="gloo", world_size=2, device="cpu", mixed_precision="bf16",
                             zero_stage=3, offload_optimizer="cpu", offload_param="none", trainable_dtype=["bfloat16"],
                             autocast="bfloat16")


def test_mixed_precision_follows_what_the_engine_made_of_the_module():
    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).bfloat16()
    assert engines.compute_dtype(fp32, engine_state("MULTI_CPU")) is None
    assert engines.compute_dtype(bf16, engine_state("MULTI_CPU")) is torch.bfloat16  # DeepSpeed's bf16 casts the module
    assert engines.compute_dtype(fp32, engine_state("FSDP", "bf16", fsdp_plugin=None)) is torch.bfloat16  # FSDP2 mixed precision
    assert engines.compute_dtype(fp32, engine_state("MULTI_GPU", device="cuda")) is torch.bfloat16


def test_only_replicating_engines_compare_parameters_between_ranks():
    def deepspeed(stage):
        return engine_state("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}))
    assert engines.replicates_parameters(engine_state("MULTI_CPU", deepspeed_plugin=None))
    assert engines.replicates_parameters(deepspeed(2)) and not engines.replicates_parameters(deepspeed(3))
    assert not engines.replicates_parameters(engine_state("FSDP"))


# Reading an engine's checkpoint executes no code.

class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_deepspeeds_loaders_cannot_unpickle_code(tmp_path):
    path = tmp_path / "optim_states.pt"
    torch.save({"state": Exploit()}, path)
    real_load = torch.load
    with checkpoints.code_free_loading():
        with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
            torch.load(path, weights_only=False)  # what DeepSpeed's checkpoint engine asks for
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        torch.save({"loss_scaler": LossScaler(1.0), "step": torch.tensor(3)}, path)
        assert torch.load(path, weights_only=False)["step"] == 3  # DeepSpeed's own records still load
    assert torch.load is real_load  # only within


def test_distributed_checkpoint_metadata_cannot_unpickle_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "pytorch_model_fsdp_0"
    dcp.save({"model.w": torch.arange(4.0)}, checkpoint_id=str(folder), no_dist=True)
    assert checkpoints.read_dcp_tensors(folder, {"model.w"})["model.w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="system.*refused"):
        checkpoints.read_dcp_tensors(folder, {"model.w"})


# The branch file's gather (the real engines, every rank included: tests/integration/test_engines_cpu.py).

@pytest.fixture
def stage_two_module(train_args):
    from diffsynth.fantasy_world.train.module import build_training_module

    model, _ = build_training_module(train_args("--stage", "2"), torch.device("cpu"), with_encoders=False)
    return model


def test_the_gather_takes_the_whole_branch_and_float32_trainable_entries(stage_two_module):
    from diffsynth.fantasy_world.model.weights import fantasy_world_state_dict

    model = stage_two_module
    frozen = next(n for n, p in model.dit.fantasy_world.named_parameters() if not p.requires_grad)
    model.dit.fantasy_world.get_parameter(frozen).data = model.dit.fantasy_world.get_parameter(frozen).data.bfloat16()
    branch = engines.gather_branch(model.dit, model.trainable_names, engine_state("MULTI_CPU"))
    assert branch.keys() == fantasy_world_state_dict(model.dit).keys()
    assert {branch[name].dtype for name in model.trainable_names} == {torch.float32}
    assert branch["fantasy_world." + frozen].dtype == torch.bfloat16  # frozen entries keep the engine's dtype


def test_under_deepspeed_every_rank_gathers_the_fp32_masters(stage_two_module, monkeypatch):
    """DeepSpeed's module holds 16-bit copies; the masters live in its optimizer, sharded: a collective."""
    import deepspeed.utils

    model, calls = stage_two_module, []

    def full_fp32(parameter):
        calls.append(parameter)
        return torch.full(parameter.shape, 7.0)

    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", full_fp32)
    not_main = engine_state("DEEPSPEED")
    not_main.is_main_process = False
    branch = engines.gather_branch(model.dit, model.trainable_names, not_main)
    parameters = dict(model.dit.named_parameters())
    assert calls == [parameters[name] for name in parameters if name in set(model.trainable_names)]  # every one, in order
    assert all(bool((branch[name] == 7).all()) for name in model.trainable_names)


def test_fsdp2_shards_are_gathered_whole(stage_two_module):
    model = stage_two_module
    name = model.trainable_names[0]
    shard = model.dit.get_parameter(name)
    shard.full_tensor = lambda: torch.full(shard.shape, 5.0)  # a DTensor's all-gather
    branch = engines.gather_branch(model.dit, model.trainable_names, engine_state("FSDP"))
    assert bool((branch[name] == 5).all())


def test_every_rank_takes_part_in_the_branch_gather_and_only_the_main_one_writes(stage_two_module, tmp_path, monkeypatch):
    gathered = []
    monkeypatch.setattr(checkpoints, "gather_branch", lambda dit, names, accelerator: gathered.append(accelerator.is_main_process)
                        or {"fantasy_world.x": torch.zeros(1)})
    for is_main in (False, True):
        rank = SimpleNamespace(is_main_process=is_main, register_save_state_pre_hook=lambda hook: None)
        checkpoints.TrainingCheckpoints(rank, stage_two_module, tmp_path).save_branch(wrapped=None, checkpoint=tmp_path / "step-1")
        assert (tmp_path / "fantasy_world.safetensors").exists() is is_main
    assert gathered == [False, True]  # a rank that skipped the collective would leave the others waiting forever
