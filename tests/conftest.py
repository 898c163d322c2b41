import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


@pytest.fixture
def tiny_qwen2():
    """A random 2-layer Qwen2 with GQA and tied embeddings; vocab 40, eos 1, pad 0."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=1, pad_token_id=0, bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.fixture(scope="session")
def local_async_run(tmp_path_factory):
    """A local async run of the default recipe, small (tests/test_async_pipeline.py's SMALL, 3 steps): what the
    same run through Ray (tests/test_ray.py) and Slurm (tests/test_slurm.py) must end with. Run once for both."""
    from areal.train import train
    from test_async_pipeline import recipe

    return train(recipe(tmp_path_factory.mktemp("local_async"), "local", "run.mode=async", "trainer.steps=3",
                        "run.eval_every=3"))
