"""areal.plan: the cost model's formulas, the simulator's use of the real admission control, the split
search and the CLI (on every bundled recipe)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from areal.plan import costs
from areal.plan.__main__ import main as plan_main
from areal.plan.hardware import GPUS, Hardware
from areal.plan.models import KNOWN_MODELS, Architecture, load_architecture
from areal.plan.simulate import (SimResult, Simulation, Workload, candidate_splits, core_slowdown, recommend_split,
                                 simulate)

ROOT = Path(__file__).resolve().parents[1]
TOY = Architecture("toy", layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, vocab=10, tied_embeddings=True)
# a device with round numbers, so hand-computed times are exact
UNIT = Hardware("unit", train_flops_s=1e3, infer_flops_s=1e3, decode_bytes_s=1e3, intra_bw=100.0, inter_bw=10.0,
                mem_bytes=1e6, devices_per_node=2, dtype_bytes=2, decode_step_s=0.5, decode_seq_s=0.0,
                train_update_s=1.0, weight_sync_latency_s=0.25)


def test_architecture_counts_match_published_sizes():
    # head_dim 2, kv width 2: q/k/v 4*(4+4) + 8 bias, o 16, mlp 96, norms 8 -> 160 per layer
    assert TOY.layer_params == 160
    assert TOY.params == 2 * 160 + 4 + 10 * 4
    assert TOY.matmul_params == 2 * (160 - 8) + 40
    assert TOY.kv_bytes_per_token(2) == 2 * 2 * 1 * 2 * 2
    # the hub table reproduces the models' published parameter counts
    assert KNOWN_MODELS["Qwen/Qwen2.5-7B"].params == pytest.approx(7.62e9, rel=0.01)
    assert KNOWN_MODELS["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].params == pytest.approx(1.78e9, rel=0.01)
    assert KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"].params == pytest.approx(0.494e9, rel=0.01)
    assert load_architecture(str(ROOT / "assets/models/tiny-math")).params == 477312  # its safetensors' count


def test_cost_functions_against_hand_computed_values():
    p_mm = TOY.matmul_params  # 344
    assert costs.forward_flops(TOY, 3) == 2 * p_mm * 3 + 2 * 2 * 4 * 9
    # one group, prompt 2, completions 1 and 3; shared prompt: tokens 6, attention 4 + (1+4) + (9+12)
    assert costs.packed_tokens([(2, [1, 3])], True) == (6.0, 30.0)
    assert costs.packed_tokens([(2, [1, 3])], False) == (8.0, 34.0)
    # the head (V·d = 40) runs on the 4 completion targets only; one minibatch packs the prompt once, as the
    # proximal forward does: 1 + 3 passes of 2·(344 − 40)·6 + 2·40·4 + 2·L·d·30
    one_pass = 2 * (p_mm - 40) * 6 + 2 * 40 * 4 + 2 * 2 * 4 * 30
    assert costs.train_flops(TOY, [(2, [1, 3])], extra_forwards=1) == 4 * one_pass
    # 3 minibatches of 2 sequences: chunks of 1, so each holds one of the two and packs the prompt (T = 2):
    # the update passes see 2·2 + 4 = 8 tokens, attention 2·4 + (1 + 4) + (9 + 12) = 34
    assert costs.minibatch_touches(2, 2, 3) == 2.0
    assert costs.update_tokens([(2, [1, 3])], 3, True) == (8.0, 34.0)
    assert costs.update_tokens([(2, [1, 3])], 3, False) == costs.packed_tokens([(2, [1, 3])], False)
    flops = one_pass + 3 * (2 * (p_mm - 40) * 8 + 2 * 40 * 4 + 2 * 2 * 4 * 34)
    assert costs.train_flops(TOY, [(2, [1, 3])], extra_forwards=1, minibatches=3) == flops
    assert costs.token_passes([(2, [1, 3])], 1, True, 3) == 6 + 3 * 8
    # 2 devices in one node: ring all-reduce 2·(1/2)·P·2 bytes over 100 B/s
    allreduce = TOY.params * 2 / 100.0
    assert costs.train_time(TOY, UNIT, [(2, [1, 3])], devices=2, minibatches=3, extra_forwards=1) == pytest.approx(
        flops / 2e3 + 3 * (1.0 + allreduce))
    # decode, batch 2 with 10 KV tokens: bytes 2P + 10·16 = 968 < FLOPs 2·344·2 + 4·2·4·10 = 1696 (compute-bound)
    bytes_step = TOY.params * 2 + 10 * 16
    flops_step = 2 * p_mm * 2 + 4 * 2 * 4 * 10
    assert flops_step > bytes_step
    assert costs.decode_step_time(TOY, UNIT, 2, 10) == pytest.approx(0.5 + flops_step / 1e3)
    fast_math = replace(UNIT, infer_flops_s=1e9)  # now the KV reads bound the step
    assert costs.decode_step_time(TOY, fast_math, 1, 1000) == pytest.approx(0.5 + (TOY.params * 2 + 1000 * 16) / 1e3)
    assert costs.decode_step_time(TOY, UNIT, 0, 0) == 0.0
    assert costs.prefill_time(TOY, UNIT, 5) == pytest.approx(costs.forward_flops(TOY, 5) / 1e3)
    assert costs.weight_sync_time(TOY, UNIT, 2) == pytest.approx(0.25 + TOY.params * 2 / 100.0)
    assert costs.weight_sync_time(TOY, UNIT, 3) == pytest.approx(0.25 + TOY.params * 2 / 10.0)  # across nodes
    assert costs.kv_capacity_tokens(TOY, UNIT) == int((1e6 * 0.85 - TOY.params * 2) // 16)


def test_minibatch_touches_match_the_trainers_random_split():
    """T_g: how many of the M minibatches (torch.randperm(S).chunk(M), as TrainEngine draws them) hold a sample of
    a group of k, against a Monte Carlo of that split."""
    import torch

    assert costs.minibatch_touches(8, 128, 1) == 1.0
    assert costs.minibatch_touches(1, 128, 4) == pytest.approx(1.0)  # one sample is in exactly one minibatch
    assert costs.minibatch_touches(64, 128, 4) == pytest.approx(4.0)  # half the batch reaches every minibatch
    gen = torch.Generator().manual_seed(0)
    for k, groups, minibatches in ((8, 16, 4), (8, 8, 2), (3, 5, 4)):
        S = k * groups
        draws = []
        for _ in range(2000):
            group_of = torch.arange(S) // k
            chunks = torch.randperm(S, generator=gen).chunk(minibatches)
            draws.append(sum(int((group_of[chunk] == 0).any()) for chunk in chunks))
        assert costs.minibatch_touches(k, S, minibatches) == pytest.approx(np.mean(draws), abs=0.05)


def test_gpu_profiles_and_tensor_parallel():
    h100 = GPUS["h100"]
    assert h100.train_flops_s == pytest.approx(989e12 * 0.35)
    assert h100.decode_bytes_s == pytest.approx(3.35e12 * 0.6)
    assert costs.tensor_parallel(KNOWN_MODELS["Qwen/Qwen2.5-7B"], h100) == 1  # 15 GB fits in 80 GB
    big = replace(h100, mem_bytes=20e9)
    assert costs.tensor_parallel(KNOWN_MODELS["Qwen/Qwen2.5-7B"], big) == 2


def test_lognormal_lengths_are_capped_and_have_the_stated_mean():
    lens = costs.lognormal_lengths(1000, 100_000, 0.8, 200_000, np.random.default_rng(0))
    assert lens.mean() == pytest.approx(1000, rel=0.02)
    capped = costs.lognormal_lengths(1000, 1500, 0.8, 10_000, np.random.default_rng(0))
    assert capped.max() == 1500 and capped.min() >= 1
    assert capped.mean() < 960  # the lognormal's own mean is 1000; capping takes some off
    # a mean measured by a run is of capped lengths: capped_mean keeps it, even with most samples at the cap
    capped = costs.lognormal_lengths(1000, 1500, 0.8, 100_000, np.random.default_rng(0), capped_mean=True)
    assert capped.mean() == pytest.approx(1000, rel=0.01) and capped.max() == 1500
    assert costs.lognormal_lengths(43.7, 48, 0.3, 100_000, np.random.default_rng(0),
                                   capped_mean=True).mean() == pytest.approx(43.7, rel=0.01)


def _toy_workload(**kw) -> Workload:
    base = dict(arch=TOY, hw=GPUS["h100"], groups_per_step=4, group_size=2, prompt_len=8, mean_len=50, max_len=50,
                lengths=(50,), minibatches=1, extra_forwards=1)
    return Workload(**{**base, **kw})


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_simulation_drives_the_real_controller_and_respects_eta(eta):
    w = _toy_workload(admission="greedy")
    sim = Simulation(w, "async", eta, rollout_devices=2, train_devices=1, measured=6)
    result = sim.run()
    from areal.buffer.staleness import StalenessController

    assert isinstance(sim.controller, StalenessController)
    assert sim.controller.version == len(sim.step_ends)
    # equal lengths: groups finish in admission order, so the controller's bound is a hard one
    assert result.max_staleness <= eta
    if eta == 0:
        assert result.mean_staleness == 0.0
    assert sim.controller.accepted + sim.controller.running <= (eta + sim.controller.version + 1) * 4


def test_eta_zero_alternates_generation_and_training():
    """η = 0: nothing is generated while the trainer trains, as in synchronous RL."""
    w = _toy_workload(admission="greedy")
    sim = Simulation(w, "async", 0, rollout_devices=1, train_devices=1, measured=4)
    sim.run()
    busy = sim.servers[0]
    for start, end in sim.train_busy[1:]:  # the server is idle through every training step
        assert any(a <= start + 1e-9 and b >= end - 1e-9 for a, b in busy.idle)


def test_async_beats_sync_when_generation_dominates():
    w = _toy_workload(hw=replace(GPUS["h100"], decode_step_s=0.01), lengths=(), mean_len=400, max_len=2000,
                      sigma=1.0, groups_per_step=16, group_size=4)
    sync = simulate(w, "sync", 0, 8, 8, measured=4)
    best, _ = recommend_split(w, 8, 2, measured=4)
    assert best.tokens_per_s > sync.tokens_per_s
    assert sync.mean_staleness == 0.0 and sync.rollout_idle > 0.0  # the long tail idles servers


def test_split_recommendation_is_the_brute_force_optimum():
    w = _toy_workload(hw=replace(GPUS["h100"], decode_step_s=0.01, train_flops_s=1e6), lengths=(),
                      mean_len=200, max_len=800, sigma=0.7, groups_per_step=8, group_size=2)
    best, tried = recommend_split(w, 6, 1, measured=4)
    brute = {r: simulate(w, "async", 1, r, 6 - r, measured=4).tokens_per_s for r in range(1, 6)}
    assert best.rollout_devices == max(brute, key=brute.get)
    assert best.tokens_per_s == pytest.approx(max(brute.values()))
    assert candidate_splits(6, 1) == [1, 2, 3, 4, 5]
    assert len(candidate_splits(1024, 1)) <= 24


def test_core_sharing_counts_busy_time_only():
    def result(rollout_idle, trainer_idle):
        return SimResult("async", 1, 2, 1, 1.0, 1.0, rollout_idle, trainer_idle, 0.0, 0.0, 0, 1.0)

    # two servers busy 90 % and a trainer always busy: demand 2.8 on 2 cores
    assert core_slowdown(result(0.1, 0.0), servers=2, cores=2) == pytest.approx(1.4)
    # mostly idle servers cost the trainer nothing
    assert core_slowdown(result(0.97, 0.0), servers=2, cores=2) == 1.0
    # and a shared-core device stretches an async run that is busy enough
    cpu = replace(UNIT, cores=1, decode_step_s=0.01, train_update_s=0.01)
    w = _toy_workload(hw=cpu, admission="greedy", lengths=(20,))
    fast = Simulation(w, "async", 1, 1, 1, measured=4).run()
    shared = simulate(w, "async", 1, 1, 1, measured=4)
    assert shared.step_s > fast.step_s


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "areal.plan", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_on_the_default_recipe_ends_with_json():
    out = _run_cli("recipe=recipes/math.yaml", "cluster.gpus=8", "cluster.gpu=h100")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gpus"] == 8 and result["gpu"] == "h100"
    assert [r["eta"] for r in result["async"]] == [1, 2, 4, 8]
    assert result["recommended"]["rollout_devices"] + result["recommended"]["train_devices"] == 8
    assert result["sync"]["mode"] == "sync"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_bundled_recipe_plans(recipe, capsys):
    assert plan_main([f"recipe={recipe}", "cluster.gpus=4", "cluster.gpu=a100", "cluster.etas=[1,4]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sync"]["tokens_per_s"] > 0 and len(result["async"]) == 2


@pytest.mark.parametrize("args", [
    ["recipe=math.yaml", "cluster.nodes=2"],
    ["recipe=math.yaml", "cluster.gpus=zero"],
    ["recipe=math.yaml", "cluster.gpu=tpu"],
    ["recipe=math.yaml", "cluster.gpus=8", "model.path=nobody/unknown-model"],
    ["recipe=math.yaml", "cluster.lengths_from=/nonexistent/run"],
])
def test_bad_input_is_one_line_and_exit_2(args, capsys):
    assert plan_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_lengths_from_a_run_folder(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/response_length": 5.0}) + "\n"
                                            + json.dumps({"step": 2, "rollout/response_length": 3.0}) + "\n")
    assert plan_main(["recipe=math.yaml", "cluster.gpus=4", f"cluster.lengths_from={tmp_path}",
                      "cluster.etas=[2]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["workload"]["mean_len"] == 4.0


def test_quick_profile_feeds_the_planner(tmp_path, capsys):
    """`--profile --quick` (the shipped model only, a few seconds) writes a profile the CLI accepts as a device."""
    out = tmp_path / "here.json"
    assert plan_main(["--profile", "--quick", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert profile["cores"] >= 1 and profile["decode_step_s"] >= 0 and profile["train_flops_s"] > 0
    assert profile["probe_s"] > 0  # the host's speed while profiled, which the validation compares its runs with
    capsys.readouterr()
    assert plan_main(["recipe=math.yaml", "cluster.gpus=2", f"cluster.gpu={out}", "cluster.etas=[1]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["gpu"] == "here" and result["async"][0]["step_s"] > 0
