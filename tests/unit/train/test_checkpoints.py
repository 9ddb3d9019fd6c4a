"""diffsynth/fantasy_world/train/checkpoints.py: atomic accelerate checkpoints, safe resume, fallbacks, the folder lock."""
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from diffsynth.fantasy_world.model import weights
from diffsynth.fantasy_world.train.checkpoints import (
    NonFiniteWeightsError, OutputFolderBusyError, TrainingCheckpoints, checkpoint_dirs, output_folder_lock,
)
from diffsynth.fantasy_world.train.module import build_training_module
from diffsynth.fantasy_world.train.loop import make_accelerator, run_training


@pytest.fixture
def checkpoint_setup(train_args):
    """A prepared stage-1 module, its optimizer and checkpoints, with an output folder already holding step 1."""
    args = train_args("--stage", "1")
    accelerator = make_accelerator(args)
    model, _ = build_training_module(args, accelerator.device, with_encoders=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    saver = TrainingCheckpoints(accelerator, model, Path(args.output_path))
    saver.save(1, 3, wrapped)
    return saver, wrapped, Path(args.output_path)


def output_files(output):
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*")) if path.is_file()}


def failing(error):
    def write(*args, **kwargs):
        raise error
    return write


def partial_safetensors_write(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


def test_a_checkpoint_holds_only_the_trainable_weights(checkpoint_setup):
    saver, _, output = checkpoint_setup
    from safetensors import safe_open

    with safe_open(str(output / "checkpoints/step-0000001/model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == {f"dit.{name}" for name in saver.model.trainable_names}  # the frozen base is not copied each time
    state = json.loads((output / "checkpoints/step-0000001/state.json").read_text())
    assert state["step"] == 1 and state["world_size"] == 1


@pytest.mark.parametrize("target, writer", [
    ("torch.save", failing(RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 4352 vs 4246\nframe #0: ..."))),
    ("torch.save", failing(RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"))),
    ("torch.save", failing(OSError(errno.ENOSPC, "No space left on device"))),
    ("safetensors", partial_safetensors_write),
])
def test_disk_full_during_a_checkpoint_save_says_so_and_keeps_the_previous_one(checkpoint_setup, monkeypatch, target, writer):
    saver, wrapped, output = checkpoint_setup
    before = output_files(output)
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", writer)
    else:
        import accelerate.utils.other

        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", writer)
    with pytest.raises(OSError, match=r"the disk is full: could not write checkpoint step-0000002 into .*checkpoints; "
                                      r"removed the incomplete \.step-0000002\.tmp, the previous checkpoint .*step-0000001\) is intact") as error:
        saver.save(2, 3, wrapped)
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert output_files(output) == before  # no staging folder or temporary file left, nothing of the last save changed


def test_disk_full_while_writing_the_branch_weights_keeps_the_previous_file(checkpoint_setup, monkeypatch):
    saver, wrapped, output = checkpoint_setup
    before = output_files(output)
    monkeypatch.setattr(weights, "save_file", lambda tensors, filename, metadata=None: partial_safetensors_write(tensors, filename))
    with pytest.raises(OSError, match=r"the disk is full: could not write .*fantasy_world\.safetensors; checkpoint .*step-0000002 is complete"):
        saver.save(2, 3, wrapped)
    after = output_files(output)
    assert after["fantasy_world.safetensors"] == before["fantasy_world.safetensors"]
    assert not [name for name in after if name.endswith(".tmp")]
    assert [p.name for p in checkpoint_dirs(output)] == ["step-0000001", "step-0000002"]


def test_non_finite_weights_are_never_saved(checkpoint_setup):
    saver, wrapped, output = checkpoint_setup
    before = output_files(output)
    name = saver.model.trainable_names[0]
    dict(saver.model.dit.named_parameters())[name].data[..., 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=rf"step 2: 1 trainable parameter tensor\(s\) are not finite \(here: \['{name}'\]\).*step-0000001\) is intact"):
        saver.save(2, 3, wrapped)
    assert output_files(output) == before


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code_and_falls_back_to_the_previous_checkpoint(train_args, tmp_path, capsys):
    run_training(train_args("--stage", "1", "--max_steps", "2", "--save_steps", "1"))
    output = Path(train_args().output_path)
    marker = tmp_path / "payload-ran"
    with open(output / "checkpoints/step-0000002/optimizer.bin", "wb") as handle:
        pickle.dump({"state": Payload(str(marker))}, handle)
    summary = run_training(train_args("--stage", "1", "--max_steps", "3", "--resume"))
    assert not marker.exists()
    assert summary["start_step"] == 1  # the crafted newest checkpoint is named and passed over
    assert re.search(r"cannot resume from .*step-0000002: UnpicklingError", capsys.readouterr().out)


def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(train_args, capsys):
    run_training(train_args("--stage", "1", "--max_steps", "2", "--save_steps", "1"))
    output = Path(train_args().output_path)
    newest = output / "checkpoints/step-0000002/model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert run_training(train_args("--stage", "1", "--max_steps", "3", "--resume"))["start_step"] == 1
    assert "cannot resume from " + str(newest.parent) in capsys.readouterr().out
    for path in checkpoint_dirs(output):
        (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*checkpoints could be read:\n  .*step-0000003.*\n  .*step-0000002.*\n  .*step-0000001"):
        run_training(train_args("--stage", "1", "--max_steps", "4", "--resume"))


def test_resuming_with_other_run_defining_options_is_refused(train_args):
    run_training(train_args("--stage", "1", "--max_steps", "1"))
    with pytest.raises(ValueError, match=r"--learning_rate 0\.01 \(checkpoint: 0\.001\); --seed 3 \(checkpoint: 0\)"):
        run_training(train_args("--stage", "1", "--max_steps", "2", "--resume", "--learning_rate", "1e-2", "--seed", "3"))
    # How long to train and how often to save may change.
    assert run_training(train_args("--stage", "1", "--max_steps", "2", "--save_steps", "2", "--resume"))["start_step"] == 1


def test_a_busy_output_folder_is_refused_naming_the_holder(train_args):
    output = Path(train_args().output_path)
    with output_folder_lock(output):
        with pytest.raises(OutputFolderBusyError, match=rf"{output} is in use by another training run \(process {os.getpid()}\)"):
            run_training(train_args("--stage", "1", "--max_steps", "1"))
    assert not output.joinpath("loss.csv").exists()
    run_training(train_args("--stage", "1", "--max_steps", "1"))  # released when the holder ends


def test_the_loss_log_and_summary_cover_the_whole_run_across_resumes(train_args):
    run_training(train_args("--stage", "1", "--max_steps", "3", "--save_steps", "1", output="full"))
    run_training(train_args("--stage", "1", "--max_steps", "3", "--save_steps", "1"))
    output = Path(train_args().output_path)
    # As if killed after logging step 3 but before its checkpoint: the resumed run logs step 3 again, once.
    shutil.rmtree(checkpoint_dirs(output)[-1])
    summary = run_training(train_args("--stage", "1", "--max_steps", "3", "--resume"))
    assert summary["start_step"] == 2 and len(summary["history"]["geometry"]) == 3
    full = Path(train_args(output="full").output_path)
    assert (output / "loss.csv").read_text() == (full / "loss.csv").read_text()


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "trainable"}),
    lambda text: json.dumps([json.loads(text)]),
    lambda text: json.dumps(json.loads(text) | {"step": "2"}),
], ids=["truncated", "no-trainable", "a-list", "step-a-string"])
def test_a_damaged_newest_state_json_falls_back_to_the_previous_checkpoint(train_args, capsys, damage):
    run_training(train_args("--stage", "1", "--max_steps", "2", "--save_steps", "1"))
    state = Path(train_args().output_path) / "checkpoints/step-0000002/state.json"
    state.write_text(damage(state.read_text()))
    assert run_training(train_args("--stage", "1", "--max_steps", "3", "--resume"))["start_step"] == 1
    assert re.search(rf"warning: cannot resume from {re.escape(str(state.parent))}: ValueError: .*state\.json", capsys.readouterr().out)


def test_resume_with_nothing_to_resume_is_refused(train_args, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: there is nothing to resume in .*typo \(no complete checkpoint"):
        run_training(train_args("--stage", "1", "--max_steps", "1", "--resume", output="typo"))
    assert not (tmp_path / "typo/loss.csv").exists()
    (tmp_path / "empty/checkpoints/step-0000001").mkdir(parents=True)  # incomplete: no state.json
    with pytest.raises(FileNotFoundError, match=r"nothing to resume in .*empty"):
        run_training(train_args("--stage", "1", "--max_steps", "1", "--resume", output="empty"))


def test_resume_compares_effective_values_so_an_explicit_default_is_accepted(train_args):
    run_training(train_args("--stage", "1", "--max_steps", "1"))
    explicit = ("--token_layout", "global", "--num_register_tokens", "4", "--camera_condition", "plucker")
    assert run_training(train_args("--stage", "1", "--max_steps", "2", "--resume", *explicit))["start_step"] == 1
    with pytest.raises(ValueError, match=r"--token_layout 'per_frame' \(checkpoint: 'global'\)"):
        run_training(train_args("--stage", "1", "--max_steps", "3", "--resume", "--token_layout", "per_frame"))
