"""accelerate's engines on two CPU processes over gloo, launched as a user launches them (issue 22).

Each engine is started with ``accelerate launch --config_file <shipped yaml> --num_processes 2`` on
the tiny model (stage 2: trained adapters beside a frozen geometry branch): an uninterrupted run
of ``STEPS`` optimizer steps that saves every step, and a copy of it whose last checkpoint is
removed, resumed with ``--resume``. Checked per engine: the engine recorded in ``summary.json``
(and printed) is the one the yaml asks for; the losses of the first steps are DDP's within bf16
rounding; the resumed run continues exactly as the uninterrupted one; the export command rebuilds
the run's branch file from the engine's own checkpoint folder, offline, exactly; and the branch
files of all engines agree. Under ZeRO-3 and FSDP2 the branch is gathered from shards by every
rank: a gather on rank 0 alone leaves rank 1 out of the collective (the run hangs until the
timeout) or writes partial tensors (the export comparison fails).

ZeRO-3 with the optimizer offloaded (the shipped offload yaml as it is) needs DeepSpeed's CPU Adam,
compiled on first use (about 5 minutes): it runs only in ``make test-engines``
(``FANTASY_WORLD_TEST_ENGINES=1``). The first DeepSpeed launch on a fresh machine also compiles
DeepSpeed's shared-memory communication op once (about a minute; cached in ~/.cache/torch_extensions).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.fantasy_world.app.export import main as export_main

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "examples/wanvideo/model_training/train_fantasy_world.py"
CONFIGS = REPO / "examples/wanvideo/model_training/full"
STEPS = 2
# The launcher's options per engine: a shipped yaml as it is. ZeRO-3 without offload is the offload yaml
# with its two offload devices overridden on the command line, as a user without CPU Adam would.
LAUNCH = {
    "ddp": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "zero2": ["--config_file", CONFIGS / "accelerate_config_zero2.yaml"],
    "zero3": ["--config_file", CONFIGS / "accelerate_config_zero3_offload.yaml",
              "--offload_optimizer_device", "none", "--offload_param_device", "none"],
    "fsdp2": ["--config_file", CONFIGS / "accelerate_config_fsdp.yaml"],
    "zero3_offload": ["--config_file", CONFIGS / "accelerate_config_zero3_offload.yaml"],
}
# What summary.json's "engine" must say (besides world_size 2 and the gloo backend).
EXPECTED_ENGINE = {
    "ddp": dict(distributed_type="MULTI_CPU", mixed_precision="no", autocast=None, trainable_dtype=["float32"]),
    "zero2": dict(distributed_type="DEEPSPEED", zero_stage=2, offload_optimizer="none", offload_param="none",
                  mixed_precision="bf16", autocast="bfloat16", trainable_dtype=["bfloat16"]),
    "zero3": dict(distributed_type="DEEPSPEED", zero_stage=3, offload_optimizer="none", offload_param="none",
                  mixed_precision="bf16", autocast="bfloat16", trainable_dtype=["bfloat16"]),
    "fsdp2": dict(distributed_type="FSDP", fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
                  mixed_precision="bf16", autocast="bfloat16", trainable_dtype=["float32"]),
    "zero3_offload": dict(distributed_type="DEEPSPEED", zero_stage=3, offload_optimizer="cpu", offload_param="cpu",
                          mixed_precision="bf16", autocast="bfloat16", trainable_dtype=["bfloat16"]),
}
# Seconds per launch; the offload run's first launch compiles DeepSpeed's CPU Adam.
TIME_LIMIT = {engine: 400 for engine in LAUNCH} | {"zero3_offload": 2400}
# bf16 engines against fp32 DDP: losses of the first steps, and the branch after STEPS Adam steps of 1e-3.
LOSS_RTOL = 1e-2
BRANCH_ATOL = 1e-2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(engine: str, dataset: Path, output: Path, *extra: str) -> tuple[dict, str]:
    """Run the training script under ``accelerate launch`` with ``engine``'s options; (summary.json, stdout).

    A run past its time limit (a collective that not every rank joins waits forever) fails the test,
    and the launcher's whole process group (the ranks, a compiler) is killed with it.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *map(str, LAUNCH[engine]), "--num_processes", "2",
        "--main_process_port", str(free_port()), str(TRAIN_SCRIPT),
        "--dataset_base_path", str(dataset), "--height", "32", "--width", "48", "--num_frames", "9", "--model_source", "tiny",
        "--stage", "2", "--learning_rate", "1e-3", "--max_steps", str(STEPS), "--save_steps", "1",
        "--keep_checkpoints", str(STEPS), "--output_path", str(output), *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=output.parent,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIME_LIMIT[engine])
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{engine}: no result after {TIME_LIMIT[engine]} s (every rank must join each collective)\n{stderr[-4000:]}")
    assert process.returncode == 0, f"{engine}: exit {process.returncode}\n{stderr[-4000:]}"
    return json.loads((output / "summary.json").read_text()), stdout


def run_engine(engine: str, dataset: Path, root: Path) -> dict:
    """The uninterrupted run and its resumed copy (from step STEPS - 1) of ``engine``."""
    full, cut = root / engine, root / f"{engine}-cut"
    summary, log = launch(engine, dataset, full)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:07d}")
    (cut / "fantasy_world.safetensors").unlink()
    resumed, _ = launch(engine, dataset, cut, "--resume")
    return dict(engine=engine, summary=summary, log=log, resumed=resumed, full=full, cut=cut)


@pytest.fixture(scope="module")
def runs(synthetic_dataset, tmp_path_factory):
    """``runs(engine)``: that engine's runs, made once per module (DDP is every engine's reference)."""
    root, made = tmp_path_factory.mktemp("engines"), {}

    def get(engine: str) -> dict:
        if engine not in made:
            made[engine] = run_engine(engine, synthetic_dataset, root)
        return made[engine]
    return get


def read_losses(output: Path) -> dict[tuple[int, str], float]:
    rows = (output / "loss.csv").read_text().splitlines()[1:]
    return {(int(step), key): float(value) for step, key, value in (row.split(",") for row in rows)}


def check_engine_run(run: dict, reference: dict, tmp_path: Path) -> None:
    engine, summary = run["engine"], run["summary"]
    recorded = summary["engine"]
    assert {key: recorded.get(key) for key in EXPECTED_ENGINE[engine]} == EXPECTED_ENGINE[engine], recorded
    assert recorded["world_size"] == 2 and recorded["backend"] == "gloo", recorded
    assert "engine: " + json.dumps(recorded) in run["log"]  # printed as recorded
    state = json.loads((run["full"] / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())
    assert state["engine"]["distributed_type"] == EXPECTED_ENGINE[engine]["distributed_type"]
    # Sharding engines have nothing to compare between ranks; replicating ones must agree.
    assert summary["ranks_agree"] is (None if engine in ("zero3", "fsdp2", "zero3_offload") else True)

    losses, expected = read_losses(run["full"]), read_losses(reference["full"])
    assert losses.keys() == expected.keys() and len({step for step, _ in losses}) == STEPS
    for key, value in expected.items():
        assert losses[key] == pytest.approx(value, rel=LOSS_RTOL), f"{engine} {key}: {losses[key]} vs DDP {value}"

    # --resume continues the engine's own checkpoint exactly as the uninterrupted run went on.
    assert run["resumed"]["start_step"] == STEPS - 1 and run["resumed"]["engine"] == recorded
    assert (run["cut"] / "loss.csv").read_text() == (run["full"] / "loss.csv").read_text()
    written = load_file(str(run["full"] / "fantasy_world.safetensors"))
    resumed = load_file(str(run["cut"] / "fantasy_world.safetensors"))
    assert resumed.keys() == written.keys()
    for key in written:
        torch.testing.assert_close(resumed[key], written[key], rtol=0, atol=1e-6, msg=f"{engine} resumed {key}")

    # Offline, one process: the branch file again, from the engine's own checkpoint folder.
    exported = tmp_path / f"{engine}-export.safetensors"
    export_main(["--from_checkpoint", str(run["full"] / "checkpoints" / f"step-{STEPS:07d}"), "--branch_only",
                 "--output", str(exported)])
    exported_tensors = load_file(str(exported))
    assert exported_tensors.keys() == written.keys()
    for key in written:
        assert exported_tensors[key].dtype == written[key].dtype and torch.equal(exported_tensors[key], written[key]), key

    # Every engine trains the same branch: DDP's, within bf16 rounding of STEPS steps.
    ddp = load_file(str(reference["full"] / "fantasy_world.safetensors"))
    assert written.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(written[key].float(), ddp[key].float(), rtol=0, atol=BRANCH_ATOL, msg=f"{engine} vs DDP {key}")


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_each_engine_runs_as_configured_resumes_exactly_and_exports_its_branch(engine, runs, tmp_path):
    check_engine_run(runs(engine), runs("ddp"), tmp_path)


@pytest.mark.skipif(os.environ.get("FANTASY_WORLD_TEST_ENGINES") != "1",
                    reason="builds DeepSpeed's CPU Adam (~5 min): run with `make test-engines`")
def test_zero3_with_the_optimizer_offloaded_as_shipped(runs, tmp_path):
    check_engine_run(runs("zero3_offload"), runs("ddp"), tmp_path)
