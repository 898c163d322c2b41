"""Train-step throughput and peak memory: areal (packed / padded) vs TRL's GRPOTrainer loss step.

Same model, same init, same batch of RL trajectories with skewed (lognormal) completion
lengths, fp32 on CPU. Each (model, system) runs in a fresh subprocess so peak memory is
that run's alone: we report the growth of the peak RSS over the RSS right before the
first step (the model, optimizer and batch already built; AdamW state is allocated in
the first step by every system alike).

Systems, all one optimizer update per step over the whole batch, on-policy (no extra
proximal forward: areal `decoupled=False`, TRL `num_iterations=1`):
* areal        TrainEngine, sequences bin-packed under a token budget, varlen attention
* areal-pad    TrainEngine, padding to the batch's longest sequence (`trainer.packing=False`)
* trl          GRPOTrainer.compute_loss on the batch laid out as TRL lays it out after
               generation (prompts left-padded, completions right-padded to the batch's
               longest), in `per_device_train_batch_size` chunks with gradient accumulation,
               then clip + AdamW step. Calling compute_loss on the prepared batch times
               exactly TRL's loss/backward/step path, not its generation or reward code.
Trained tokens = real (prompt + completion) tokens; tokens/s = trained tokens / step time
(best of the timed steps). One torch thread (BENCH_THREADS) because the 2-core machine is
shared: more threads than free cores makes wall times erratic; tokens per CPU-second is
printed as a contention-robust second figure.

    python benchmarks/train_step.py            # both models, < 5 min on 2 cores
    python benchmarks/train_step.py --quick    # the small model only
Last line: one JSON object (speedup_vs_trl and peak_memory_ratio_vs_trl on the large model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "models" / "tiny-math"
MODELS = {
    # ~54M parameters: 12 layers, hidden 512, vocab 32k (tied)
    "qwen2-54m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4),
    # the shipped default model's shape (random weights if the folder is missing)
    "tiny-math": dict(vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2),
}
SETUPS = {  # groups x group size, prompt and completion lengths (lognormal: median, sigma, cap)
    "tiny-math": dict(groups=8, n=8, prompt=(8, 24), median=12, sigma=1.0, cap=200, microbatch_rows=16),
    "qwen2-54m": dict(groups=3, n=4, prompt=(30, 80), median=120, sigma=0.9, cap=1024, microbatch_rows=4),
}


def build_model(name: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    if name == "tiny-math" and (TINY / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    cfg = Qwen2Config(**MODELS[name], max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).float()


def make_batch(name: str, vocab: int):
    """Groups of trajectories with lognormal completion lengths (fixed seed)."""
    from areal.trajectory import Group, Trajectory

    s = SETUPS[name]
    g = torch.Generator().manual_seed(1234)
    groups = []
    for gi in range(s["groups"]):
        plen = int(torch.randint(s["prompt"][0], s["prompt"][1] + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (plen,), generator=g).tolist()
        trajs = []
        for _ in range(s["n"]):
            c = math.exp(math.log(s["median"]) + s["sigma"] * float(torch.randn(1, generator=g)))
            c = int(min(max(c, 4), s["cap"]))
            comp = torch.randint(3, vocab, (c,), generator=g).tolist()
            trajs.append(Trajectory(prompt, comp, (-torch.rand(c, generator=g) * 2).tolist(), [0] * c,
                                    reward=float(torch.rand(1, generator=g) > 0.5)))
        groups.append(Group(gi, trajs))
    return groups


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_areal(model, groups, setup, packed: bool, steps: int):
    from areal.trainer.advantages import group_advantages
    from areal.trainer.batch import build_batch
    from areal.trainer.config import TrainerConfig
    from areal.trainer.engine import TrainEngine

    adv = group_advantages(torch.tensor([grp.rewards for grp in groups]), "grpo")
    batch = build_batch(groups, adv.tolist(), pad_token_id=0)
    width = batch.input_ids.shape[1]
    budget = setup["microbatch_rows"] * width  # the same token budget TRL's padded micro-batches use
    cfg = TrainerConfig(lr=1e-5, decoupled=False, packing=packed, max_tokens_per_microbatch=budget,
                        aggregation="token-mean", behaviour_weight_cap=0.0)
    engine = TrainEngine(model, cfg, temperature=1.0)
    return lambda: engine.train_step(batch)


def run_trl(model, groups, setup, steps: int):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = setup["microbatch_rows"]
    trajs = [t for grp in groups for t in grp.trajectories]
    P = max(len(t.prompt_ids) for t in trajs)
    C = max(len(t.completion_ids) for t in trajs)
    S = len(trajs)
    prompt_ids = torch.zeros(S, P, dtype=torch.long)
    prompt_mask = torch.zeros(S, P, dtype=torch.long)
    completion_ids = torch.zeros(S, C, dtype=torch.long)
    completion_mask = torch.zeros(S, C, dtype=torch.long)
    for i, t in enumerate(trajs):  # TRL: prompts left-padded, completions right-padded
        p, c = len(t.prompt_ids), len(t.completion_ids)
        prompt_ids[i, P - p:] = torch.tensor(t.prompt_ids)
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.tensor(t.completion_ids)
        completion_mask[i, :c] = 1
    rewards = torch.tensor([grp.rewards for grp in groups])
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    advantages = ((rewards - mean) / (std + 1e-4)).reshape(-1)
    tmp = tempfile.mkdtemp()
    args = GRPOConfig(output_dir=tmp, use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=rows,
                      gradient_accumulation_steps=math.ceil(S / rows), num_generations=setup["n"], beta=0.0,
                      loss_type="bnpo", learning_rate=1e-5, max_grad_norm=1.0, report_to=[], logging_steps=10**6,
                      max_completion_length=C, disable_dropout=True)
    tokenizer = AutoTokenizer.from_pretrained(TINY) if TINY.exists() else None
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}), processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
    chunks = [slice(i, i + rows) for i in range(0, S, rows)]
    trainer.current_gradient_accumulation_steps = len(chunks)
    model.train()

    def step():
        for sl in chunks:
            inputs = dict(prompt_ids=prompt_ids[sl], prompt_mask=prompt_mask[sl], completion_ids=completion_ids[sl],
                          completion_mask=completion_mask[sl], advantages=advantages[sl],
                          num_items_in_batch=completion_mask.sum())
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def child(name: str, system: str, steps: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model = build_model(name)
    groups = make_batch(name, model.config.vocab_size)
    setup = SETUPS[name]
    if system == "trl":
        step = run_trl(model, groups, setup, steps)
    else:
        step = run_areal(model, groups, setup, packed=system == "areal", steps=steps)
    tokens = sum(t.num_tokens for grp in groups for t in grp.trajectories)
    base = rss_bytes()
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    step_s, cpu_s = min(times), min(cpu_times)
    return {"model": name, "system": system, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s, "tokens_per_cpu_s": tokens / cpu_s,
            "peak_mem_mb": (peak_rss_bytes() - base) / 2**20, "peak_rss_mb": peak_rss_bytes() / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the small model only")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SYSTEM", "STEPS"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    models = ["tiny-math"] if args.quick else ["tiny-math", "qwen2-54m"]
    results = []
    for name in models:
        steps = 3 if name == "tiny-math" else 1
        for system in ("areal", "areal-pad", "trl"):
            out = subprocess.run([sys.executable, __file__, "--child", name, system, str(steps)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}/{system} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{name:10s} {system:9s} {r['params_m']:6.1f}M params  {r['tokens']:6d} tok  step {r['step_s']:7.2f} s  "
                  f"{r['tokens_per_s']:8.0f} tok/s ({r['tokens_per_cpu_s']:.0f}/cpu-s)  peak +{r['peak_mem_mb']:7.0f} MiB (rss {r['peak_rss_mb']:.0f})",
                  flush=True)
    summary = {}
    for name in models:
        by = {r["system"]: r for r in results if r["model"] == name}
        summary[name] = {
            "speedup_vs_trl": by["areal"]["tokens_per_s"] / by["trl"]["tokens_per_s"],
            "cpu_time_speedup_vs_trl": by["areal"]["tokens_per_cpu_s"] / by["trl"]["tokens_per_cpu_s"],
            "speedup_padded_vs_trl": by["areal-pad"]["tokens_per_s"] / by["trl"]["tokens_per_s"],
            "peak_memory_ratio_vs_trl": by["areal"]["peak_mem_mb"] / max(by["trl"]["peak_mem_mb"], 1e-9),
            "tokens_per_s": {s: round(r["tokens_per_s"], 1) for s, r in by.items()},
            "peak_mem_mb": {s: round(r["peak_mem_mb"], 1) for s, r in by.items()},
        }
    head = summary[models[-1]]
    print(json.dumps({"model": models[-1], "speedup_vs_trl": round(head["speedup_vs_trl"], 3),
                      "cpu_time_speedup_vs_trl": round(head["cpu_time_speedup_vs_trl"], 3),
                      "peak_memory_ratio_vs_trl": round(head["peak_memory_ratio_vs_trl"], 3), "per_model": summary}))


if __name__ == "__main__":
    main()
