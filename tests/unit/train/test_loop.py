"""diffsynth/fantasy_world/train/loop.py and module.py: stage freezing, the training loop, resume, split training, DDP on CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.fantasy_world.train import checkpoints
from diffsynth.fantasy_world.train import loop as training
from diffsynth.fantasy_world.train import module as training_module
from diffsynth.fantasy_world.data.dataset import BadSampleError
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.train.module import build_training_module, freeze_for_stage
from diffsynth.fantasy_world.train.loop import run_training
from diffsynth.fantasy_world.train.args import build_parser

from conftest import REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "examples/wanvideo/model_training/train_fantasy_world.py"


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


def test_geometry_is_supervised_at_low_noise_in_both_stages(train_args):
    # Geometry read from a latent that is mostly noise can only be the training mean.
    for stage in (1, 2):
        args = train_args("--stage", str(stage), "--geometry_max_sigma", "0.1")
        module, _ = build_training_module(args, torch.device("cpu"), with_encoders=False)
        sigmas = {}
        for step in range(200):
            timestep, weight = module.draw_timestep(training_module.step_generator(0, step, 0))
            sigma = float(module.scheduler.sigmas[module.scheduler.timesteps == timestep][0])
            assert weight == float(sigma <= 0.1), (stage, sigma, weight)
            sigmas[step] = sigma
        if stage == 1:  # every step at low noise, over several levels
            assert max(sigmas.values()) <= 0.1 and len(set(sigmas.values())) > 5
        else:  # the diffusion loss keeps the full schedule
            assert max(sigmas.values()) > 0.9 and min(sigmas.values()) < 0.5


def test_stage_two_adds_the_geometry_term_only_at_low_noise(train_args, synthetic_dataset, monkeypatch):
    from diffsynth.fantasy_world.data.dataset import FantasyWorldDataset, collate_fantasy_world

    args = train_args("--stage", "2")
    module, encoder = build_training_module(args, torch.device("cpu"))
    batch = encoder(collate_fantasy_world([FantasyWorldDataset(synthetic_dataset, num_frames=9, height=32, width=48)[0]]))
    timesteps = module.scheduler.timesteps
    for timestep, weight in ((timesteps[:1], 0.0), (timesteps[-1:], 1.0)):
        monkeypatch.setattr(module, "draw_timestep", lambda generator: (timestep, weight))
        losses = module(batch, training_module.step_generator(0, 0, 0))
        expected = losses["diffusion"] + weight * args.geometry_loss_lambda * losses["geometry"]
        assert losses["geometry"].item() > 0 and losses["total"].item() == pytest.approx(expected.item())


def test_stage_one_leaves_the_backbone_untouched_and_moves_the_branch(train_args):
    args = train_args("--stage", "1", "--max_steps", "2")
    before = {k: v.clone() for k, v in build_dit("tiny").state_dict().items()}
    captured = {}
    original = training_module.FantasyWorldTrainingModule.__init__

    def capture(self, *a, **k):
        original(self, *a, **k)
        captured["module"] = self

    training_module.FantasyWorldTrainingModule.__init__ = capture
    try:
        run_training(args)
    finally:
        training_module.FantasyWorldTrainingModule.__init__ = original
    after = captured["module"].dit.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"backbone parameter {key} changed in stage 1"
    saved = load_file(str(Path(args.output_path) / "fantasy_world.safetensors"))
    fresh = fw_dit().state_dict()
    assert not torch.equal(saved["fantasy_world.geo_blocks.0.self_attn.q.weight"], fresh["fantasy_world.geo_blocks.0.self_attn.q.weight"])


def trainable_tensors(output_path):
    newest = checkpoints.checkpoint_dirs(Path(output_path))[-1]
    return load_file(str(newest / "model.safetensors")), newest


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
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["step-0000003", "step-0000004"]
    state = json.loads((out / "checkpoints/step-0000004/state.json").read_text())
    assert state["step"] == 4 and state["stage"] == 1
    assert (out / "loss.csv").read_text().count("loss/geometry") == 4
    assert list((out / "pictures").glob("step-0000004-sample0-depth.png"))
    assert list((out / "pictures").glob("step-0000004-sample0-camera.png"))


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(train_args, monkeypatch):
    real_loss = training_module.geometry_loss
    calls = []

    def loss_turning_nan(pred, target, **kwargs):
        losses = real_loss(pred, target, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["points"] = losses["points"] * float("nan")
        return losses

    monkeypatch.setattr(training_module, "geometry_loss", loss_turning_nan)
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
    real = training_module.is_trainable
    monkeypatch.setattr(training_module, "is_trainable", lambda name, stage, extra=False: real(name, stage, extra) or "camera_conditioning" in name)
    with pytest.raises(RuntimeError, match=r"without a gradient after the first step: \['fantasy_world.camera_conditioning"):
        run_training(train_args("--stage", "1", "--max_steps", "1"))


def launch_two_processes(synthetic_dataset, tmp_path, output, *extra):
    """Two processes on the CPU: `--multi_gpu` makes accelerate start them with torchrun; with no GPU it uses gloo."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", str(TRAIN_SCRIPT),
        "--dataset_base_path", str(synthetic_dataset), "--height", "32", "--width", "48", "--num_frames", "9",
        "--model_source", "tiny", "--stage", "2", "--learning_rate", "1e-3", "--output_path", str(output), *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "find_unused_parameters" not in result.stderr
    return json.loads((output / "summary.json").read_text())


def test_two_process_cpu_run_keeps_ranks_identical_and_resumes_exactly(synthetic_dataset, tmp_path):
    summary = launch_two_processes(synthetic_dataset, tmp_path, tmp_path / "full", "--max_steps", "3")
    assert summary["ranks"] == 2 and summary["ranks_agree"] is True
    launch_two_processes(synthetic_dataset, tmp_path, tmp_path / "cut", "--max_steps", "2")
    resumed = launch_two_processes(synthetic_dataset, tmp_path, tmp_path / "cut", "--max_steps", "3", "--resume")
    assert resumed["start_step"] == 2 and resumed["ranks_agree"] is True
    assert (tmp_path / "cut/loss.csv").read_text() == (tmp_path / "full/loss.csv").read_text()
    expected, _ = trainable_tensors(tmp_path / "full")
    got, _ = trainable_tensors(tmp_path / "cut")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.fixture
def pretrained_stand_in(monkeypatch):
    """``WanVideoPipeline.from_pretrained`` returning the weight-free tiny pipeline in bf16 (as real weights
    load), with a plain DiT; records what it was asked for (no download)."""
    from diffsynth.fantasy_world.tiny.pipeline import build_tiny_pipeline
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    requests = []

    def fake_from_pretrained(**kwargs):
        requests.append(kwargs)
        pipe = build_tiny_pipeline(torch_dtype=torch.bfloat16)
        pipe.dit = build_dit("tiny", dtype=torch.bfloat16)
        return pipe

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    return requests


def test_pretrained_source_goes_through_upstream_pipeline_units_offline_in_bf16(train_args, pretrained_stand_in, tmp_path, monkeypatch):
    """Real weights: latents and text context come from the WanVideoPipeline's own units; the tokenizer is
    the local --tokenizer_path; frozen models keep their bf16 on the CPU (no 2x fp32 copy of an 11 GB encoder)."""
    tokenizer = tmp_path / "umt5-xxl"
    tokenizer.mkdir()
    captured = {}
    real_build = training.build_training_module

    def capture(*a, **k):
        module, encoder = real_build(*a, **k)
        captured.update(module=module, encoder=encoder)
        return module, encoder

    monkeypatch.setattr(training, "build_training_module", capture)
    summary = run_training(train_args("--model_source", "pretrained", "--model_paths", "[]", "--tokenizer_path", str(tokenizer),
                                      "--stage", "2", "--max_steps", "2"))
    assert pretrained_stand_in[0]["model_configs"] == [] and pretrained_stand_in[0]["tokenizer_config"].path == str(tokenizer)
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(v)).all() for v in summary["history"].values())
    module, encoder = captured["module"], captured["encoder"]
    assert encoder.pipe.torch_dtype == torch.bfloat16  # the pipeline (text encoder, VAE) was not cast
    frozen = {p.dtype for n, p in module.dit.named_parameters() if n not in module.trainable_names}
    assert frozen == {torch.bfloat16} and {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}


def test_split_training_from_a_cache_equals_training_from_raw_clips(train_args, synthetic_dataset, tmp_path, monkeypatch):
    run_training(train_args("--task", "data_process", output="cache"))
    cache = tmp_path / "cache"
    assert sorted(p.name for p in (cache / "samples").iterdir()) == ["000000.safetensors", "000001.safetensors", "000002.safetensors"]
    run_training(train_args("--stage", "2", "--max_steps", "4", "--batch_size", "2", output="raw"))
    asked = []
    real_load_models = training_module.load_models  # the training module loads the models it trains
    monkeypatch.setattr(training_module, "load_models", lambda args, device, with_encoders: asked.append(with_encoders) or real_load_models(args, device, with_encoders))
    cached = train_args("--stage", "2", "--max_steps", "4", "--batch_size", "2", output="from_cache")
    cached.dataset_base_path = str(cache)
    run_training(cached)
    assert asked == [False]  # no VAE, text encoder or tokenizer when training from the cache
    assert (tmp_path / "from_cache/loss.csv").read_text() == (tmp_path / "raw/loss.csv").read_text()
    from_cache, raw = (load_file(str(tmp_path / run / "fantasy_world.safetensors")) for run in ("from_cache", "raw"))
    assert from_cache.keys() == raw.keys() and all(torch.equal(from_cache[key], raw[key]) for key in raw)
    other_size = train_args("--stage", "2", "--max_steps", "1", "--height", "64", output="bad")
    other_size.dataset_base_path = str(cache)
    with pytest.raises(ValueError, match=r"fantasy_world_cache\.json was encoded at another clip size: --height 64 \(cache: 32\)"):
        run_training(other_size)


def test_split_training_with_real_weights_loads_only_the_dit(train_args, pretrained_stand_in, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    pretrained = ("--model_source", "pretrained", "--model_paths", "[]")
    run_training(train_args("--task", "sft:data_process", *pretrained, "--tokenizer_path", str(tokenizer), output="cache"))
    cached = train_args("--stage", "2", "--max_steps", "2", *pretrained, output="run")
    cached.dataset_base_path = str(tmp_path / "cache")
    summary = run_training(cached)
    assert pretrained_stand_in[0]["tokenizer_config"].path == str(tokenizer)
    assert pretrained_stand_in[1]["tokenizer_config"] is None and summary["steps"] == 2


def test_data_loader_workers_read_the_same_batches(train_args, tmp_path):
    run_training(train_args("--stage", "1", "--max_steps", "3", "--batch_size", "2", output="inline"))
    run_training(train_args("--stage", "1", "--max_steps", "3", "--batch_size", "2", "--dataset_num_workers", "2", output="workers"))
    assert (tmp_path / "workers/loss.csv").read_text() == (tmp_path / "inline/loss.csv").read_text()


def test_max_steps_and_save_steps_count_optimizer_steps(train_args, monkeypatch):
    micro_steps = []
    real_generator = training.step_generator
    monkeypatch.setattr(training, "step_generator", lambda seed, step, rank: micro_steps.append(step) or real_generator(seed, step, rank))
    args = train_args("--stage", "1", "--gradient_accumulation_steps", "2", "--max_steps", "3", "--save_steps", "2")
    summary = run_training(args)
    assert micro_steps == list(range(6))
    assert [p.name for p in checkpoints.checkpoint_dirs(Path(args.output_path))] == ["step-0000002", "step-0000003"]
    assert len(summary["history"]["geometry"]) == 3


def test_the_gradient_check_sees_gradients_an_engine_moves_away(train_args, monkeypatch):
    """DeepSpeed ZeRO reduces gradients into its own buffers during backward and leaves ``.grad`` None."""
    from accelerate import Accelerator

    real_backward = Accelerator.backward

    def backward_then_clear(self, loss, **kwargs):
        real_backward(self, loss, **kwargs)
        for parameter in self._models[0].parameters():
            parameter.grad = None

    monkeypatch.setattr(Accelerator, "backward", backward_then_clear)
    assert run_training(train_args("--stage", "1", "--max_steps", "1"))["steps"] == 1


# ----------------------------------------------------------------------------- bad data


def test_short_clips_stop_the_run_or_are_skipped_before_batching(mixed_length_dataset, tmp_path):
    """A 5-frame clip with --num_frames 9 is an error naming it; with --skip_bad_samples and --batch_size 2 the
    9-frame clips still batch (it used to fail with 'cannot batch ... of different shapes')."""
    def args(*extra):
        return build_parser().parse_args([
            "--dataset_base_path", str(mixed_length_dataset), "--height", "32", "--width", "48", "--num_frames", "9",
            "--model_source", "tiny", "--max_steps", "2", "--batch_size", "2", "--output_path", str(tmp_path / "run"), *extra,
        ])

    with pytest.raises(BadSampleError, match=r"row 0 \(short/scene_000\.mp4\): clip too short: .* has 5 frames, num_frames is 9"):
        run_training(args())
    with pytest.warns(UserWarning, match=r"skipping bad sample row 0 \(short/scene_000\.mp4\): clip too short"):
        summary = run_training(args("--skip_bad_samples"))
    assert summary["steps"] == 2 and list(summary["skipped_samples"]) == ["row 0 (short/scene_000.mp4)"]


def test_stage_two_takes_the_branch_from_the_stage_one_file_and_refuses_a_different_one(train_args):
    stage1 = train_args("--stage", "1", "--max_steps", "1", "--split_layer", "1", "--token_layout", "per_frame", output="stage1")
    run_training(stage1)
    branch = str(Path(stage1.output_path) / "fantasy_world.safetensors")
    summary = run_training(train_args("--stage", "2", "--max_steps", "1", "--fantasy_world_checkpoint", branch, output="stage2"))
    assert json.loads((Path(summary["checkpoint"]) / "state.json").read_text())["fantasy_world_config"]["split_layer"] == 1
    with pytest.raises(ValueError, match=r"--split_layer 2 \(the checkpoint has 1\)"):
        run_training(train_args("--stage", "2", "--max_steps", "1", "--fantasy_world_checkpoint", branch, "--split_layer", "2", output="bad"))


def test_the_small_embedded_configuration_trains(train_args):
    summary = run_training(train_args("--model_source", "small", "--stage", "1", "--max_steps", "1"))
    assert summary["steps"] == 1 and math.isfinite(summary["history"]["geometry"][0])


def test_the_geometry_checkpointing_policy_reaches_the_branch(train_args):
    module, _ = build_training_module(train_args("--geometry_checkpointing", "every_k:2"), torch.device("cpu"), with_encoders=False)
    assert [module.dit.fantasy_world.checkpoint_policy.checkpoints(i) for i in range(4)] == [True, False, True, False]
