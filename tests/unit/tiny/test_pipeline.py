"""diffsynth.fantasy_world.tiny.pipeline: the weight-free stand-ins behind a real WanVideoPipeline."""
import torch

from diffsynth.fantasy_world.tiny.codec import tiny_text_embedding
from diffsynth.fantasy_world.tiny.pipeline import TinyPromptTokenizer, TinyTextEncoder


def test_tiny_text_path_gives_the_training_embedding():
    ids, mask = TinyPromptTokenizer()("une pièce calme", return_mask=True)
    embedding = TinyTextEncoder(32, torch.float32)(ids, mask)
    assert torch.equal(embedding, tiny_text_embedding(["une pièce calme"], 32))
    assert mask.sum() == embedding.shape[1]  # upstream's prompt unit zeroes rows past the mask: none here
