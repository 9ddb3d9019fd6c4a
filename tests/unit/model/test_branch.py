"""diffsynth/fantasy_world/model/branch.py: the geometry branch inside model_fn_wan_video."""
import types

import pytest
import torch

from diffsynth.core.gradient import gradient_checkpoint as upstream_checkpoint
from diffsynth.fantasy_world.tiny.dit_configs import build_dit
from diffsynth.fantasy_world.config import FantasyWorldConfig
from diffsynth.fantasy_world.model.branch import FantasyWorldBranch
from diffsynth.fantasy_world.model.recompute import GeometryCheckpointing
from diffsynth.pipelines.wan_video import TeaCache, model_fn_wan_video

TIMESTEP = torch.tensor([400.0])


def tiny_inputs(latent_frames=2, height=6, width=8, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 16, latent_frames, height, width, generator=generator),
        timestep=TIMESTEP.repeat(batch),
        context=torch.randn(batch, 5, 32, generator=generator),
    )


def plucker_input(inputs, seed=1):
    b, _, f, h, w = inputs["latents"].shape
    return torch.randn(b, 24, f, h, w, generator=torch.Generator().manual_seed(seed))


def activate_every_path(dit):
    """Open the zero gates, adapters and the camera head's pose update so every part of the branch changes the outputs."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in dit.fantasy_world.named_parameters():
            if name.endswith("gate") or "shift" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
            elif name.startswith("camera_head.update"):  # a pose-sized update (its input is 256 wide, 4 passes)
                parameter.copy_(0.01 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def fw_dit():
    def make(**options):
        dit = build_dit("tiny")
        dit.enable_fantasy_world_mode(**{"split_layer": 2, **options})
        return dit
    return make


@pytest.mark.parametrize("layout", ["global", "per_frame"])
def test_freshly_enabled_branch_leaves_the_video_prediction_exactly_unchanged(layout):
    inputs = tiny_inputs()
    plain = build_dit("tiny")
    reference = model_fn_wan_video(plain, **inputs)
    plain.enable_fantasy_world_mode(token_layout=layout)
    video, geometry = model_fn_wan_video(plain, **inputs, return_geometry=True, fantasy_world_camera=plucker_input(inputs))
    assert torch.equal(video, reference)
    assert torch.equal(model_fn_wan_video(plain, **inputs), reference)  # without the flag: upstream's return value
    assert set(geometry) == {"depth", "depth_conf", "points", "points_conf", "camera", "camera_iterations"}


def test_opened_gates_do_change_the_video(fw_dit):
    dit = fw_dit()
    inputs = tiny_inputs()
    before = model_fn_wan_video(dit, **inputs)
    activate_every_path(dit)
    assert not torch.allclose(model_fn_wan_video(dit, **inputs), before)


def fake_deepspeed(monkeypatch):
    """DeepSpeed's checkpointing API, backed by torch's reentrant checkpoint (deepspeed is not installed here)."""
    calls = []

    def checkpoint(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)

    module = types.SimpleNamespace(checkpointing=types.SimpleNamespace(is_configured=lambda: True, checkpoint=checkpoint))
    monkeypatch.setattr(upstream_checkpoint, "deepspeed", module, raising=False)
    monkeypatch.setattr(upstream_checkpoint, "_HAS_DEEPSPEED", True)
    return calls


def run_and_collect(dit, inputs, camera, **flags):
    dit.zero_grad(set_to_none=True)
    latents = inputs["latents"].clone().requires_grad_(True)
    video, geometry = model_fn_wan_video(dit, **{**inputs, "latents": latents}, return_geometry=True, fantasy_world_camera=camera, **flags)
    loss = video.square().mean() + sum(value.float().square().mean() for value in geometry.values())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in dit.named_parameters() if p.grad is not None}
    return video.detach(), {k: v.detach() for k, v in geometry.items()}, grads, latents.grad


@pytest.mark.parametrize("layout", ["global", "per_frame"])
@pytest.mark.parametrize("path", ["checkpointing", "offload", "deepspeed"])
def test_checkpointed_paths_match_the_plain_path(fw_dit, monkeypatch, layout, path):
    dit = fw_dit(token_layout=layout)
    activate_every_path(dit)
    inputs = tiny_inputs()
    camera = plucker_input(inputs)
    plain = run_and_collect(dit, inputs, camera)
    flags = {"use_gradient_checkpointing": True}
    if path == "offload":
        flags["use_gradient_checkpointing_offload"] = True
    if path == "deepspeed":
        calls = fake_deepspeed(monkeypatch)
    checkpointed = run_and_collect(dit, inputs, camera, **flags)
    if path == "deepspeed":
        assert len(calls) > len(dit.blocks)  # geometry blocks, cross-attention and heads went through it too
    video, geometry, grads, input_grad = plain
    torch.testing.assert_close(checkpointed[0], video, rtol=1e-6, atol=1e-7)
    for key in geometry:
        torch.testing.assert_close(checkpointed[1][key], geometry[key], rtol=1e-6, atol=1e-7)
    assert checkpointed[2].keys() == grads.keys()
    assert any(k.startswith("fantasy_world.camera_conditioning") for k in grads)
    for key in grads:
        torch.testing.assert_close(checkpointed[2][key], grads[key], rtol=1e-6, atol=1e-7, msg=key)
    torch.testing.assert_close(checkpointed[3], input_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["global", "per_frame"])
@pytest.mark.parametrize("latent_frames", [1, 2, 6])
def test_output_shapes_for_odd_grids_and_frame_counts(fw_dit, layout, latent_frames):
    dit = fw_dit(token_layout=layout, head_resolution_factor=2)
    inputs = tiny_inputs(latent_frames=latent_frames, height=10, width=14, batch=2)  # token grid 5x7
    video, geometry = model_fn_wan_video(dit, **inputs, return_geometry=True)
    frames = 4 * (latent_frames - 1) + 1
    assert video.shape == inputs["latents"].shape
    assert geometry["depth"].shape == (2, frames, 1, 20, 28)  # twice the latent resolution
    assert geometry["depth_conf"].shape == (2, frames, 1, 20, 28)
    assert geometry["points"].shape == (2, frames, 3, 20, 28)
    assert geometry["points_conf"].shape == (2, frames, 1, 20, 28)
    assert geometry["camera"].shape == (2, frames, 9)
    assert (geometry["depth"] > 0).all() and (geometry["depth_conf"] >= 1).all()


def test_per_frame_camera_tokens_differ_between_frames(fw_dit, monkeypatch):
    # Frames 1..f-1 share one token set and identity RoPE: without the slot embedding their camera
    # tokens stayed bit-identical through every block (measured difference exactly 0).
    dit = fw_dit(token_layout="per_frame")
    activate_every_path(dit)
    head = dit.fantasy_world.camera_head
    captured, original = [], head.forward
    monkeypatch.setattr(head, "forward", lambda tokens, latents: captured.append(tokens) or original(tokens, latents))
    model_fn_wan_video(dit, **tiny_inputs(latent_frames=4), return_geometry=True)
    tokens = captured[0][0]  # [slots, C]: the camera token of each latent frame after the last block
    for a in range(1, 4):
        for b in range(a + 1, 4):
            assert (tokens[a] - tokens[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("layout", ["global", "per_frame"])
def test_camera_head_reads_the_camera_tokens(fw_dit, layout):
    dit = fw_dit(token_layout=layout)
    activate_every_path(dit)
    inputs = tiny_inputs()
    _, before = model_fn_wan_video(dit, **inputs, return_geometry=True)
    with torch.no_grad():
        dit.fantasy_world.camera_token.add_(torch.randn_like(dit.fantasy_world.camera_token))
    _, after = model_fn_wan_video(dit, **inputs, return_geometry=True)
    assert not torch.allclose(after["camera"], before["camera"])


def test_frozen_video_side_runs_without_autograd_state(fw_dit):
    """Stage 1: nothing trainable on the video side, so the video stream never enters the graph."""
    dit = fw_dit()
    activate_every_path(dit)
    for name, parameter in dit.named_parameters():
        parameter.requires_grad_(name.startswith("fantasy_world.") and "video_from_geo" not in name and "camera_conditioning" not in name)
    video, geometry = model_fn_wan_video(dit, **tiny_inputs(), return_geometry=True)
    assert not video.requires_grad
    assert geometry["depth"].requires_grad
    sum(v.mean() for v in geometry.values()).backward()
    assert dit.fantasy_world.geo_blocks[0].self_attn.q.weight.grad is not None
    assert dit.fantasy_world.cross_attn[0].geo_from_video.q.weight.grad is not None


def test_enable_twice_is_an_error(fw_dit):
    dit = fw_dit()
    with pytest.raises(RuntimeError, match="already enabled"):
        dit.enable_fantasy_world_mode()


def test_default_split_is_forty_percent():
    dit = build_dit("tiny")
    assert FantasyWorldBranch(dit).split_layer == 2
    assert len(FantasyWorldBranch(dit).geo_blocks) == 3


def test_default_camera_adapter_is_on_the_last_video_only_block():
    # Earlier adapters put the whole video stack into stage 2's backward pass (docs/benchmarks.md, issue 13).
    assert FantasyWorldBranch(build_dit("tiny")).config.camera_adapter_blocks == (1,)
    assert FantasyWorldBranch(build_dit("tiny"), FantasyWorldConfig(split_layer=4)).camera_conditioning.video_blocks == (3,)
    assert FantasyWorldBranch(build_dit("tiny"), FantasyWorldConfig(split_layer=0)).config.camera_adapter_blocks == ()


@pytest.mark.parametrize("options, message", [
    ({"split_layer": 5}, "split_layer"),
    ({"token_layout": "diagonal"}, "token_layout"),
    ({"heads": ("depth", "normals")}, "heads"),
    ({"geo_dim": 96}, "init_from_video"),
    ({"geo_dim": 48, "init_from_video": False}, "multiple of the DiT head dim"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_dit("tiny").enable_fantasy_world_mode(**options)


def test_narrower_geometry_stream_runs(fw_dit):
    dit = fw_dit(geo_dim=32, init_from_video=False, heads=("depth", "camera"))
    _, geometry = model_fn_wan_video(dit, **tiny_inputs(), return_geometry=True)
    assert set(geometry) == {"depth", "depth_conf", "camera", "camera_iterations"}


def test_geometry_blocks_start_from_the_paired_video_blocks(fw_dit):
    dit = fw_dit()
    for geo_block, video_block in zip(dit.fantasy_world.geo_blocks, dit.blocks[2:]):
        for (name, a), (_, b) in zip(geo_block.state_dict().items(), video_block.state_dict().items()):
            assert torch.equal(a, b), name


def test_return_geometry_without_the_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="enable_fantasy_world_mode"):
        model_fn_wan_video(build_dit("tiny"), **tiny_inputs(), return_geometry=True)


def test_teacache_with_geometry_is_refused_and_without_geometry_works(fw_dit):
    dit = fw_dit()
    with pytest.raises(ValueError, match="TeaCache"):
        model_fn_wan_video(dit, **tiny_inputs(), return_geometry=True, tea_cache=TeaCache(2, 0.1, "Wan2.1-T2V-1.3B"))
    out = model_fn_wan_video(dit, **tiny_inputs(), tea_cache=TeaCache(2, 0.1, "Wan2.1-T2V-1.3B"))
    assert out.shape == tiny_inputs()["latents"].shape


def test_unified_sequence_parallel_is_refused(fw_dit):
    with pytest.raises(ValueError, match="unified sequence parallel"):
        model_fn_wan_video(fw_dit(), **tiny_inputs(), use_unified_sequence_parallel=True)


def test_no_outputs_are_stored_on_the_module(fw_dit):
    dit = fw_dit()
    tensors_before = {k for k, v in vars(dit.fantasy_world).items() if isinstance(v, torch.Tensor)}
    model_fn_wan_video(dit, **tiny_inputs(), return_geometry=True)
    assert {k for k, v in vars(dit.fantasy_world).items() if isinstance(v, torch.Tensor)} == tensors_before
    assert "geometry" not in vars(dit) and "fantasy_world_outputs" not in vars(dit)


def test_pose_camera_condition(fw_dit):
    dit = fw_dit(camera_condition="pose")
    activate_every_path(dit)
    inputs = tiny_inputs()
    pose = torch.randn(1, 5, 9)
    a = model_fn_wan_video(dit, **inputs, fantasy_world_camera=pose)
    b = model_fn_wan_video(dit, **inputs, fantasy_world_camera=pose + 1)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="4\\*k\\+1"):
        model_fn_wan_video(dit, **inputs, fantasy_world_camera=torch.randn(1, 4, 9))


def test_frozen_video_side_skips_exactly_the_zero_gated_attention(fw_dit, monkeypatch):
    from diffsynth.fantasy_world.model.blocks import CrossStreamAttention

    dit = fw_dit()
    for name, parameter in dit.named_parameters():
        parameter.requires_grad_(name.startswith("fantasy_world.geo_blocks."))
    queries = []
    real_forward = CrossStreamAttention.forward
    monkeypatch.setattr(CrossStreamAttention, "forward", lambda self, x, *a: queries.append(x.shape[1]) or real_forward(self, x, *a))
    inputs = tiny_inputs()
    video_tokens = 2 * 3 * 4
    zero_gates, _ = model_fn_wan_video(dit, **inputs, return_geometry=True)
    assert video_tokens not in queries  # no video-side attention ran: every gate is a frozen zero
    with torch.no_grad():
        dit.fantasy_world.cross_attn[1].video_from_geo.gate.fill_(0.5)
    queries.clear()
    open_gate, _ = model_fn_wan_video(dit, **inputs, return_geometry=True)
    assert queries.count(video_tokens) == 1 and not torch.equal(open_gate, zero_gates)
    with torch.no_grad():
        dit.fantasy_world.cross_attn[1].video_from_geo.gate.zero_()
    assert torch.equal(model_fn_wan_video(build_dit("tiny"), **inputs), zero_gates)


def use_upstream_complex_rope(monkeypatch):
    """The geometry stream as before rope_real: complex tables and upstream's complex128 rope_apply."""
    from diffsynth.fantasy_world.model import rope_real, run
    from diffsynth.models import wan_video_dit

    monkeypatch.setattr(run, "real_rope_table", lambda freqs, dtype: freqs)
    monkeypatch.setattr(rope_real, "apply_rotary", wan_video_dit.rope_apply)


CHECKPOINTING_PATHS = {
    "plain": {},
    "checkpointing": {"use_gradient_checkpointing": True},
    "offload": {"use_gradient_checkpointing": True, "use_gradient_checkpointing_offload": True},
}


def assert_same_step(actual, expected, rtol, atol):
    """Video, geometry, parameter gradients and input gradient of two run_and_collect results."""
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol)
    for key in expected[1]:
        torch.testing.assert_close(actual[1][key], expected[1][key], rtol=rtol, atol=atol, msg=key)
    assert actual[2].keys() == expected[2].keys()
    for key in expected[2]:
        torch.testing.assert_close(actual[2][key], expected[2][key], rtol=rtol, atol=atol, msg=key)
    torch.testing.assert_close(actual[3], expected[3], rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", ["global", "per_frame"])
@pytest.mark.parametrize("path", list(CHECKPOINTING_PATHS))
def test_real_rope_leaves_outputs_and_gradients_unchanged(fw_dit, monkeypatch, layout, path):
    dit = fw_dit(token_layout=layout)
    activate_every_path(dit)
    inputs = tiny_inputs()
    camera = plucker_input(inputs)
    real = run_and_collect(dit, inputs, camera, **CHECKPOINTING_PATHS[path])
    use_upstream_complex_rope(monkeypatch)
    complex_rope = run_and_collect(dit, inputs, camera, **CHECKPOINTING_PATHS[path])
    assert_same_step(real, complex_rope, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["all", "every_k:2", "none"])
@pytest.mark.parametrize("path", ["checkpointing", "offload"])
def test_every_checkpointing_policy_matches_the_unchecked_step(fw_dit, policy, path):
    dit = fw_dit()
    activate_every_path(dit)
    inputs = tiny_inputs()
    camera = plucker_input(inputs)
    unchecked = run_and_collect(dit, inputs, camera)
    dit.fantasy_world.checkpoint_policy = GeometryCheckpointing.parse(policy)
    assert_same_step(run_and_collect(dit, inputs, camera, **CHECKPOINTING_PATHS[path]), unchecked, rtol=1e-6, atol=1e-7)


def recomputed_branch_modules(dit, policy: str) -> set[str]:
    """Names of the branch's modules whose forward runs again during backward (a checkpoint recomputing)."""
    dit.fantasy_world.checkpoint_policy = GeometryCheckpointing.parse(policy)
    phase, recomputed = ["forward"], set()

    def hook(name):
        def record(module, args, output):  # returns None: the output stays as it is
            if phase[0] == "backward":
                recomputed.add(name)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in dit.fantasy_world.named_modules() if name]
    inputs = tiny_inputs()
    video, geometry = model_fn_wan_video(
        dit, **{**inputs, "latents": inputs["latents"].requires_grad_(True)}, return_geometry=True,
        fantasy_world_camera=plucker_input(inputs), use_gradient_checkpointing=True,
    )
    phase[0] = "backward"
    (video.square().mean() + sum(v.square().mean() for v in geometry.values())).backward()
    for handle in handles:
        handle.remove()
    return recomputed


@pytest.mark.parametrize("policy, checkpointed_layers", [("all", {0, 1, 2}), ("every_k:2", {0, 2}), ("none", set())])
def test_recomputation_follows_the_policy(fw_dit, policy, checkpointed_layers):
    dit = fw_dit()
    activate_every_path(dit)
    recomputed = recomputed_branch_modules(dit, policy)
    layers = {int(name.split(".")[1]) for name in recomputed}
    assert {name.split(".")[0] for name in recomputed} <= {"geo_blocks", "cross_attn"}  # heads, camera: never
    assert layers == checkpointed_layers
    for layer in checkpointed_layers:
        # Submodules, not the block itself: torch stops a recomputation early, once it has rebuilt
        # every saved tensor, so the block's own forward never returns (and its hook never fires).
        assert f"geo_blocks.{layer}.self_attn.q" in recomputed
        for direction in ("geo_from_video", "video_from_geo"):
            # Projections and gated output are rebuilt (v may be skipped: its saved input, the source's
            # norm, is rebuilt for k already); the attention core is kept, never recomputed.
            assert {f"cross_attn.{layer}.{direction}.{part}" for part in ("q", "k", "o")} <= recomputed
            assert f"cross_attn.{layer}.{direction}.attn" not in recomputed


def test_checkpoint_policy_is_a_runtime_setting_not_architecture(fw_dit):
    dit = fw_dit()
    assert dit.fantasy_world.checkpoint_policy == GeometryCheckpointing("all")
    assert not any("checkpoint" in key for key in dit.fantasy_world.config.to_metadata())
