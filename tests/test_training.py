"""diffsynth/fantasy_world/training.py: stage freezing, resume, DDP on CPU, failure handling."""
import argparse
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffsynth.fantasy_world import training, weights
from diffsynth.fantasy_world.dataset import BadSampleError
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


def test_geometry_is_supervised_at_low_noise_in_both_stages(train_args):
    # Geometry read from a latent that is mostly noise can only be the training mean.
    for stage in (1, 2):
        args = train_args("--stage", str(stage), "--geometry_max_sigma", "0.1")
        module = training.FantasyWorldTrainingModule(args, torch.device("cpu"))
        sigmas = {}
        for step in range(200):
            timestep, weight = module.draw_timestep(training.step_generator(0, step, 0))
            sigma = float(module.scheduler.sigmas[module.scheduler.timesteps == timestep][0])
            assert weight == float(sigma <= 0.1), (stage, sigma, weight)
            sigmas[step] = sigma
        if stage == 1:  # every step at low noise, over several levels
            assert max(sigmas.values()) <= 0.1 and len(set(sigmas.values())) > 5
        else:  # the diffusion loss keeps the full schedule
            assert max(sigmas.values()) > 0.9 and min(sigmas.values()) < 0.5


def test_stage_two_adds_the_geometry_term_only_at_low_noise(train_args, synthetic_dataset, monkeypatch):
    from diffsynth.fantasy_world.dataset import FantasyWorldDataset, collate_fantasy_world

    args = train_args("--stage", "2")
    module = training.FantasyWorldTrainingModule(args, torch.device("cpu"))
    batch = collate_fantasy_world([FantasyWorldDataset(synthetic_dataset, num_frames=9, height=32, width=48)[0]])
    timesteps = module.scheduler.timesteps
    for timestep, weight in ((timesteps[:1], 0.0), (timesteps[-1:], 1.0)):
        monkeypatch.setattr(module, "draw_timestep", lambda generator: (timestep, weight))
        losses = module(batch, training.step_generator(0, 0, 0))
        expected = losses["diffusion"] + weight * args.geometry_loss_lambda * losses["geometry"]
        assert losses["geometry"].item() > 0 and losses["total"].item() == pytest.approx(expected.item())


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


# ----------------------------------------------------------------------------- bad options, bad data, full disk

VALID_ARGV = ["--dataset_base_path", "data", "--height", "32", "--width", "48", "--num_frames", "9", "--model_source", "tiny"]


@pytest.mark.parametrize("extra, message", [
    (["--dataset_repeat", "0"], r"--dataset_repeat 0: must be >= 1"),
    (["--max_steps", "0"], r"--max_steps 0: must be >= 1 when given"),
    (["--save_steps", "0"], r"--save_steps 0: must be >= 1 when given"),
    (["--batch_size", "0"], r"--batch_size 0: must be >= 1"),
    (["--keep_checkpoints", "0"], r"--keep_checkpoints 0: must be >= 1"),
    (["--height", "50"], r"--height 50: must be a positive multiple of 16 .*round it up to 64"),
    (["--width", "-16"], r"--width -16: must be a positive multiple of 16"),
    (["--num_frames", "8"], r"--num_frames 8: must be 4k\+1"),
])
def test_bad_options_are_refused_at_parse_time(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        training.parse_args(VALID_ARGV + extra)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    # Namespaces built in code are checked by run_training before anything is read or written.
    args = build_parser().parse_args(VALID_ARGV + extra + ["--output_path", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=message):
        run_training(args)
    assert not (tmp_path / "run").exists()


def test_every_bad_option_is_named_in_one_message():
    args = build_parser().parse_args(VALID_ARGV + ["--dataset_repeat", "0", "--max_steps", "0"])
    with pytest.raises(ValueError, match=r"--dataset_repeat 0.*\n.*--max_steps 0"):
        training.validate_training_args(args)
    assert training.parse_args(VALID_ARGV).height == 32


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


@pytest.fixture
def checkpoint_setup(tmp_path):
    """A stage-1 module stand-in, its optimizer and an output folder already holding checkpoint step 1."""
    dit = fw_dit()
    model = SimpleNamespace(dit=dit, trainable_names=freeze_for_stage(dit, 1), args=argparse.Namespace(stage=1))
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-3)
    output = tmp_path / "run"
    training.save_checkpoint(output, model, optimizer, 1, keep=3)
    return model, optimizer, output


def output_files(output):
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*")) if path.is_file()}


def failing(error):
    def write(*args, **kwargs):
        raise error
    return write


def partial_safetensors_write(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


@pytest.mark.parametrize("target, writer", [
    ("torch.save", failing(RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 4352 vs 4246\nframe #0: ..."))),
    ("torch.save", failing(RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"))),
    ("torch.save", failing(OSError(errno.ENOSPC, "No space left on device"))),
    ("safetensors", partial_safetensors_write),
])
def test_disk_full_during_a_checkpoint_save_says_so_and_keeps_the_previous_one(checkpoint_setup, monkeypatch, target, writer):
    model, optimizer, output = checkpoint_setup
    before = output_files(output)
    if target == "torch.save":
        monkeypatch.setattr(training.torch, "save", writer)
    else:
        monkeypatch.setattr(weights, "save_file", writer)
    with pytest.raises(OSError, match=r"the disk is full: could not write checkpoint step-0000002 into .*checkpoints; "
                                      r"removed the incomplete \.step-0000002\.tmp, the previous checkpoint .*step-0000001\) is intact") as error:
        training.save_checkpoint(output, model, optimizer, 2, keep=3)
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert output_files(output) == before  # no staging folder or temporary file left, nothing of the last save changed


def test_disk_full_while_writing_the_branch_weights_keeps_the_previous_file(checkpoint_setup, monkeypatch):
    model, optimizer, output = checkpoint_setup
    before = output_files(output)
    real_save_file = weights.save_file
    # The checkpoint folder's own safetensors file is written; the branch's fantasy_world.safetensors is not.
    monkeypatch.setattr(weights, "save_file", lambda tensors, filename, metadata=None: (
        partial_safetensors_write(tensors, filename) if "fantasy_world.safetensors" in filename else real_save_file(tensors, filename, metadata)))
    with pytest.raises(OSError, match=r"the disk is full: could not write .*fantasy_world\.safetensors; checkpoint .*step-0000002 is complete"):
        training.save_checkpoint(output, model, optimizer, 2, keep=3)
    after = output_files(output)
    assert after["fantasy_world.safetensors"] == before["fantasy_world.safetensors"]
    assert not [name for name in after if name.endswith(".tmp")]
    assert [p.name for p in training.checkpoint_dirs(output)] == ["step-0000001", "step-0000002"]
