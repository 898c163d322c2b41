"""bf16 training with the torch backend: AdamW steps fp32 masters, the bf16 parameters are the working copy
that forward/backward run on, the rollout workers receive and the export holds; checkpoints keep the masters."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from areal.checkpoint.export import export_model
from areal.model import ModelConfig, load_model, load_tokenizer
from areal.rollout.weight_receiver import WeightReceiver
from areal.trainer.backends import TorchBackend
from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine
from areal.trainer.weight_publisher import WeightPublisher
from areal.transport import DistReceiver, DistSender

from test_packing import skewed_groups

TINY_MATH = Path(__file__).resolve().parents[1] / "assets" / "models" / "tiny-math"
TIMEOUT_S = 30.0


def cfg(**kw) -> TrainerConfig:
    return TrainerConfig(**(dict(lr=1e-6, minibatches=1, max_tokens_per_microbatch=64, grad_clip=0.0) | kw))


@pytest.fixture(scope="module")
def tiny_bf16():
    return load_model(ModelConfig(path=str(TINY_MATH), dtype="bfloat16"), torch.device("cpu"))


def batch(seed: int = 0):
    return build_batch(skewed_groups(seed=seed, groups=2), None, pad_token_id=0)


def masters(engine: TrainEngine) -> dict[str, torch.Tensor]:
    tensors, _ = engine.checkpoint_state()
    return {k.removeprefix("model/"): v.clone() for k, v in tensors.items() if k.startswith("model/")}


# ------------------------------------------------------------------ the update is kept
def test_updates_below_half_a_bf16_ulp_accumulate_in_the_masters():
    """Weights of 0.5 (bf16 ulp 2^-8) and Adam steps of ~1e-4: stepping bf16 weights rounds every step away;
    the masters take each one, and the working copy moves once they add up past half an ulp."""
    def linear():
        layer = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
        torch.nn.init.constant_(layer.weight, 0.5)
        return layer

    def run(step, layer, n):
        for _ in range(n):
            layer(torch.ones(1, 8, dtype=torch.bfloat16)).sum().backward()
            step()

    mixed = linear()
    backend = TorchBackend(mixed, cfg(lr=1e-4))
    run(backend.step, mixed, 1)
    assert backend.masters[0].dtype == torch.float32
    assert torch.allclose(backend.masters[0], torch.full((8, 8), 0.5 - 1e-4), rtol=0, atol=1e-6)  # Adam: ~lr * sign(g)
    assert torch.equal(mixed.weight, torch.full((8, 8), 0.5, dtype=torch.bfloat16))  # not yet past half an ulp
    run(backend.step, mixed, 29)
    assert torch.allclose(backend.masters[0], torch.full((8, 8), 0.5 - 30e-4), rtol=0, atol=1e-5)
    assert torch.equal(mixed.weight, backend.masters[0].to(torch.bfloat16))
    assert float(mixed.weight.detach()[0, 0]) < 0.5

    pure = linear()  # what stepping the bf16 weights does: 30 updates, none kept
    optimizer = torch.optim.AdamW(pure.parameters(), lr=1e-4, weight_decay=0.0)

    def pure_step():
        optimizer.step()
        optimizer.zero_grad()

    run(pure_step, pure, 30)
    assert torch.equal(pure.weight, torch.full((8, 8), 0.5, dtype=torch.bfloat16))


def test_fp32_model_has_no_masters():
    layer = torch.nn.Linear(4, 4)
    backend = TorchBackend(layer, cfg())
    assert backend.masters is None
    assert backend.optimizer.param_groups[0]["params"][0] is layer.weight


def test_engine_step_at_rl_learning_rate_moves_the_masters(tiny_bf16):
    """tiny-math in bf16, lr 1e-6: the step changes the fp32 masters; rounding them gives back the bf16 weights
    for ~99% of the elements (which a pure-bf16 step would therefore have left as they were)."""
    engine = TrainEngine(copy.deepcopy(tiny_bf16), cfg(), temperature=1.0)
    before = masters(engine)
    assert all(t.dtype == torch.float32 for t in before.values())
    engine.train_step(batch())
    after = masters(engine)
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    total = sum(t.numel() for t in before.values())
    assert changed > 0.5 * total
    for name, w in engine.named_weights():
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, after[name].to(torch.bfloat16))
    rounded_away = sum(int((after[n].to(torch.bfloat16) == before[n].to(torch.bfloat16)).sum()) for n in before)
    assert rounded_away > 0.95 * total  # 98.9% here


# ------------------------------------------------------------------ what leaves the trainer
def test_published_weights_are_bf16(tiny_bf16):
    engine = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3), temperature=1.0)
    engine.train_step(batch())
    sender = DistSender(1, timeout_s=TIMEOUT_S)
    receiver = WeightReceiver(DistReceiver(sender.address, 1, 1, timeout_s=TIMEOUT_S))
    pub = WeightPublisher(sender)
    try:
        pub.publish(engine.version, engine.named_weights())
        update = receiver.wait_for(engine.version, timeout=TIMEOUT_S)
        assert {t.dtype for t in update.header.layout.tensors} == {"bfloat16"}
        got, sent = dict(update.named_tensors()), dict(engine.named_weights())
        assert got.keys() == sent.keys() and all(torch.equal(got[n], sent[n]) for n in sent)
        assert update.bytes < sum(t.numel() * 4 for t in sent.values()) / 1.9  # 2 bytes a weight (+ alignment)
        update.release()
    finally:
        pub.close()
        receiver.close()


def test_export_is_in_the_configured_dtype(tiny_bf16, tmp_path):
    engine = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3), temperature=1.0)
    engine.train_step(batch())
    out = export_model(engine, tmp_path / "model", load_tokenizer(ModelConfig(path=str(TINY_MATH))))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = dict(engine.named_weights())
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in f.keys():
            assert f.get_tensor(name).dtype == torch.bfloat16, name
            assert torch.equal(f.get_tensor(name), weights[name]), name


# ------------------------------------------------------------------ resume
def test_resume_restores_the_fp32_masters_exactly(tiny_bf16):
    engine = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3, warmup_steps=5), temperature=1.0)
    engine.train_step(batch(0))
    live, meta = engine.checkpoint_state()
    assert {v.dtype for k, v in live.items() if k.startswith(("model/", "optim/state/"))} == {torch.float32}
    tensors, meta = {k: v.clone() for k, v in live.items()}, json.loads(json.dumps(meta))
    saved = masters(engine)

    fresh = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3, warmup_steps=5), temperature=1.0)
    fresh.load_checkpoint_state(tensors, meta)
    restored = masters(fresh)
    assert all(torch.equal(restored[n], saved[n]) for n in saved)
    assert all(torch.equal(w, saved[n].to(torch.bfloat16)) for n, w in fresh.named_weights())

    loss = engine.train_step(batch(1))["train/loss"]  # and training goes on the same
    assert fresh.train_step(batch(1))["train/loss"] == loss
    after, resumed = masters(engine), masters(fresh)
    assert all(torch.equal(after[n], resumed[n]) for n in after)


def test_bf16_engine_state_loads_a_pure_bf16_checkpoint(tiny_bf16):
    """A checkpoint written before masters existed (bf16 parameters and AdamW state) still loads: cast up."""
    engine = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3), temperature=1.0)
    engine.train_step(batch(0))
    live, meta = engine.checkpoint_state()
    old = {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("step") else v.clone()
           for k, v in live.items()}
    fresh = TrainEngine(copy.deepcopy(tiny_bf16), cfg(lr=1e-3), temperature=1.0)
    fresh.load_checkpoint_state(old, json.loads(json.dumps(meta)))
    assert all(torch.equal(m, old[f"model/{n}"].float()) for n, m in masters(fresh).items())
    assert {t.dtype for s in fresh.backend.optimizer.state.values() for k, t in s.items() if k != "step"} == {
        torch.float32}
    fresh.train_step(batch(1))

