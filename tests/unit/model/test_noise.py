"""diffsynth.fantasy_world.model.noise: the noise levels where geometry is supervised and read."""
import pytest
import torch

from diffsynth.diffusion import FlowMatchScheduler

from diffsynth.fantasy_world.model.noise import (
    final_geometry_sigma,
    final_geometry_timestep,
    low_noise_timestep_ids,
    training_schedule,
)


def test_low_noise_ids_select_exactly_the_levels_under_the_bound():
    timesteps, sigmas = training_schedule()
    ids = low_noise_timestep_ids(sigmas, 0.1)
    assert (sigmas[ids] <= 0.1).all() and (sigmas <= 0.1).sum() == len(ids)
    assert 0 < len(ids) < 100  # shift 5 puts most of the schedule at high noise
    assert sigmas.argmin() in ids
    assert len(low_noise_timestep_ids(sigmas, 1.0)) == len(sigmas)
    assert low_noise_timestep_ids(sigmas, 1e-6).tolist() == [int(sigmas.argmin())]  # never empty
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="noise level bound"):
            low_noise_timestep_ids(sigmas, bad)


def test_the_final_geometry_pass_reads_at_the_smallest_trained_level():
    timesteps, sigmas = training_schedule()
    assert final_geometry_sigma() == pytest.approx(float(sigmas.min())) and final_geometry_sigma() < 0.01
    assert final_geometry_timestep() == pytest.approx(float(timesteps[sigmas.argmin()]))
    assert int(sigmas.argmin()) in low_noise_timestep_ids(sigmas, 0.1).tolist()


def test_the_schedule_is_upstreams_wan_training_schedule():
    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(1000, training=True)
    timesteps, sigmas = training_schedule()
    assert torch.equal(timesteps, scheduler.timesteps) and torch.equal(sigmas, scheduler.sigmas)
