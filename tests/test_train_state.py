"""TrainEngine.checkpoint_state / load_checkpoint_state resume exactly, and the before-step hook.

Each case trains K steps, takes the state (cloned, meta through JSON, as a checkpoint would),
trains M more; a fresh engine built from the initial model loads the state and trains the
same M steps: the losses and the final weights must be identical.
"""

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine

from test_deepspeed import free_port
from test_packing import skewed_groups

K, M = 2, 2


def make_model(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def make_cfg(backend: str, stage: int, **kw) -> TrainerConfig:
    # warm-up longer than the run: the LR changes every update, so a lost schedule shows in the losses
    kw = dict(backend=backend, zero_stage=stage, lr=1e-2, warmup_steps=20, minibatches=2, max_tokens_per_microbatch=30,
              grad_clip=1.0) | kw
    return TrainerConfig(**kw)


def batches():
    return [build_batch(skewed_groups(seed=s, groups=2), None, pad_token_id=0) for s in range(K + M)]


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in engine.named_weights()}


def base_lr(engine) -> float:
    return engine.backend.scheduler.optimizer.param_groups[0]["lr"]  # the torch AdamW the schedule drives


def resume_case(backend: str, stage: int, dtype=torch.float32, **cfg_kw) -> dict:
    """Train K, snapshot, train M; fresh engine + load + train M. Returns what the tests compare."""
    cfg = make_cfg(backend, stage, **cfg_kw)
    initial = make_model(dtype)
    data = batches()
    engine = TrainEngine(copy.deepcopy(initial), cfg, temperature=1.0)
    for b in data[:K]:
        engine.train_step(b)
    live, meta = engine.checkpoint_state()
    tensors = {k: v.clone() for k, v in live.items()}
    meta = json.loads(json.dumps(meta))
    saved, saved_lr = weights(engine), (engine.backend.lr, base_lr(engine))
    losses = [engine.train_step(b)["train/loss"] for b in data[K:]]
    final = weights(engine)

    fresh = TrainEngine(copy.deepcopy(initial), cfg, temperature=1.0)
    fresh.load_checkpoint_state(tensors, meta)
    restored, restored_lr, restored_version = weights(fresh), (fresh.backend.lr, base_lr(fresh)), fresh.version
    resumed = [fresh.train_step(b)["train/loss"] for b in data[K:]]
    final_resumed = weights(fresh)
    diff = lambda a, b: max(float((a[k].float() - b[k].float()).abs().max()) for k in a)  # noqa: E731
    assert saved.keys() == restored.keys() == final.keys() == final_resumed.keys()
    return dict(losses=losses, resumed=resumed, restored_diff=diff(saved, restored),
                final_diff=diff(final, final_resumed), moved=diff(saved, final), lr=saved_lr, restored_lr=restored_lr,
                version=meta["version"], restored_version=restored_version, keys=sorted(live), meta=meta)


def check(r: dict, name: str = "") -> None:
    assert r["restored_diff"] == 0.0, name  # the loaded parameters are the saved ones (ZeRO-3: gathered, compared)
    assert r["restored_lr"] == r["lr"] and r["restored_version"] == r["version"] == K, name
    assert r["resumed"] == r["losses"], name
    assert r["final_diff"] == 0.0, name
    assert r["moved"] > 0, name  # the M steps did change the weights


CASES = [  # (backend, ZeRO stage, dtype, offload): with bf16 ZeRO's fp32 master partition matters (bf16 loses bits)
    ("torch", 0, torch.float32, False),
    ("deepspeed", 0, torch.bfloat16, False),  # FP16_UnfusedOptimizer: whole state, fp32 master copies
    ("deepspeed", 1, torch.float32, False),
    ("deepspeed", 2, torch.bfloat16, False),
    ("deepspeed", 2, torch.float32, True),  # optimizer state and fp32 partition on the CPU (ZeRO-Offload)
    ("deepspeed", 3, torch.float32, False),  # every parameter partitioned (partition_everything)
    ("deepspeed", 3, torch.bfloat16, False),
]


def partition_everything(monkeypatch_or_module):
    """ZeRO-3 keeps parameters under 1e5 elements whole on every rank ("persistent"): all of a tiny model.
    A threshold of 0 makes every parameter really partitioned, as in a large model."""
    import areal.trainer.backends as backends

    original = backends.deepspeed_config

    def config(cfg, dtype):
        out = original(cfg, dtype)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    monkeypatch_or_module.setattr(backends, "deepspeed_config", config)


@pytest.mark.parametrize("backend,stage,dtype,offload", CASES,
                         ids=[f"{b}-{s}-{str(d)[6:]}" + ("-offload" if o else "") for b, s, d, o in CASES])
def test_resume_is_exact(backend, stage, dtype, offload, monkeypatch):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    if stage == 3 and dtype == torch.float32:
        partition_everything(monkeypatch)
    r = resume_case(backend, stage, dtype, offload_optimizer=offload)
    check(r)
    assert r["lr"][0] == r["lr"][1] < 1e-2  # mid warm-up
    assert "model/model.embed_tokens.weight" in r["keys"] and any(k.startswith("optim/") for k in r["keys"])
    assert r["meta"]["backend"] == backend and r["meta"]["world_size"] == 1 and r["meta"]["critic"] is None


def test_resume_with_critic_and_reference():
    """ppo_gae: the critic and its optimizer come back too; the KL reference stays the initial weights."""
    r = resume_case("torch", 0, advantage="ppo_gae", kl_coef=0.1, kl_mode="reward")
    check(r)
    for part in ("critic/model/", "critic/optim/"):
        assert any(k.startswith(part) for k in r["keys"]), part


def test_optimizer_state_matters():
    """Control: loading only the parameters (fresh AdamW moments, schedule from 0) does not reproduce the run."""
    cfg = make_cfg("torch", 0)
    initial, data = make_model(), batches()
    engine = TrainEngine(copy.deepcopy(initial), cfg, temperature=1.0)
    for b in data[:K]:
        engine.train_step(b)
    fresh = TrainEngine(copy.deepcopy(initial), cfg, temperature=1.0)
    with torch.no_grad():
        for (_, dst), (_, src) in zip(fresh.backend.inner.named_parameters(), engine.backend.inner.named_parameters()):
            dst.copy_(src)
    resumed = [fresh.train_step(b)["train/loss"] for b in data[K:]]
    assert resumed != [engine.train_step(b)["train/loss"] for b in data[K:]]


@pytest.mark.parametrize("backend,stage", [("torch", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_before_step_runs_before_the_state_changes(backend, stage, monkeypatch):
    """The hook runs once per optimizer step (policy and critic), while the live state still is the snapshot's."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    if stage == 3:
        partition_everything(monkeypatch)
    critic = backend == "torch"
    engine = TrainEngine(make_model(), make_cfg(backend, stage, advantage="ppo_gae" if critic else "grpo"),
                         temperature=1.0)
    data = batches()
    engine.train_step(data[0])
    live, _ = engine.checkpoint_state()
    snapshot = {k: v.clone() for k, v in live.items()}
    seen = []

    def hook():
        seen.append(all(torch.equal(live[k], snapshot[k]) for k in live))

    engine.set_before_step(hook)
    engine.train_step(data[1])  # several micro-batches per minibatch: DeepSpeed steps off the boundary too
    steps = engine.cfg.minibatches * (2 if critic else 1)
    assert len(seen) == steps and seen[0]  # the first runs before anything changed (forward/backward included)
    assert not all(torch.equal(live[k], snapshot[k]) for k in live)  # afterwards the live tensors moved
    engine.set_before_step(None)
    engine.train_step(data[2])
    assert len(seen) == steps


def test_zero_shard_refuses_another_rank_or_world_size():
    pytest.importorskip("deepspeed")
    engine = TrainEngine(make_model(), make_cfg("deepspeed", 2), temperature=1.0)
    tensors, meta = engine.checkpoint_state()
    meta = json.loads(json.dumps(meta))
    meta["policy"]["world_size"] = 2
    with pytest.raises(ValueError, match="partitioned by rank"):
        engine.load_checkpoint_state(tensors, meta)
    meta["backend"] = "torch"
    with pytest.raises(ValueError, match="backend"):
        engine.load_checkpoint_state(tensors, meta)


# ---- two ranks (gloo on CPU), the mechanism of test_deepspeed.py ---------------------------------------
def _rank_main(rank: int, world_size: int, port: int, out_dir: str, runs: list) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    partition_everything(pytest.MonkeyPatch())
    results = {}
    for backend, stage, dtype in runs:
        r = resume_case(backend, stage, getattr(torch, dtype))
        results[f"{backend}-{stage}-{dtype}"] = {k: r[k] for k in ("losses", "resumed", "restored_diff", "final_diff",
                                                                     "moved", "lr", "restored_lr", "version",
                                                                     "restored_version")} | {"rank": r["meta"]["rank"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_two_ranks_resume_is_exact(tmp_path):
    pytest.importorskip("deepspeed")
    runs = [("torch", 0, "float32"), ("deepspeed", 2, "bfloat16"), ("deepspeed", 3, "float32")]
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), runs), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {f"{b}-{s}-{d}" for b, s, d in runs}
        for name, r in results.items():
            r["lr"], r["restored_lr"] = tuple(r["lr"]), tuple(r["restored_lr"])
            check(r, name)
            assert r["rank"] == rank
