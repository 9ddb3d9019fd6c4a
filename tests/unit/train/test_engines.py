"""diffsynth/fantasy_world/train/engines.py: DeepSpeed settings from the command line, its CPU optimizer, the gradient check."""
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

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
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # a whole branch file


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
