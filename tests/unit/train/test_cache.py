"""diffsynth/fantasy_world/train/cache.py: the split-training cache's manifest contract, fault injection per hostile input."""
import json
import random
import re
import shutil
from pathlib import Path

import pandas
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffsynth.fantasy_world.train.cache import (
    CACHE_MANIFEST, INCOMPLETE_MARK, CacheManifestError, CachedDataset, is_cache, sample_file,
)
from diffsynth.fantasy_world.data.dataset import BadSampleError
from diffsynth.fantasy_world.train.encoding import modules_fingerprint
from diffsynth.fantasy_world.train.loop import run_training
from diffsynth.fantasy_world.train.args import build_parser

CLIP = ["--height", "32", "--width", "48", "--num_frames", "9"]


def options(dataset, output, *extra, source="tiny"):
    return build_parser().parse_args(["--dataset_base_path", str(dataset), *CLIP, "--model_source", source,
                                      "--learning_rate", "1e-3", "--output_path", str(output), *extra])


@pytest.fixture(scope="session")
def session_cache(synthetic_dataset, tmp_path_factory):
    """A cache of ``synthetic_dataset`` written by ``--task data_process`` (tiny model). Never modify it: use ``cache``."""
    folder = tmp_path_factory.mktemp("cache") / "cache"
    run_training(options(synthetic_dataset, folder, "--task", "data_process"))
    return folder


@pytest.fixture(scope="session")
def reference_losses(session_cache, tmp_path_factory):
    """``loss.csv`` of two stage-1 steps from the intact cache."""
    output = tmp_path_factory.mktemp("reference") / "run"
    run_training(options(session_cache, output, "--stage", "1", "--max_steps", "2"))
    return (output / "loss.csv").read_text()


@pytest.fixture
def cache(session_cache, tmp_path):
    """A private copy of the session's cache that a test may corrupt."""
    return Path(shutil.copytree(session_cache, tmp_path / "cache"))


def train_from(cache, tmp_path, *extra, output="run", source="tiny"):
    return run_training(options(cache, tmp_path / output, "--stage", "1", "--max_steps", "2", *extra, source=source))


def resave(path, change):
    """Rewrite the cached sample ``path`` with ``change(tensors)`` applied (its metadata kept)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def edit_manifest(cache, change):
    manifest = json.loads((cache / CACHE_MANIFEST).read_text())
    (cache / CACHE_MANIFEST).write_text(json.dumps(change(manifest)))


def broken_row_1(dataset):
    """``dataset`` with row 1's video unreadable."""
    (dataset / pandas.read_csv(dataset / "metadata.csv")["video"][1]).write_bytes(b"not a video")
    return dataset


def test_the_manifest_records_provenance_encoders_and_every_tensor(session_cache, synthetic_dataset):
    manifest = json.loads((session_cache / CACHE_MANIFEST).read_text())
    assert manifest["source"]["metadata"] == str((synthetic_dataset / "metadata.csv").resolve())
    assert len(manifest["source"]["fingerprint"]) == 64
    assert manifest["encoders"]["model_source"] == "tiny" and "TinyVideoCodec" in manifest["encoders"]["video"]
    row = manifest["rows"][0]
    assert row["file"] == "samples/000000.safetensors" and len(row["sha256"]) == 64
    assert row["tensors"]["depth"] == {"shape": [9, 1, 32, 48], "dtype": "float32"}
    assert not (session_cache / INCOMPLETE_MARK).exists() and not list(session_cache.glob(".*.tmp"))


def test_training_from_an_intact_cache_still_works(reference_losses):
    assert reference_losses.count("\n") > 2


# Row: data_process of dataset B into A's cache, B's row 1 unreadable, --skip_bad_samples.
def test_reencoding_another_dataset_leaves_no_sample_of_the_old_cache(cache, synthetic_dataset_copy, tmp_path):
    other = broken_row_1(synthetic_dataset_copy)
    manifest = run_training(options(other, cache, "--task", "data_process", "--skip_bad_samples"))
    assert len(manifest["skipped"]) == 1 and [row["file"] for row in manifest["rows"]] == [
        "samples/000000.safetensors", "samples/000002.safetensors"]
    assert not sample_file(cache, 1).exists()  # A's row 1 is gone, not left in use
    assert manifest["source"]["metadata"] == str((other / "metadata.csv").resolve())
    assert len(CachedDataset(cache, options(cache, tmp_path / "x"))) == 2


# Row: a re-encode at 16x16 into a 32x32 cache stops at a bad row.
def test_a_reencode_that_stops_halfway_leaves_a_folder_training_refuses(cache, synthetic_dataset_copy, tmp_path):
    other = broken_row_1(synthetic_dataset_copy)
    args = options(other, cache, "--task", "data_process")
    args.height = args.width = 16
    with pytest.raises(BadSampleError, match="row 1"):
        run_training(args)
    assert not (cache / CACHE_MANIFEST).exists() and is_cache(cache)
    with pytest.raises(CacheManifestError, match=rf"{cache} is an incomplete cache: a --task data_process run into it did not finish"):
        train_from(cache, tmp_path)


@pytest.mark.parametrize("key, change", [
    ("depth", lambda t: t.__setitem__("depth", t["depth"][..., :16, :16].contiguous())),
    ("points", lambda t: t.__setitem__("points", t["points"][..., :16, :].contiguous())),
    ("depth", lambda t: t["depth"].view(-1).__setitem__(5, float("nan"))),
    ("latents", lambda t: t["latents"].view(-1).__setitem__(0, float("nan"))),
    ("w2c", lambda t: t["w2c"].view(-1).__setitem__(0, float("inf"))),
    ("w2c", lambda t: t.pop("w2c")),
    ("latents", lambda t: t.__setitem__("latents", t["latents"].half())),
], ids=["depth-cropped", "points-cropped", "nan-depth", "nan-latents", "inf-w2c", "no-w2c", "latents-dtype"])
def test_a_tampered_sample_is_refused_naming_the_file_and_key(cache, tmp_path, key, change):
    path = sample_file(cache, 1)
    resave(path, change)
    with pytest.raises(BadSampleError, match=rf"bad sample {re.escape(str(path))}: key '{key}' ") as error:
        train_from(cache, tmp_path, "--batch_size", "3")
    assert "rerun --task data_process" in str(error.value)


def test_a_sample_with_other_values_of_the_right_shape_is_refused_by_its_checksum(cache, tmp_path):
    path = sample_file(cache, 0)
    resave(path, lambda t: t["depth"].mul_(2))
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(path))}: its content differs .*sha256"):
        train_from(cache, tmp_path, "--batch_size", "3")


@pytest.mark.parametrize("change, message", [
    (None, r"cannot read the cache manifest .*JSONDecodeError"),
    (lambda m: {k: v for k, v in m.items() if k != "height"}, r"has no 'height' entry"),
    (lambda m: m | {"rows": "samples/000000.safetensors"}, r"'rows' is str .*expected list"),
    (lambda m: [m], r"is a JSON list, not an object"),
    (lambda m: m | {"rows": [m["rows"][0] | {"file": "../../etc/passwd"}]}, r"rows\[0\]: file '\.\./\.\./etc/passwd' is not a cache sample path"),
    (lambda m: m | {"rows": [m["rows"][0] | {"tensors": {}}]}, r"rows\[0\]: tensors \['latents'.* are missing"),
    (lambda m: m | {"height": "32"}, r"'height' is str"),
], ids=["truncated", "no-height", "rows-a-string", "a-list", "path-escape", "no-tensors", "height-a-string"])
def test_a_damaged_manifest_is_refused_naming_it_and_the_entry(cache, tmp_path, change, message):
    manifest = cache / CACHE_MANIFEST
    if change is None:
        manifest.write_text(manifest.read_text()[:200])
    else:
        edit_manifest(cache, change)
    with pytest.raises(CacheManifestError, match=message) as error:
        train_from(cache, tmp_path)
    assert str(manifest) in str(error.value)
    assert not (tmp_path / "run/loss.csv").exists()  # refused before step 1


def test_a_manifest_with_targets_at_another_size_is_refused(cache, tmp_path):
    edit_manifest(cache, lambda m: m | {"rows": [m["rows"][0] | {"tensors": m["rows"][0]["tensors"] | {
        "depth": {"shape": [9, 1, 16, 16], "dtype": "float32"}}}]})
    with pytest.raises(CacheManifestError, match=r"samples/000000\.safetensors key 'depth' has shape \[9, 1, 16, 16\], not \[9, C, 32, 48\]"):
        train_from(cache, tmp_path)


# Row: cache made with one --model_source, trained with another; another encoder of equal widths.
def test_a_cache_of_other_encoders_is_refused_before_step_1(cache, tmp_path):
    with pytest.raises(CacheManifestError, match=r"encoded for another model: this run has --model_source small \(cache: tiny\)"):
        train_from(cache, tmp_path, source="small")
    edit_manifest(cache, lambda m: m | {"encoders": m["encoders"] | {"video": "another codec"}})
    with pytest.raises(CacheManifestError, match=r"encoded for another model: this run has encoders .*another codec"):
        train_from(cache, tmp_path)
    assert not (tmp_path / "run/loss.csv").exists()


def test_the_pretrained_encoders_fingerprint_changes_with_any_weight():
    torch.manual_seed(0)
    vae, text = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).bfloat16()
    before = modules_fingerprint({"vae": vae, "text_encoder": text, "image_encoder": None})
    assert before == modules_fingerprint({"vae": vae, "text_encoder": text})
    with torch.no_grad():
        text.weight[0, 0] += 1
    assert modules_fingerprint({"vae": vae, "text_encoder": text}) != before


def test_a_changed_source_dataset_makes_the_cache_stale(synthetic_dataset_copy, tmp_path):
    run_training(options(synthetic_dataset_copy, tmp_path / "cache", "--task", "data_process"))
    metadata = synthetic_dataset_copy / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("\n", "\r\n"))
    with pytest.raises(CacheManifestError, match=r"is stale: its source dataset .*metadata\.csv .* changed"):
        train_from(tmp_path / "cache", tmp_path)


# Row: --skip_bad_samples with a cache.
def test_skip_bad_samples_skips_a_bad_cached_sample_and_counts_it(cache, tmp_path):
    path = sample_file(cache, 1)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.warns(UserWarning, match=rf"skipping bad sample {re.escape(str(path))}"):
        summary = train_from(cache, tmp_path, "--skip_bad_samples", "--max_steps", "3")
    assert list(summary["skipped_samples"]) == [str(path)] and "cannot read the cached sample" in summary["skipped_samples"][str(path)]


# Row: data_process --output_path = the raw dataset folder, or a training run's folder.
def test_data_process_refuses_its_input_folder_and_a_training_runs_folder(synthetic_dataset_copy, tmp_path):
    before = sorted(p.name for p in synthetic_dataset_copy.iterdir())
    with pytest.raises(ValueError, match=r"is the input dataset's folder"):
        run_training(options(synthetic_dataset_copy, synthetic_dataset_copy, "--task", "data_process"))
    assert not is_cache(synthetic_dataset_copy) and not (synthetic_dataset_copy / "samples").exists()
    assert sorted(p.name for p in synthetic_dataset_copy.iterdir()) == before  # not even the run's lock file
    run_training(options(synthetic_dataset_copy, tmp_path / "run", "--stage", "1", "--max_steps", "1"))
    with pytest.raises(ValueError, match=r"is a training run's folder \(it holds checkpoints, loss\.csv"):
        run_training(options(synthetic_dataset_copy, tmp_path / "run", "--task", "data_process"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that data_process does not write \(.*notes\.txt\)"):
        run_training(options(synthetic_dataset_copy, tmp_path / "other", "--task", "data_process"))


@pytest.mark.parametrize("seed", [0, 2, 7, 22])
def test_random_byte_corruption_is_refused_naming_a_file_or_changes_nothing(cache, tmp_path, reference_losses, seed):
    generator = random.Random(seed)
    files = sorted(p for p in cache.rglob("*") if p.is_file() and p.name != ".fantasy_world.lock")
    for path in generator.sample(files, 2):
        data = bytearray(path.read_bytes())
        for _ in range(generator.randint(1, 4)):
            # JSON characters in the manifest reach its parser's checks (random bytes are mostly invalid UTF-8).
            data[generator.randrange(len(data))] = generator.choice(b'0123456789"{}[],:. a-z') if path.suffix == ".json" else generator.randrange(256)
        path.write_bytes(bytes(data))
    try:
        train_from(cache, tmp_path)
    except (BadSampleError, CacheManifestError) as error:
        assert str(cache) in str(error)
    else:
        assert (tmp_path / "run/loss.csv").read_text() == reference_losses
