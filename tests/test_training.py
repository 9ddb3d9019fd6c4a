"""diffsynth/fantasy_world/training.py: stage freezing, resume, DDP on CPU, failure handling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.fantasy_world import training
from diffsynth.fantasy_world.configs import build_dit
from diffsynth.fantasy_world.training import build_parser, freeze_for_stage, run_training

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "examples/wanvideo/model_training/train_fantasy_world.py"


@pytest.fixture
def train_args(synthetic_dataset, tmp_path):
    def make(*extra, output="run"):
        return build_parser().parse_args([
            "--dataset_base_path", str(synthetic_dataset), "--height", "32", "--width", "48", "--num_frames", "9",
            "--model_source", "tiny", "--learning_rate", "1e-3", "--output_path", str(tmp_path / output), *extra,
        ])
    return make


def fw_dit():
    dit = build_dit("tiny")
    dit.enable_fantasy_world_mode(split_layer=2)
    return dit


def test_stage_one_trains_exactly_the_geometry_branch():
    dit = fw_dit()
    names = set(freeze_for_stage(dit, 1))
    expected = {n for n, _ in dit.named_parameters() if n.startswith("fantasy_world.") and
                not n.startswith(("fantasy_world.camera_conditioning.",)) and ".video_from_geo." not in n}
    assert names == expected
    assert all(not p.requires_grad for n, p in dit.named_parameters() if n not in names)
    assert not any(n.startswith(("blocks.", "head.", "patch_embedding", "text_embedding", "time_")) for n in names)


def test_stage_two_trains_cross_attention_and_camera_adapters():
    dit = fw_dit()
    names = set(freeze_for_stage(dit, 2))
    assert names == {n for n, _ in dit.named_parameters() if n.startswith(("fantasy_world.cross_attn.", "fantasy_world.camera_conditioning."))}
    with_geometry = set(freeze_for_stage(dit, 2, train_geometry_in_stage2=True))
    assert names < with_geometry and any(n.startswith("fantasy_world.geo_blocks.") for n in with_geometry)


def test_stage_one_leaves_the_backbone_untouched_and_moves_the_branch(train_args):
    args = train_args("--stage", "1", "--max_steps", "2")
    before = {k: v.clone() for k, v in build_dit("tiny").state_dict().items()}
    captured = {}
    original = training.FantasyWorldTrainingModule.__init__

    def capture(self, *a, **k):
        original(self, *a, **k)
        captured["module"] = self

    training.FantasyWorldTrainingModule.__init__ = capture
    try:
        run_training(args)
    finally:
        training.FantasyWorldTrainingModule.__init__ = original
    after = captured["module"].dit.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"backbone parameter {key} changed in stage 1"
    saved = load_file(str(Path(args.output_path) / "fantasy_world.safetensors"))
    fresh = fw_dit().state_dict()
    assert not torch.equal(saved["fantasy_world.geo_blocks.0.self_attn.q.weight"], fresh["fantasy_world.geo_blocks.0.self_attn.q.weight"])


def trainable_tensors(output_path):
    newest = training.checkpoint_dirs(Path(output_path))[-1]
    return load_file(str(newest / "trainable.safetensors")), newest


@pytest.mark.parametrize("stage", [1, 2])
def test_kill_and_resume_equals_uninterrupted_training(train_args, stage):
    full = train_args("--stage", str(stage), "--max_steps", "4", "--save_steps", "2", output="full")
    run_training(full)
    interrupted = train_args("--stage", str(stage), "--max_steps", "2", "--save_steps", "2", output="cut")
    run_training(interrupted)  # "killed" right after its checkpoint at step 2
    resumed = train_args("--stage", str(stage), "--max_steps", "4", "--save_steps", "2", "--resume", output="cut")
    summary = run_training(resumed)
    assert summary["start_step"] == 2
    expected, _ = trainable_tensors(full.output_path)
    got, newest = trainable_tensors(resumed.output_path)
    assert newest.name == "step-0000004"
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_keeps_the_last_k_checkpoints_and_writes_logs_and_pictures(train_args):
    args = train_args("--stage", "1", "--max_steps", "4", "--save_steps", "1", "--keep_checkpoints", "2")
    run_training(args)
    out = Path(args.output_path)
    assert [p.name for p in training.checkpoint_dirs(out)] == ["step-0000003", "step-0000004"]
    state = json.loads((out / "checkpoints/step-0000004/state.json").read_text())
    assert state["step"] == 4 and state["stage"] == 1
    assert (out / "loss.csv").read_text().count("loss/geometry") == 4
    assert list((out / "pictures").glob("step-0000004-sample0-depth.png"))
    assert list((out / "pictures").glob("step-0000004-sample0-camera.png"))


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(train_args, monkeypatch):
    real_loss = training.geometry_loss
    calls = []

    def loss_turning_nan(pred, target, **kwargs):
        losses = real_loss(pred, target, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["points"] = losses["points"] * float("nan")
        return losses

    monkeypatch.setattr(training, "geometry_loss", loss_turning_nan)
    args = train_args("--stage", "1", "--max_steps", "5", "--save_steps", "2")
    with pytest.raises(training.NonFiniteLossError, match=r"step 3: term 'points'"):
        run_training(args)
    tensors, newest = trainable_tensors(args.output_path)
    assert newest.name == "step-0000002"
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_readable(train_args, monkeypatch):
    args = train_args("--stage", "1", "--max_steps", "2", "--save_steps", "1")
    real_save = torch.save

    def crash_on_second_checkpoint(obj, path, *a, **k):
        if "step-0000002" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(training.torch, "save", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        run_training(args)
    tensors, newest = trainable_tensors(args.output_path)
    assert newest.name == "step-0000001" and tensors
    resumed = train_args("--stage", "1", "--max_steps", "2", "--resume")
    monkeypatch.setattr(training.torch, "save", real_save)
    assert run_training(resumed)["start_step"] == 1


def test_a_trainable_parameter_without_gradient_is_reported(train_args, monkeypatch):
    # Stage 1 passes no camera, so camera adapters marked trainable would never get a gradient (DDP would hang).
    real = training.is_trainable
    monkeypatch.setattr(training, "is_trainable", lambda name, stage, extra=False: real(name, stage, extra) or "camera_conditioning" in name)
    with pytest.raises(RuntimeError, match=r"without a gradient after the first step: \['fantasy_world.camera_conditioning"):
        run_training(train_args("--stage", "1", "--max_steps", "1"))


def test_two_process_cpu_run_keeps_ranks_identical(synthetic_dataset, tmp_path):
    """Two processes on the CPU: `--multi_gpu` makes accelerate start them with torchrun; with no GPU it uses gloo."""
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", str(TRAIN_SCRIPT),
        "--dataset_base_path", str(synthetic_dataset), "--height", "32", "--width", "48", "--num_frames", "9",
        "--model_source", "tiny", "--stage", "2", "--max_steps", "3", "--learning_rate", "1e-3", "--output_path", str(output),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["ranks_agree"] is True
    assert "find_unused_parameters" not in result.stderr


def test_pretrained_source_goes_through_upstream_pipeline_units(train_args, monkeypatch):
    """Real weights: latents and text context come from the WanVideoPipeline's own units. Here the
    pipeline is the weight-free tiny one (no download), with a plain DiT as from_pretrained gives."""
    from diffsynth.fantasy_world.inference import build_tiny_pipeline
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    pipe = build_tiny_pipeline()
    pipe.dit = build_dit("tiny")
    requested = {}

    def fake_from_pretrained(**kwargs):
        requested.update(kwargs)
        return pipe

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    summary = run_training(train_args("--model_source", "pretrained", "--model_paths", "[]", "--stage", "2", "--max_steps", "2"))
    assert requested["model_configs"] == [] and summary["steps"] == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in summary["history"].values())
    assert pipe.dit.fantasy_world is not None and pipe.torch_dtype == torch.float32


def test_data_order_visits_every_sample_once_per_epoch_across_ranks():
    seen = [i for step in range(3) for rank in range(2) for i in training.sample_indices(step, rank, 2, 2, 12, seed=5)]
    assert sorted(seen) == list(range(12))
    assert training.sample_indices(3, 0, 2, 2, 12, seed=5) != training.sample_indices(0, 0, 2, 2, 12, seed=5)
