"""`python -m areal.plan --profile [--out FILE]`: measure this machine as a device profile ("here").

One device = one CPU core (torch.set_num_threads(1), as every process of a local async run uses).
Two models of the shipped family (Qwen2): assets/models/tiny-math (~0.5M parameters) and a ~50M
random-init configuration, so that fixed costs and per-FLOP costs separate:

* decode: areal's engine (rollout/engine.py) decoding requests of 8 samples with `ignore_eos`, at
  several running-batch sizes B_s, 12 new tokens each, and (shipped model) 64 new tokens; the time of
  every decode step (median of three runs) is fitted by least squares as
      t_step = decode_step_s + B_s · decode_seq_s + c · decode_kv_token_s + F_step / infer_flops_s
  (c: the KV-cache tokens that step attends to, B_s · (12 + k) at step k: the steps of one run grow with
  the cache at a fixed batch, which separates c's cost from the batch's; a CPU pays for every cached token
  far beyond its FLOPs);
* training: areal's TrainEngine.train_step (decoupled PPO with the proximal recompute) on synthetic
  groups of 8 samples sharing a prompt of 12 or 48 tokens, at several sizes and 1, 2 or 4 minibatches,
  fitted as
      t_train = M · train_update_s + S · train_seq_s + token passes · train_token_s + F_train / train_flops_s
  (M minibatches, S sequences; token passes and F_train count a shared prompt once per minibatch that
  holds its group, as the trainer packs it: costs.update_tokens). Prompt length and minibatches both
  vary, since a prompt costs about M + 1 passes where a completion token costs 4;
* weight sync: Engine.update_weights of the 50M model's tensors, bytes / seconds (the in-process load
  every update ends with; the loopback broadcast of an async run adds its own copy);
* rewards: the default math reward through a RewardPool of one worker process, per sample.
* a sequence's own work (admission, prefill bookkeeping, fork, finishing: `sequence_s`), from the
  first and last engine steps of the decode runs above, beyond two typical steps;
* areal's own loops: short real runs of sync and async (batch 8, 2 minibatches; three of each, medians).
  The sync run's own `time/reward_s` replaces the reward cost above (a run pays the pool's round trips
  and scheduling, several times the bare call); the async trainer's step, wall time over its thread's CPU
  time in the same step, is `async_train_factor` (its CPU time is what the step costs alone; the rest is
  its main thread preempted by trainer0's other threads and the run's other processes); a step's time
  outside the phases its loop times (batch building, messages, publishing), per group consumed, is the
  loop's own host work (`sync_group_s`, `async_group_s`). All three are measured inside each step,
  so the host's drift between measurements does not enter.
Timings are medians, so the profile is typical of this machine as loaded while it was measured. How fast
that was is kept as `probe_s`: a fixed piece of work (`speed_probe`) timed at the start and at the end of the
measurements; a shared host's speed drifts by 10-20 % within minutes, and the validation times the same
probe around each of its runs.

Writes the profile JSON (default areal/plan/data/here.json, read by `cluster.gpu=here`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from areal.plan import costs
from areal.plan.hardware import HERE_PROFILE, Hardware
from areal.plan.models import from_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "assets" / "models" / "tiny-math"
MODEL_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=11,
                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)


def _models(quick: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tiny = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    out = [("tiny-math", tiny, tiny.config.to_dict())]
    if not quick:
        base = {k: v for k, v in tiny.config.to_dict().items() if k != "layer_types"}
        cfg = Qwen2Config(**{**base, **MODEL_50M, "max_position_embeddings": 512})
        out.append(("qwen2-50m", Qwen2ForCausalLM(cfg), cfg.to_dict()))
    return out


PROMPT_TOKENS = 12  # the decode runs' prompt


def measure_decode(model, batch_sizes, new_tokens: int = 12, repeats: int = 3) -> list[tuple[int, list[float], float]]:
    """(running sequences, seconds of each decode step, seconds of the sequences' own work) at each batch size,
    requests of 8 samples. Step k (k = 1 ... new_tokens - 2: the first step prefills and forks, the last one
    also finishes the sequences) attends to PROMPT_TOKENS + k cached tokens per sequence; its time is the median
    of `repeats` runs, so the steps of one run show how a step grows with the cache at a fixed batch. The
    sequences' own work is what admission (prefill, fork) and finishing cost beyond decode steps: the first and
    the last engine step, over two typical steps."""
    from areal.rollout import Engine
    from areal.rollout.types import SamplingParams

    engine = Engine(model, num_blocks=4096, block_size=16, max_num_seqs=max(batch_sizes), seed=0)
    rows = []
    for bs in batch_sizes:
        params = SamplingParams(n=8, max_new_tokens=new_tokens, ignore_eos=True, seed=1)
        steps, ends = [], []
        for _ in range(repeats):
            for r in range(bs // 8):
                engine.add_request([5 + r % 50] * PROMPT_TOKENS, params, prompt_index=r)
            start = time.perf_counter()
            engine.step()  # prefill + fork, not a decode step
            first = time.perf_counter() - start
            times = []
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            steps.append(times[:-1])
            ends.append(first + times[-1])
        # medians: typical of this machine as loaded now, as a run will see it
        per_step = np.median(np.array(steps), axis=0)
        rows.append((bs, per_step.tolist(), float(np.median(ends)) - 2 * float(np.median(per_step))))
    return rows


def synthetic_batch(groups, vocab: int, generator: torch.Generator):
    """A TrainBatch of random tokens shaped as `groups` = [(prompt length, [completion lengths])], rewards
    alternating 0 / 1 in each group (so advantages are not all zero)."""
    from areal.trainer.batch import build_batch
    from areal.trajectory import Group, Trajectory

    batch_groups = []
    for gi, (prompt_len, completions) in enumerate(groups):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=generator).tolist()
        trajs = [Trajectory(prompt, torch.randint(3, vocab, (c,), generator=generator).tolist(), [-1.0] * c, [0] * c,
                            reward=float(i % 2)) for i, c in enumerate(completions)]
        batch_groups.append(Group(gi, trajs))
    return build_batch(batch_groups, None, pad_token_id=0)


def time_train_step(engine, batch, repeats: int = 5) -> float:
    """Median seconds of engine.train_step(batch) after one warm-up step (optimizer state)."""
    engine.train_step(batch)
    times = []
    for _ in range(repeats):  # the median: typical of this machine as loaded now
        start = time.perf_counter()
        engine.train_step(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_train(model, shapes, vocab: int, repeats: int = 5) -> list[tuple[list, int, float]]:
    """([(prompt, [completions])] per group, minibatches, seconds) for synthetic batches of
    (groups, prompt length, completion length, minibatches)."""
    from areal.trainer.config import TrainerConfig
    from areal.trainer.engine import TrainEngine

    g = torch.Generator().manual_seed(0)
    rows = []
    for groups, prompt_len, completion, minibatches in shapes:
        engine = TrainEngine(model, TrainerConfig(lr=1e-5, minibatches=minibatches), temperature=1.0)
        spec = [(prompt_len, [completion] * 8)] * groups
        rows.append((spec, minibatches, time_train_step(engine, synthetic_batch(spec, vocab, g), repeats)))
    return rows


def measure_weight_sync(model) -> float:
    """Bytes per second of Engine.update_weights for `model`'s tensors."""
    from areal.rollout import Engine

    engine = Engine(model, num_blocks=64, block_size=16, seed=0)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    engine.update_weights(1, tensors)
    times = []
    for version in (2, 3, 4):
        start = time.perf_counter()
        engine.update_weights(version, tensors)
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


def measure_reward(samples: int = 128) -> float:
    """Seconds per sample of the default reward through a RewardPool of one worker process, as a run
    scores a step's groups (one call per group of 8)."""
    from areal.rewards.pool import RewardPool, RewardRequest

    with RewardPool("areal.rewards.math:math_reward", 1, timeout_s=10.0) as pool:
        group = [RewardRequest("Q: 12+34\nA: ", f"{40 + i}", {"answer": "46"}) for i in range(8)]
        pool.score(group)  # the worker's start-up and imports
        start = time.perf_counter()
        for _ in range(samples // 8):
            pool.score(group)
        return (time.perf_counter() - start) / samples


def fit_nonneg(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares on relative errors (each row divided by its target, so the tiny model's
    milliseconds weigh as much as the 50M model's seconds), coefficients ≥ 0: drop the features whose coefficient comes out negative
    and refit (enough for three features; scipy's NNLS is not a dependency)."""
    features, target = features / target[:, None], np.ones_like(target)
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        sol = np.linalg.lstsq(features[:, active], target, rcond=None)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [i for i, c in zip(active, sol) if c >= 0] if (sol >= 0).any() else []
    return coef


def speed_probe(repeats: int = 3) -> float:
    """Seconds of a fixed piece of work on the shipped model: 22 decode steps of 64 sequences and one training
    step of 8 groups (medians of `repeats`). The profile stores it (`probe_s`); the validation runs it around each
    of its runs, to show how fast this machine ran then against when it was profiled (a shared host drifts)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    decode = measure_decode(model, [64], new_tokens=24, repeats=repeats)[0][1]
    _, _, train = measure_train(model, [(8, 12, 8, 2)], model.config.vocab_size, repeats=repeats)[0]
    return float(np.sum(decode)) + train


def profile(quick: bool = False) -> tuple[Hardware, dict]:
    torch.set_num_threads(1)
    raw: dict = {"decode": {}, "train": {}}
    probes = [speed_probe()]
    dec_x, dec_y, tr_x, tr_y = [], [], [], []
    batch_sizes = [8, 32] if quick else [8, 32, 128]
    for name, model, cfg in _models(quick):
        arch = from_config(name, cfg)
        rows = measure_decode(model, batch_sizes)
        raw["decode"][name] = rows
        # the shipped model again, generating longer: the cache's per-token cost (a 50M model's would take minutes)
        longer = measure_decode(model, batch_sizes[1:], new_tokens=64) if name == "tiny-math" and not quick else []
        raw["decode"][name + " (64 new tokens)"] = longer
        for bs, steps, _ in rows + longer:
            for k, t in enumerate(steps, start=1):  # every step: its cache, PROMPT_TOKENS + k tokens a sequence
                kv = bs * (PROMPT_TOKENS + k)
                dec_x.append([1.0, bs, kv, 2.0 * arch.matmul_params * bs + 4.0 * arch.layers * arch.hidden * kv])
                dec_y.append(t)
        if name == "tiny-math":  # host-side work, which the tiny model's FLOPs do not hide: the slope over sequences
            per_sequence = max(0.0, float(np.polyfit([bs for bs, _, _ in rows], [own for _, _, own in rows], 1)[0]))
        # (groups, prompt, completion, minibatches): prompts of two lengths at 1, 2 and 4 minibatches, so that a
        # prompt's per-minibatch repeats and a completion's tokens separate from the per-update cost
        shapes = ([(4, 12, 8, 1), (16, 12, 4, 1), (16, 12, 4, 4), (16, 12, 24, 1), (32, 12, 4, 4), (8, 48, 4, 2),
                   (16, 48, 4, 4)] if name == "tiny-math" else [(2, 12, 8, 1), (4, 12, 16, 1), (4, 48, 8, 2)])
        rows = measure_train(model, shapes if not quick else shapes[:1] + [(8, 12, 8, 2)], arch.vocab)
        raw["train"][name] = [(costs.token_passes(groups, 1, True, mb), mb, t) for groups, mb, t in rows]
        for groups, mb, t in rows:
            tr_x.append([float(mb), float(sum(len(c) for _, c in groups)), costs.token_passes(groups, 1, True, mb),
                         costs.train_flops(arch, groups, extra_forwards=1, minibatches=mb)])
            tr_y.append(t)
        last_model = model
    a, per_seq, per_kv, inv_rate = fit_nonneg(np.array(dec_x), np.array(dec_y))
    ta, per_seq_train, per_tok, tinv = fit_nonneg(np.array(tr_x), np.array(tr_y))
    sync_bw = measure_weight_sync(last_model)
    reward_s = measure_reward(50 if quick else 200)
    big = 1e30  # not the bound on a CPU: no separate memory roofline is measured
    hw = Hardware("here", train_flops_s=1.0 / tinv if tinv > 0 else big, infer_flops_s=1.0 / inv_rate if inv_rate > 0 else big,
                  decode_bytes_s=big, intra_bw=sync_bw, inter_bw=sync_bw, mem_bytes=16e9, devices_per_node=os.cpu_count() or 1,
                  dtype_bytes=4, decode_step_s=float(a), decode_seq_s=float(per_seq), decode_kv_token_s=float(per_kv),
                  train_update_s=float(ta),
                  train_token_s=float(per_tok), train_seq_s=float(per_seq_train), reward_s_per_sample=reward_s,
                  sequence_s=per_sequence, weight_sync_latency_s=0.0,
                  cores=os.cpu_count() or 1)
    raw["weight_sync_bytes_s"] = sync_bw
    raw["reward_s_per_sample"] = reward_s
    raw["probe_s"] = probes + [speed_probe()]  # at the start and at the end of the measurements above
    hw = replace(hw, probe_s=float(np.mean(raw["probe_s"])))
    if not quick:
        hw, raw["loop_calibration"] = calibrate_loops(hw)
    return hw, raw


CALIBRATION = ["trainer.batch_size=8", "trainer.minibatches=2", "rollout.max_staleness=1"]
CALIBRATION_RUNS = 3  # each loop's run, repeated: one run's step time moved by up to 20 % from the next one's


TRAINER_PHASES = ("time/proximal_s", "time/advantage_s", "time/train_s", "time/critic_s")
TIMED_PHASES = {  # what a loop's step is made of besides its own host work, as its metrics time it
    "sync": ("time/generate_s", "time/reward_s", *TRAINER_PHASES, "time/weight_sync_s"),
    "async": ("time/wait_for_batch_s", *TRAINER_PHASES),
}


def loop_overhead_s(rows: list[dict], mode: str) -> float:
    """The median step's time outside the phases the loop times (TIMED_PHASES): its host work on the trainer's
    path (batch building, messages, publishing), measured inside each step, so a shared host's drift between
    measurements does not enter."""
    return max(0.0, float(np.median([r["time/step_s"] - sum(r.get(k, 0.0) for k in TIMED_PHASES[mode])
                                     for r in rows if "time/step_s" in r])))


def calibrate_loops(hw: Hardware, runs: int = CALIBRATION_RUNS) -> tuple[Hardware, dict]:
    """Short real runs of areal's sync and async loops (`runs` of each, medians), with a batch of 8 prompts and 2
    minibatches (the validation's runs use 16 and 4): the reward as the sync loop pays it, the async trainer's
    preemption (`train_factor`), and each loop's own host work per group consumed (`loop_overhead_s` / 8). The
    step the phases above predict for the same run is kept beside the measured one, for comparison."""
    import tempfile

    from areal.config import build
    from areal.plan.validate import mean_prompt_tokens, predict_local, run_local, steady_state
    from areal.recipe import Recipe

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (("sync", ["run.mode=sync", "run.num_threads=1"]), ("async", [])):
            overrides = CALIBRATION + extra
            recipe = build(Recipe, "math.yaml", overrides)
            steps, lengths, factors, reward, overheads = [], [], [], [], []
            for k in range(runs):
                rows = run_local(overrides, Path(tmp) / f"{mode}-{k}", steps=32)
                measured, mean_len = steady_state(rows, warmup=8)
                steps.append(measured)
                lengths.append(mean_len)
                overheads.append(loop_overhead_s(rows[8:], mode) / recipe.trainer.batch_size)
                if mode == "sync":  # the sync loop times its reward phase: the reward as a run pays it
                    samples = recipe.trainer.batch_size * recipe.rollout.group_size
                    reward += [r["time/reward_s"] / samples for r in rows if "time/reward_s" in r][8:]
                else:  # the trainer's step beside a rollout worker: wall time over its CPU time
                    factors.append(train_factor(rows[8:]))
            measured, mean_len = float(np.median(steps)), float(np.mean(lengths))
            found[f"{mode}_measured_step_s_runs"] = steps
            found[f"{mode}_group_s"] = float(np.median(overheads))
            if mode == "sync":
                hw = replace(hw, reward_s_per_sample=float(np.median(reward)), sync_group_s=found["sync_group_s"])
                found["reward_s_per_sample"] = hw.reward_s_per_sample
            else:
                hw = replace(hw, async_train_factor=float(np.median(factors)), async_group_s=found["async_group_s"])
                found["async_train_factor"] = hw.async_train_factor
            found[f"{mode}_measured_step_s"] = measured
            found[f"{mode}_predicted_step_s"] = predict_local(recipe, mean_len, mean_prompt_tokens(recipe), hw)
    return hw, found


def train_factor(rows: list[dict]) -> float:
    """The trainer's step in an async run, wall time over its thread's CPU time (the median over the run's steps):
    what its main thread lost to the run's other threads and processes. Both clocks run in the same step, so a
    shared host's drift between measurements does not enter (the step's CPU time equals the same step alone). At
    least 1."""
    ratios = [sum(r.get(k, 0.0) for k in TRAINER_PHASES) / r["time/train_step_cpu_s"]
              for r in rows if r.get("time/train_step_cpu_s", 0.0) > 0]
    return max(1.0, float(np.median(ratios))) if ratios else 1.0


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv and argv.index("--out") + 1 < len(argv) else HERE_PROFILE
    start = time.perf_counter()
    hw, raw = profile(quick="--quick" in argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(hw.to_json() + "\n")
    print(f"measured in {time.perf_counter() - start:.0f} s; profile written to {out}", file=sys.stderr)
    print(json.dumps({"profile": asdict(hw), "measurements": raw, "out": str(out)}))
    return 0
