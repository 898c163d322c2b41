"""Rollout throughput: areal Engine vs HF `generate` (static batches) vs vLLM CPU, same model and workload.

Workload: P prompts x n samples, ignore_eos, per-prompt max_new_tokens drawn from a long-tailed
(log-normal) distribution capped at --max-tokens, identical for every engine. tokens/s counts the
requested tokens only (a static batch that runs past a row's length wastes that work).

    python benchmarks/rollout_throughput.py            # default model + the ~50M config
    python benchmarks/rollout_throughput.py --skip-large

The LAST line printed is one JSON object (default-model figures plus the large ones).
Every engine runs single-threaded by default (--threads; vLLM gets OMP_NUM_THREADS the same): on a
shared 2-core box, 2 OpenMP threads per process oversubscribe the cores and everything slows ~20x.
tok/cpu-s (tokens per CPU-second of the measuring process) is the figure to compare when others
are using the machine; wall tok/s then mostly measures the scheduler's share given to each run.
vLLM runs in its own virtualenv (scripts/setup_vllm_cpu.sh) as a subprocess; skipped if absent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "assets" / "models" / "tiny-math"
VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", str(Path.home() / ".venvs" / "vllm-cpu"))) / "bin" / "python"


def build_model(size: str):
    """The shipped tiny model (its random-initialised config while the weights are not there yet),
    else a random Qwen2 of ~0.6M (tiny) or ~54M (large) params. Returns (model, dir with weights or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    if size == "tiny" and (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval(), str(DEFAULT_MODEL_DIR)
    if size == "tiny" and (DEFAULT_MODEL_DIR / "config.json").exists():
        cfg = AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    elif size == "tiny":
        cfg = Qwen2Config(vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=1024)
    else:
        cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(cfg).eval(), None


def workload(num_prompts: int, prompt_len: int, max_tokens: int, vocab: int, seed: int = 0):
    """Prompts (random ids, length prompt_len +- 20%) and long-tailed per-prompt lengths in [4, max_tokens]."""
    rng = random.Random(seed)
    prompts, lengths = [], []
    for _ in range(num_prompts):
        n = max(2, int(prompt_len * rng.uniform(0.8, 1.2)))
        prompts.append([rng.randrange(4, vocab) for _ in range(n)])
        lengths.append(int(min(max_tokens, max(4, math.exp(rng.gauss(math.log(max_tokens) - 2.0, 1.0))))))
    return prompts, lengths


def run_areal(model, prompts, lengths, n) -> tuple[float, float]:
    from areal.rollout import Engine, SamplingParams

    total = n * sum(len(p) + m for p, m in zip(prompts, lengths))
    engine = Engine(model, num_blocks=max(64, total // 16 + 4 * len(prompts) * n), block_size=16,
                    max_num_seqs=1024, max_num_batched_tokens=4096)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (p, m) in enumerate(zip(prompts, lengths)):
        engine.add_request(p, SamplingParams(
            n=n, temperature=1.0, max_new_tokens=m, ignore_eos=True), prompt_index=i)
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.token_ids) for _, o in engine.step())
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert produced == n * sum(lengths), (produced, n * sum(lengths))
    print(f"  areal stats: {engine.stats()}")
    return produced / elapsed, produced / cpu


@torch.inference_mode()
def run_hf(model, prompts, lengths, n, batch_size: int) -> tuple[float, float]:
    rows = [(p, m) for p, m in zip(prompts, lengths) for _ in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=max(m for _, m in chunk), min_new_tokens=max(m for _, m in chunk),
                       pad_token_id=0, eos_token_id=None)
    return n * sum(lengths) / (time.perf_counter() - t0), n * sum(lengths) / (time.process_time() - c0)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from vllm import LLM, SamplingParams

    def main():  # vLLM spawns its engine core: everything under the __main__ guard
        model_dir, work = sys.argv[1], json.load(open(sys.argv[2]))
        llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=work["max_len"],
                  enforce_eager=True, seed=0)
        reqs = [{"prompt_token_ids": p} for p in work["prompts"]]
        # no per-request seed: vLLM CPU rejects it ("CPU Generator does not use offset")
        params = [SamplingParams(n=work["n"], temperature=1.0, max_tokens=m, ignore_eos=True, detokenize=False)
                  for i, m in enumerate(work["lengths"])]
        llm.generate(reqs[:2], params[:2], use_tqdm=False)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print("VLLM_RESULT " + json.dumps({"tokens": sum(len(c.token_ids) for o in outs for c in o.outputs), "seconds": dt, "cpu_seconds": cpu}), flush=True)

    if __name__ == "__main__":
        main()
    """
)


def run_vllm(model, model_dir, prompts, lengths, n, threads: int = 1) -> tuple[float, float] | None:
    if not VLLM_PYTHON.exists():
        print(f"  vLLM: skipped (no virtualenv at {VLLM_PYTHON.parent.parent}; run scripts/setup_vllm_cpu.sh)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = os.path.join(tmp, "model")
            model.save_pretrained(model_dir)
        work = os.path.join(tmp, "work.json")
        max_len = min(max(len(p) for p in prompts) + max(lengths) + 8, model.config.max_position_embeddings)
        Path(work).write_text(json.dumps(dict(prompts=prompts, lengths=lengths, n=n, max_len=max_len)))
        script = os.path.join(tmp, "run_vllm.py")
        Path(script).write_text(VLLM_SCRIPT)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_TARGET_DEVICE="cpu",
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), OMP_NUM_THREADS=str(threads),
                   # engine core in-process: one process, so its CPU time is measurable like ours
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        proc = subprocess.run([str(VLLM_PYTHON), script, model_dir, work], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr[-int(os.environ.get("VLLM_ERR_CHARS", "1500")) :]
            print(f"  vLLM: failed (rc={proc.returncode}): {tail}")
            return None
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_RESULT ")][-1]
        result = json.loads(line.removeprefix("VLLM_RESULT "))
        return result["tokens"] / result["seconds"], result["tokens"] / result["cpu_seconds"]


def bench(size, num_prompts, n, prompt_len, max_tokens, hf_batch, skip_vllm, threads=1) -> dict:
    model, model_dir = build_model(size)
    params = sum(p.numel() for p in model.parameters())
    # stay inside the model's context: prompt (up to 1.2x prompt_len) + completion <= max_position_embeddings
    max_tokens = min(max_tokens, model.config.max_position_embeddings - int(prompt_len * 1.2) - 1)
    prompts, lengths = workload(num_prompts, prompt_len, max_tokens, model.config.vocab_size)
    print(f"[{size}] {params / 1e6:.2f}M params, {num_prompts} prompts x {n} samples, "
          f"lengths mean {sum(lengths) / len(lengths):.1f} max {max(lengths)} (cap {max_tokens})")
    # warm-up (vLLM warms up inside its script too), then wall-clock tok/s and tok/s per CPU-second
    # of the process (the robust figure on a shared, busy machine)
    with contextlib.redirect_stdout(io.StringIO()):
        run_areal(model, prompts[:2], [min(8, m) for m in lengths[:2]], n)
        run_hf(model, prompts[:2], [min(8, m) for m in lengths[:2]], n, hf_batch)
    areal, areal_cpu = run_areal(model, prompts, lengths, n)
    print(f"  areal engine      : {areal:9.1f} tok/s  ({areal_cpu:9.1f} tok/cpu-s)")
    hf, hf_cpu = run_hf(model, prompts, lengths, n, hf_batch)
    print(f"  HF generate static: {hf:9.1f} tok/s  ({hf_cpu:9.1f} tok/cpu-s)   areal/HF = {areal / hf:.2f}x "
          f"(cpu {areal_cpu / hf_cpu:.2f}x)")
    vllm = None if skip_vllm else run_vllm(model, model_dir, prompts, lengths, n, threads)
    vllm, vllm_cpu = vllm if vllm else (None, None)
    if vllm:
        print(f"  vLLM CPU          : {vllm:9.1f} tok/s  ({vllm_cpu:9.1f} tok/cpu-s)   areal/vLLM = {areal / vllm:.2f}x "
              f"(cpu {areal_cpu / vllm_cpu:.2f}x)")
    return dict(params=params, areal=areal, hf=hf, vllm=vllm, areal_cpu=areal_cpu, hf_cpu=hf_cpu, vllm_cpu=vllm_cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=256, help="rows per static HF generate batch")
    ap.add_argument("--large-prompts", type=int, default=8)
    ap.add_argument("--large-max-tokens", type=int, default=128)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiny = bench("tiny", args.prompts, args.n, args.prompt_len, args.max_tokens, args.hf_batch, args.skip_vllm, args.threads)
    result = dict(
        model_params=tiny["params"],
        areal_tokens_per_s=round(tiny["areal"], 1),
        hf_tokens_per_s=round(tiny["hf"], 1),
        vllm_tokens_per_s=None if tiny["vllm"] is None else round(tiny["vllm"], 1),
        areal_over_hf=round(tiny["areal"] / tiny["hf"], 2),
        areal_over_vllm=None if not tiny["vllm"] else round(tiny["areal"] / tiny["vllm"], 2),
        areal_tokens_per_cpu_s=round(tiny["areal_cpu"], 1),
        hf_tokens_per_cpu_s=round(tiny["hf_cpu"], 1),
        vllm_tokens_per_cpu_s=None if tiny["vllm_cpu"] is None else round(tiny["vllm_cpu"], 1),
    )
    if not args.skip_large:
        large = bench("large", args.large_prompts, args.n, args.prompt_len, args.large_max_tokens,
                      args.hf_batch, args.skip_vllm, args.threads)
        result.update(
            large_model_params=large["params"],
            large_areal_tokens_per_s=round(large["areal"], 1),
            large_hf_tokens_per_s=round(large["hf"], 1),
            large_vllm_tokens_per_s=None if large["vllm"] is None else round(large["vllm"], 1),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
