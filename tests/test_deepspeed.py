"""Backends across ranks: 2-rank DDP (torch) and DeepSpeed ZeRO on gloo match one process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine

from test_packing import skewed_groups

STEPS = 3


def make_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).float()


def run_losses(backend: str, zero_stage: int = 2, offload: bool = False) -> tuple[list[float], float]:
    """Losses of STEPS updates on a fixed batch, and a checksum of the final weights."""
    cfg = TrainerConfig(backend=backend, zero_stage=zero_stage, offload_optimizer=offload, lr=1e-2,
                        minibatches=1, max_tokens_per_microbatch=30, grad_clip=1.0)
    engine = TrainEngine(make_model(), cfg, temperature=1.0)
    batch = build_batch(skewed_groups(seed=3, groups=4), None, pad_token_id=0)
    losses = [engine.train_step(batch)["train/loss"] for _ in range(STEPS)]
    checksum = sum(float(w.double().square().sum()) for _, w in engine.named_weights())
    return losses, checksum


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, runs: list) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for backend, stage in runs:
        results[f"{backend}-{stage}"] = run_losses(backend, stage)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(runs, tmp_path, world_size=2):
    mp.start_processes(_rank_main, args=(world_size, free_port(), str(tmp_path), runs), nprocs=world_size,
                       join=True, start_method="spawn")
    return json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module")
def single_process():
    return run_losses("torch")


def test_two_ranks_ddp_and_zero_match_one_process(single_process, tmp_path):
    pytest.importorskip("deepspeed")
    ref_losses, ref_checksum = single_process
    results = spawn([("torch", 0), ("deepspeed", 2), ("deepspeed", 3)], tmp_path)
    for name, (losses, checksum) in results.items():
        assert losses == pytest.approx(ref_losses, abs=1e-5), name
        assert checksum == pytest.approx(ref_checksum, rel=1e-5), name
    assert ref_losses[0] != pytest.approx(ref_losses[-1], abs=1e-4)  # the updates really changed the policy


@pytest.mark.parametrize("stage,offload", [(1, False), (2, True)])
def test_deepspeed_one_process_matches_torch(single_process, stage, offload):
    pytest.importorskip("deepspeed")
    losses, checksum = run_losses("deepspeed", stage, offload)
    assert losses == pytest.approx(single_process[0], abs=1e-6)
    assert checksum == pytest.approx(single_process[1], rel=1e-6)
