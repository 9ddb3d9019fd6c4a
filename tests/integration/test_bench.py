"""bench/train_step.py and its modules: one short run on the tiny DiT writes the JSON and Markdown it
promises; the FLOP counter follows the autograd state.

Timings are never asserted (they depend on the machine and its load); the fields, the ratios'
arithmetic and the FLOP count (against torch.utils.flop_counter) are.
"""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "train_step.py"
if str(REPO_ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.flops import FlopCounter, module_group  # noqa: E402
from bench.variants import parse_variants, resolve_shape  # noqa: E402


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_and_variant_selection():
    parser = load_bench().build_parser()
    shape = resolve_shape(parser.parse_args(["--height", "480", "--width", "832", "--num_frames", "81"]))
    assert shape["latent"] == [21, 60, 104] and shape["grid"] == [21, 30, 52] and shape["tokens"] == 32760
    shape = resolve_shape(parser.parse_args(["--tokens", "2048"]))
    assert math.prod(shape["grid"]) == 2048 and shape["num_frames"] == 4 * (shape["latent"][0] - 1) + 1
    with pytest.raises(SystemExit):
        resolve_shape(parser.parse_args(["--height", "100", "--width", "64", "--num_frames", "5"]))
    variants = parse_variants(parser.parse_args(["--variants", "stage2,plain:nockpt", "--checkpointing", "on,off"]))
    assert variants == [("stage2", True), ("plain", False), ("stage2", False)]


def test_flop_counter_follows_the_autograd_state():
    # frozen (forward only) -> trained, input without grad -> frozen, gradient passes -> trained.
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    counter = FlopCounter(model, split_layer=None, geo_length=None)
    counter.phase = "forward"
    loss = model(torch.randn(3, 5, 8)).sum()
    counter.phase = "backward"
    loss.backward()
    counter.close()
    forward = [2 * 15 * 8 * 16, 2 * 15 * 16 * 16, 2 * 15 * 16 * 16, 2 * 15 * 16 * 4]
    assert counter.model_flops == forward[0] + 2 * forward[1] + 2 * forward[2] + 3 * forward[3]
    assert counter.parts["linear_backward_weight"] == forward[1] + forward[3]
    assert counter.parts["linear_backward_input"] == forward[2] + forward[3]
    assert counter.recompute_flops == 0 and counter.by_group == {"dit_other": counter.model_flops}
    assert module_group("blocks.3.self_attn.q", 2) == "video_blocks_post_split"
    assert module_group("fantasy_world.cross_attn.0.video_from_geo.q", 2) == "cross_attn.video_from_geo"


def test_tiny_run_writes_json_and_markdown(tmp_path):
    prefix = tmp_path / "tiny"
    command = [
        sys.executable, str(SCRIPT), "--config", "tiny", "--height", "64", "--width", "64", "--num_frames", "5",
        "--text_len", "8", "--warmup", "1", "--steps", "2", "--device", "cpu", "--threads", "1",
        "--check_flops", "--out", str(prefix),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(prefix.with_suffix(".json").read_text())
    markdown = prefix.with_suffix(".md").read_text()

    assert report["schema"] == "fantasy_world.bench.train_step/1"
    assert report["shape"]["tokens"] == 2 * 4 * 4 and report["config"]["name"] == "tiny"
    assert report["settings"]["warmup"] == 1 and report["settings"]["steps"] == 2
    assert report["machine"]["torch"] and report["flop_formula"].startswith("model FLOPs")
    names = [r["name"] for r in report["results"]]
    assert names == ["plain/ckpt", "stage1/ckpt", "stage2/ckpt", "plain/nockpt", "stage1/nockpt", "stage2/nockpt"]
    by_name = {r["name"]: r for r in report["results"]}
    for record in report["results"]:
        assert record["status"] == "ok", record.get("traceback") or record.get("error")
        step = record["step_s"]
        assert len(step["all"]) == 2 and step["min"] <= step["p25"] <= step["median"] <= step["p75"] <= step["max"]
        assert step["iqr"] == pytest.approx(step["p75"] - step["p25"])
        assert record["tokens_per_s"] == pytest.approx(report["shape"]["tokens_per_step"] / step["median"])
        flops = record["flops"]
        assert flops["model"] > 0 and flops["hardware"] == pytest.approx(flops["model"] + flops["recompute"])
        assert record["achieved_flops_per_s"] == pytest.approx(flops["model"] / step["median"])
        # The hook count agrees with torch's own FLOP counter on the same step (recomputation included).
        assert abs(flops["flop_counter_mode"]["rel_error"]) < 1e-6
        assert (flops["recompute"] > 0) == record["checkpointing"]
        assert record["peak_memory"]["kind"] == "rss" and record["peak_memory"]["bytes"] > 0
        assert 0 < record["params_trainable"] <= record["params_total"]
        plain = by_name["plain/" + ("ckpt" if record["checkpointing"] else "nockpt")]
        assert record["ratio_vs_plain"] == pytest.approx(step["median"] / plain["step_s"]["median"])
    assert by_name["plain/ckpt"]["ratio_vs_plain"] == pytest.approx(1.0)
    # Stage semantics: plain trains everything; stage 2 trains fewer parameters than stage 1 here.
    plain = by_name["plain/nockpt"]
    assert plain["params_trainable"] == plain["params_total"]
    assert plain["flops"]["parts"]["linear_backward_weight"] == pytest.approx(plain["flops"]["parts"]["linear_forward"])
    assert "cross_attn.geo_from_video" in by_name["stage1/nockpt"]["trainable_modules"]
    assert "cross_attn.video_from_geo" not in by_name["stage1/nockpt"]["trainable_modules"]
    assert set(by_name["stage2/nockpt"]["trainable_modules"]) == {
        "camera_conditioning", "cross_attn.geo_from_video", "cross_attn.video_from_geo"}
    # Same model and tokens: model FLOPs do not depend on checkpointing.
    for stage in ("plain", "stage1", "stage2"):
        assert by_name[f"{stage}/ckpt"]["flops"]["model"] == pytest.approx(by_name[f"{stage}/nockpt"]["flops"]["model"])

    rope = report["rope"]
    assert rope["extra_tokens"] == 5 and rope["geo_tokens"] == 32 + 5
    assert rope["rotation"] == "diffsynth.fantasy_world.model.rope_real.apply_rotary" and rope["table_build_s"] > 0
    # Every rotation of the geometry stream is counted: per geometry layer (tiny: 3) q and k of its
    # self-attention and its side of each cross-attention direction (stage 1 skips the frozen,
    # zero-gated video<-geometry one); checkpointing everything recomputes each once.
    for record in report["results"]:
        if record["stage"] == "plain":
            assert record["rope_calls_geo"] is None and "rope_extra" not in record
            continue
        calls = 3 * (3 if record["stage"] == "stage1" else 4)
        assert record["rope_calls_geo"] == dict(forward=calls, forward_needing_grad=calls,
                                                recompute=calls if record["checkpointing"] else 0)
        extra = record["rope_extra"]
        assert extra["calls"] == record["rope_calls_geo"] and extra["share_upper"] == pytest.approx(
            extra["seconds_upper"] / record["step_s"]["median"])
    kinds = {t["target"].split(" (")[0] for t in report["targets"]}
    assert {"stage-1 step <= 1.0x plain", "stage-2 step <= 1.5x plain", "extra-token RoPE < 0.5% of the step"} <= kinds
    assert all(t["status"] in ("met", "missed", "n/a", "info") for t in report["targets"])

    # The meta device counts the same FLOPs from shapes alone (no data, no timing).
    bench = load_bench()
    meta_prefix = tmp_path / "tiny_meta"
    meta_args = ["--config", "tiny", "--height", "64", "--width", "64", "--num_frames", "5", "--text_len", "8",
                 "--device", "meta", "--quiet", "--out", str(meta_prefix)]
    assert bench.main(meta_args) == 0
    meta = {r["name"]: r for r in json.loads(meta_prefix.with_suffix(".json").read_text())["results"]}
    for name, record in by_name.items():
        assert meta[name]["step_s"] is None
        assert meta[name]["flops"]["model"] == record["flops"]["model"]
        assert meta[name]["flops"]["recompute"] == record["flops"]["recompute"]
        assert meta[name]["hardware_flop_ratio_vs_plain"] == pytest.approx(record["hardware_flop_ratio_vs_plain"])
        assert meta[name]["rope_calls_geo"] == record["rope_calls_geo"]

    # The branch's checkpointing policy and the adapter placement reach the step: without geometry
    # recomputation only the video blocks recompute, and with the adapters after the split ("post": blocks
    # 2-4) the gradient never reaches the blocks before it.
    policy_prefix = tmp_path / "tiny_meta_policy"
    assert bench.main(meta_args[:-1] + [str(policy_prefix), "--variants", "stage2:ckpt", "--geometry_checkpointing",
                                        "none", "--camera_adapter_blocks", "post"]) == 0
    policy = json.loads(policy_prefix.with_suffix(".json").read_text())
    (stage2,) = policy["results"]
    assert policy["settings"]["geometry_checkpointing"] == "none"
    assert stage2["fantasy_world"]["camera_adapter_blocks"] == [2, 3, 4]
    assert stage2["rope_calls_geo"]["recompute"] == 0
    assert set(stage2["flops"]["recompute_by_group"]) == {"video_blocks_post_split"}

    assert "| variant | ckpt | status | step median (s)" in markdown
    for stage in ("plain", "stage1", "stage2"):
        assert f"| {stage} | on | ok |" in markdown and f"| {stage} | off | ok |" in markdown
    assert "| target (issues 7, 13) | value | status |" in markdown and "FLOPs: model FLOPs =" in markdown


@pytest.mark.parametrize("stage, schedule_end", [(1, -1), (2, 0), (2, -1)])
def test_the_benchmark_scores_a_batch_exactly_as_the_trainer(stage, schedule_end, train_args, synthetic_dataset, monkeypatch):
    # The timed step must be the trained one: same terms, weights, lambda and noise-level gate (stage 2
    # at the schedule's first, high-noise timestep has gate 0; at its last, gate 1).
    import argparse

    from bench.step import step_loss_function
    from diffsynth.fantasy_world.data.dataset import FantasyWorldDataset, collate_fantasy_world
    from diffsynth.fantasy_world.train import module as training_module

    args = train_args("--stage", str(stage), "--geometry_loss_lambda", "0.7")
    module, encoder = training_module.build_training_module(args, torch.device("cpu"))
    batch = encoder(collate_fantasy_world([FantasyWorldDataset(synthetic_dataset, num_frames=9, height=32, width=48)[0]]))
    timestep = module.scheduler.timesteps[schedule_end:][:1]
    gate = float(module.scheduler.sigmas[schedule_end] <= args.geometry_max_sigma)
    monkeypatch.setattr(module, "draw_timestep", lambda generator: (timestep, gate))
    outputs = {}
    real_model_fn = training_module.model_fn_wan_video
    monkeypatch.setattr(training_module, "model_fn_wan_video", lambda *a, **k: outputs.setdefault("value", real_model_fn(*a, **k)))
    trained = module(batch, torch.Generator().manual_seed(5))["total"]

    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(5))
    compute_loss, _ = step_loss_function(argparse.Namespace(geo_weight=0.7), f"stage{stage}", noise, None)
    benchmarked = compute_loss(
        outputs["value"], targets=module.geometry_targets(batch),
        diffusion_target=module.scheduler.training_target(batch["latents"], noise, timestep),
        geometry_gate=gate, diffusion_weight=module.scheduler.training_weight(timestep),
    )
    assert gate == (0.0 if (stage, schedule_end) == (2, 0) else 1.0)
    assert benchmarked.item() == pytest.approx(trained.item(), rel=1e-6)
