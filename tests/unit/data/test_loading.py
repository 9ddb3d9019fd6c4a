"""diffsynth/fantasy_world/data/loading.py: the seeded order per (seed, micro-step, rank), sharded by accelerate, resumable."""
import pytest
from accelerate.data_loader import BatchSamplerShard

from diffsynth.fantasy_world.data import loading
from diffsynth.fantasy_world.data.loading import StepBatchSampler


def test_data_order_visits_every_sample_once_per_epoch_across_ranks():
    seen = [i for step in range(3) for rank in range(2) for i in loading.sample_indices(step, rank, 2, 2, 12, seed=5)]
    assert sorted(seen) == list(range(12))
    assert loading.sample_indices(3, 0, 2, 2, 12, seed=5) != loading.sample_indices(0, 0, 2, 2, 12, seed=5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_accelerate_hands_each_rank_its_own_indices_from_the_global_batch(world):
    sampler = StepBatchSampler(dataset_size=10, batch_size=2, world_size=world, seed=4, start_step=0, total_steps=7)
    for rank in range(world):
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank, split_batches=True)
        assert list(shard) == [loading.sample_indices(step, rank, world, 2, 10, seed=4) for step in range(7)]


def test_a_resumed_sampler_continues_the_uninterrupted_order():
    full = list(StepBatchSampler(10, 2, 2, seed=1, start_step=0, total_steps=9))
    assert list(StepBatchSampler(10, 2, 2, seed=1, start_step=4, total_steps=9)) == full[4:]
    assert len(StepBatchSampler(10, 2, 2, seed=1, start_step=4, total_steps=9)) == 5
