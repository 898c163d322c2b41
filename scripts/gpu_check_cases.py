"""The checks that scripts/gpu_check.py runs, one function per check, each in a process of its own.

A check returns its figures (a JSON-able dict) when it passes, raises `Skipped(reason)` when it cannot
run here, and raises anything else when it fails. Every check takes the device it runs on: "cuda"
(the real thing) or "cpu" (the developer mode, tiny sizes, to exercise this code without a GPU).
Nothing is downloaded: models are random-initialised from configs built here, or the shipped
assets/models/tiny-math.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


class Skipped(Exception):
    """The check cannot run on this machine; the message says why."""


def _on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device: str) -> None:
    if _on_cuda(device):
        torch.cuda.synchronize()


def _use_device(device: str) -> None:
    """Make `device` this process's current CUDA device (NCCL and the caching allocator follow it)."""
    if _on_cuda(device):
        index = torch.device(device).index
        torch.cuda.set_device(0 if index is None else index)


# ------------------------------------------------------------------ 1. engine greedy == HF greedy
# the model families and config of tests/test_engine.py: large initial weights keep greedy argmax away
# from numerical coin flips, so equality is a fair demand across two attention implementations
SMALL_CONFIG = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=256)
PARITY_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 2, 33],
                  list(range(3, 40)), [7] * 19]


def _family_config(family: str):
    import transformers

    if family == "qwen2":
        return transformers.Qwen2Config(**SMALL_CONFIG, tie_word_embeddings=True)
    if family == "llama":
        return transformers.LlamaConfig(**SMALL_CONFIG, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**SMALL_CONFIG, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":  # a sliding window: the engine's torch attention path, even on CUDA
        return transformers.MistralConfig(**SMALL_CONFIG, sliding_window=6)
    raise ValueError(f"unknown family {family!r}")


def random_model(family: str, device: str, seed: int = 0, eos: int | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _family_config(family)
    cfg.eos_token_id = eos
    model = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    model.generation_config.eos_token_id = eos
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), attention_mask=None,
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _compare(engine_outs, expected: list[list[int]]) -> dict:
    """Figures of one engine-vs-HF comparison; raises AssertionError naming the first differing prompt."""
    got = [o.token_ids for o in engine_outs]
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            raise AssertionError(f"prompt {i}: engine {g} != HF generate {e}")
    return {"prompts": len(expected), "tokens": sum(len(e) for e in expected)}


def check_engine_parity(device: str) -> dict:
    """areal's Engine (paged KV, chunked prefill, Triton decode on CUDA) against HF generate, greedy, float32:
    the shipped tiny model on the recipe's own prompts, and small random models of each supported family."""
    from areal.bundle import find_recipe
    from areal.config import build
    from areal.data import encode_prompt, load_rows
    from areal.model import load_model, load_tokenizer
    from areal.recipe import Recipe
    from areal.rollout import Engine, SamplingParams

    figures: dict = {}
    recipe = build(Recipe, str(find_recipe("math")), ["model.dtype=float32"])
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, torch.device(device)).eval()
    if model.device.type != torch.device(device).type:
        raise AssertionError(f"areal.model.load_model put the model on {model.device}, asked for {device}")
    rows = load_rows(recipe.data, "test")[:16]
    prompts = [encode_prompt(row, i, recipe.data, tokenizer)[1] for i, row in enumerate(rows)]
    eos = model.generation_config.eos_token_id
    max_new = recipe.rollout.eval_max_new_tokens + 4
    expected = [hf_greedy(model, p, max_new, eos) for p in prompts]
    # a small batch budget: prompts are prefilled in chunks mixed with other sequences' decode steps
    engine = Engine(model, num_blocks=256, block_size=4, max_num_batched_tokens=24)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
    figures["tiny_math"] = _compare(outs, expected)
    figures["tiny_math"]["stopped_on_eos"] = sum(o.finish_reason == "stop" for o in outs)
    for family in ("qwen2", "llama", "qwen3", "mistral"):
        model = random_model(family, device)
        eos = hf_greedy(model, PARITY_PROMPTS[0], 10, None)[3]  # an eos the model emits: stopping is exercised
        model.generation_config.eos_token_id = eos
        model.config.eos_token_id = eos
        expected = [hf_greedy(model, p, 16, eos) for p in PARITY_PROMPTS]
        engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=6)
        outs = engine.generate(PARITY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=16))
        figures[family] = _compare(outs, expected)
        if engine.stats()["kv_blocks_used"] != 0:
            raise AssertionError(f"{family}: {engine.stats()['kv_blocks_used']} KV blocks leaked")
    return figures


# ------------------------------------------------------------------ 2. Triton kernels, compiled
def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: one number per tensor, comparable across shapes and scales."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _logprob_case(n, h, v, device, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5 * 4).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[min(2, n - 1)] = -100  # an ignored position
    return hidden, weight, b, labels.to(device)


def _logprob_run(case, backend, temperature, chunk_size, entropy_grad):
    from areal.kernels.logprob import logprobs_and_entropy

    hidden, weight, b, labels = case
    tensors = [t for t in (hidden, weight, b) if t is not None]
    for t in tensors:
        t.grad = None
    lp, ent = logprobs_and_entropy(hidden, weight, labels, temperature=temperature, lm_head_bias=b,
                                   chunk_size=chunk_size, backend=backend)
    w = torch.linspace(-1, 1, len(labels), device=lp.device)
    loss = (lp * w).sum() + ((ent * w.flip(0)).sum() if entropy_grad else 0.0)
    loss.backward()
    return [lp.detach(), ent.detach()] + [t.grad.clone() for t in tensors]


def _paged_case(seed, context_lens, num_heads, num_kv, head_dim, block_size, device, dtype):
    """Random per-sequence K/V written into a paged cache through shuffled block tables (as
    tests/test_paged_attention.py), one decode query per sequence."""
    from areal.kernels.paged_attention import write_kv_cache

    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 8
    k_cache = torch.randn(num_blocks * block_size, num_kv, head_dim, generator=g)  # garbage outside the tables
    v_cache = torch.randn(num_blocks * block_size, num_kv, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-c // block_size) for c in context_lens)
    tables = []
    for c in context_lens:
        table = [perm.pop() for _ in range(-(-c // block_size))]
        pos = torch.arange(c)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        write_kv_cache(torch.randn(c, num_kv, head_dim, generator=g), torch.randn(c, num_kv, head_dim, generator=g),
                       k_cache, v_cache, slots)
        tables.append(table + [0] * (width - len(table)))
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=g)
    to = dict(device=device, dtype=dtype)
    return (query.to(**to), k_cache.to(**to), v_cache.to(**to), torch.tensor(tables, device=device),
            torch.tensor(context_lens, device=device))


def check_kernels(device: str) -> dict:
    """Each Triton kernel against its PyTorch reference: the log-prob/entropy row kernels (forward and
    backward, through logprobs_and_entropy) and the paged-attention decode and KV-write kernels. On CUDA
    they are compiled for the GPU; the CPU developer mode runs them under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AssertionError("triton is not importable: the engine's CUDA attention path needs it") from None
    from areal.kernels import logprob, logprob_triton
    from areal.kernels.logprob import entropy_from_logits, logprobs_from_logits
    from areal.kernels.paged_attention import paged_attention_decode, write_kv_cache
    from areal.kernels.paged_attention_triton import paged_attention_decode_triton, write_kv_cache_triton

    cuda = _on_cuda(device)
    if cuda and logprob_triton.interpreting():
        raise AssertionError("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    if cuda and logprob._row_ops(torch.device(device), "auto")[0] is not logprob_triton.chunk_stats:
        raise AssertionError("backend='auto' does not pick the Triton row kernels for CUDA tensors")
    figures: dict = {"compiled": cuda}
    tol = 1e-4
    # log-probs: small odd shapes (V not a power of two, ignored label, bias), both gradient mixes
    for entropy_grad in (True, False):
        case = _logprob_case(9, 8, 37, device, torch.float32, bias=True)
        got = _logprob_run(case, "triton", 0.9, 4, entropy_grad)
        ref = _logprob_run(case, "torch", 0.9, 4, entropy_grad)
        err = max(_rel_err(a, b) for a, b in zip(got, ref))
        if err > tol:
            raise AssertionError(f"logprob small (entropy_grad={entropy_grad}): rel err {err:.2e} > {tol}")
        figures[f"logprob_small_rel_err_entropy_grad_{entropy_grad}"] = err
    # a policy-sized head (Qwen2.5-0.5B: H 896, V 151936) in bf16, rows spanning many tiles
    n, h, v = (512, 896, 151936) if cuda else (6, 16, 5000)
    case = _logprob_case(n, h, v, device, torch.bfloat16, bias=False, seed=1)
    timings = {}
    results = {}
    for backend in ("triton", "torch"):
        _logprob_run(case, backend, 1.0, 256, True)  # warm-up (compilation)
        _sync(device)
        t0 = time.perf_counter()
        results[backend] = _logprob_run(case, backend, 1.0, 256, True)
        _sync(device)
        timings[backend] = time.perf_counter() - t0
    names = ["logp", "entropy", "grad_hidden", "grad_weight"]
    errs = {name: _rel_err(a, b) for name, a, b in zip(names, results["triton"], results["torch"])}
    with torch.no_grad():  # and the naive [N, V] log_softmax for the values
        logits = case[0].float() @ case[1].float().t()
        labels = case[3]
        naive_lp = torch.where(labels >= 0, logprobs_from_logits(logits, labels.clamp(min=0)), 0.0)
        errs["logp_vs_naive"] = _rel_err(results["triton"][0], naive_lp)
        errs["entropy_vs_naive"] = _rel_err(results["triton"][1], entropy_from_logits(logits))
    figures["logprob_large"] = {"shape": [n, h, v], "rel_err": errs,
                                "fwd_bwd_ms_triton": timings["triton"] * 1e3, "fwd_bwd_ms_torch": timings["torch"] * 1e3}
    # gradients come back in the inputs' bf16: one rounding step apart is 2^-8 of the value
    limits = {"grad_hidden": 1e-2, "grad_weight": 1e-2}
    bad = {k: e for k, e in errs.items() if e > limits.get(k, 1e-3)}
    if bad:
        raise AssertionError(f"logprob large: relative errors above the limits (1e-3; bf16 grads 1e-2): {bad}")
    # the row kernels alone against the naive formulas
    z = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2)).to(device) * 3
    lab = torch.tensor([0, 4999, 1234], device=device)
    lp, ent, lse = logprob_triton.chunk_stats(z, lab)
    torch.testing.assert_close(lp, logprobs_from_logits(z, lab), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(z), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), atol=1e-5, rtol=1e-6)
    # paged decode: the engine's shapes (0.5B: 14 heads / 2 KV / D 64; 7B: 28 / 4 / 128), fp32 and bf16
    lens = [1, 7, 16, 17, 300, 64, 129] if cuda else [1, 7, 16, 17, 40]
    for heads, kv, d in ((14, 2, 64), (28, 4, 128), (4, 4, 6)):
        for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            q, kc, vc, tables, ctx = _paged_case(3, lens, heads, kv, d, 16, device, dtype)
            got = paged_attention_decode_triton(q, kc, vc, tables, ctx, d ** -0.5, 16)
            ref = paged_attention_decode(q.float(), kc.float(), vc.float(), tables, ctx, d ** -0.5, 16)
            err = float((got.float() - ref).abs().max())
            if err > atol:
                raise AssertionError(f"paged decode H{heads}/KV{kv}/D{d} {dtype}: max abs err {err:.2e} > {atol}")
            figures[f"decode_h{heads}_kv{kv}_d{d}_{str(dtype).removeprefix('torch.')}_max_abs_err"] = err
    # KV write, negative slots skipped (the padding convention of the Triton kernel)
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(5, 2, 64, generator=g).to(device), torch.randn(5, 2, 64, generator=g).to(device)
    slots = torch.tensor([7, 0, 3, -1, 9], device=device)
    ref_k, ref_v = torch.zeros(10, 2, 64, device=device), torch.zeros(10, 2, 64, device=device)
    keep = slots >= 0
    write_kv_cache(key[keep], value[keep], ref_k, ref_v, slots[keep])
    k_cache, v_cache = torch.zeros_like(ref_k), torch.zeros_like(ref_v)
    write_kv_cache_triton(key, value, k_cache, v_cache, slots)
    if not (torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)):
        raise AssertionError("write_kv_cache_triton differs from write_kv_cache")
    figures["write_kv_exact"] = True
    return figures


# ------------------------------------------------------------------ 3. weight transport
def synthetic_weights(version: int, device: str, total_mb: int) -> dict[str, torch.Tensor]:
    """Deterministic per (version, size): big bf16 matrices making up ~total_mb, plus odd small tensors."""
    g = torch.Generator(device=device).manual_seed(1000 + version)
    side = 4096 if total_mb >= 256 else 256
    count = max(1, total_mb * (1 << 20) // (side * side * 2))
    weights = {f"layers.{i}.weight": torch.randn(side, side, generator=g, device=device).to(torch.bfloat16)
               for i in range(count)}
    weights["layers.0.bias"] = torch.randn(13, generator=g, device=device)
    weights["step"] = torch.full((3,), version, dtype=torch.int64, device=device)
    return weights


def tiny_qwen2(seed: int, device: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      initializer_range=0.3)
    return AutoModelForCausalLM.from_config(cfg).float().to(device).eval()


def transport_receiver(address: str, backend: str, buffer_device: str, total_mb: int, results) -> None:
    """A rollout worker's side, in its own process: receive two synthetic versions (checked bit for bit),
    then the trainer's model, applied to a rollout Engine whose greedy output must become the trainer's."""
    from areal.rollout import Engine, SamplingParams
    from areal.rollout.weight_receiver import WeightReceiver, apply
    from areal.transport import DistReceiver

    out: dict = {}
    try:
        _use_device(buffer_device)
        # both ends name their real device; the group picks nccl only when every member has its own GPU
        receiver = WeightReceiver(DistReceiver(address, 1, 1, device=buffer_device, timeout_s=60,
                                               connect_timeout_s=60), device=buffer_device)
        for version in (1, 2):
            update = receiver.wait_for(version, timeout=60)
            expected = synthetic_weights(version, buffer_device, total_mb)
            got = dict(update.named_tensors())
            out[f"v{version}_exact"] = got.keys() == expected.keys() and all(
                torch.equal(got[n], t) for n, t in expected.items())
            out[f"v{version}_on"] = str(update.flat.device)
            update.release()
        update = receiver.wait_for(3, timeout=60)
        engine = Engine(tiny_qwen2(2, buffer_device), num_blocks=32, block_size=4)
        apply(update, engine)
        trainer_model = tiny_qwen2(1, buffer_device)
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        prompt = [3, 4, 5, 9]
        got = engine.generate([prompt], params)[0]
        with torch.no_grad():
            ref = trainer_model.generate(torch.tensor([prompt], device=buffer_device), max_new_tokens=8,
                                         min_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        out["engine_matches_trainer"] = got.token_ids == ref
        out["engine_versions"] = sorted(set(got.versions))
        receiver.close()
    except BaseException as exc:  # report, never hang the sender
        out["error"] = repr(exc)
    results.put(out)


def _two_process_transfer(sender_device: str, backend: str, receiver_device: str, total_mb: int) -> dict:
    """Publish two synthetic versions and the tiny model to a receiver process over `backend` (nccl, or gloo,
    which also moves CUDA tensors, staged through the host); the figures of the transfer."""
    import torch.multiprocessing as mp

    from areal.trainer.weight_publisher import WeightPublisher
    from areal.transport import DistSender

    _use_device(sender_device)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    sender = DistSender(num_receivers=1, device=sender_device, timeout_s=60, connect_timeout_s=90)
    proc = ctx.Process(target=transport_receiver, args=(sender.address, backend, receiver_device, total_mb,
                                                        results), daemon=True)
    proc.start()
    publisher = WeightPublisher(sender)
    try:
        publisher.wait_connected(90)
        if sender.backend != backend:  # known once the group has formed
            raise AssertionError(f"the weight group chose {sender.backend}, expected {backend}")
        for version in (1, 2):
            publisher.publish(version, synthetic_weights(version, sender_device, total_mb))
            publisher.wait(60)
        trainer_model = tiny_qwen2(1, sender_device)
        publisher.publish(3, ((n, p.detach()) for n, p in trainer_model.named_parameters()))
        publisher.wait(60)
        out = results.get(timeout=120)
    finally:
        publisher.close()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if "error" in out:
        raise AssertionError(f"receiver process failed: {out['error']}")
    steady = publisher.history[1]  # the second update: the group is formed and buffers exist
    figures = {"bytes": steady.bytes, "buckets": steady.buckets, "transfer_s": steady.transfer_s,
               "GB_per_s": steady.bytes / steady.transfer_s / 1e9, "snapshot_s": steady.snapshot_s,
               "receiver": out}
    wrong = [k for k in ("v1_exact", "v2_exact", "engine_matches_trainer") if not out.get(k)]
    if wrong:
        raise AssertionError(f"receiver got wrong data: {wrong} false ({out})")
    return figures


def check_transport_single_gpu(device: str) -> dict:
    """What one GPU allows of the trainer -> rollout weight path:
    - NCCL with world size 1 (the sender alone): the process group forms over the TCPStore and the CUDA
      snapshot (copy on the GPU + event) is broadcast;
    - two processes over gloo with the weights and receive buffers in CUDA memory (gloo stages them
      through the host), bit-exact, then applied to a CUDA rollout Engine."""
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.transport import DistSender

    figures: dict = {}
    _use_device(device)
    if _on_cuda(device):
        sender = DistSender(num_receivers=0, device=device, timeout_s=60)
        publisher = WeightPublisher(sender)
        try:
            for version in (1, 2):
                publisher.publish(version, synthetic_weights(version, device, 64))
                publisher.wait(60)
        finally:
            publisher.close()
        if sender.backend != "nccl":
            raise AssertionError(f"a CUDA DistSender chose {sender.backend}, not nccl")
        figures["nccl_world1"] = {"updates": publisher.updates_sent, "bytes": publisher.history[-1].bytes}
    figures["gloo_2proc_cuda_buffers" if _on_cuda(device) else "gloo_2proc"] = _two_process_transfer(
        device, "gloo", device, 512 if _on_cuda(device) else 8)
    return figures


def check_transport_nccl_two_gpus(device: str) -> dict:
    """The production path: NCCL broadcast from the trainer's GPU to a rollout worker on another GPU."""
    if not _on_cuda(device):
        raise Skipped("NCCL needs CUDA")
    if torch.cuda.device_count() < 2:
        raise Skipped(f"{torch.cuda.device_count()} GPU: NCCL refuses two ranks on one GPU "
                      "('Duplicate GPU detected'); needs 2 GPUs")
    return _two_process_transfer("cuda:0", "nccl", "cuda:1", 1024)


# ------------------------------------------------------------------ 4. the default recipe
def run_recipe(device: str, mode: str, work_dir: Path, steps: int, eval_every: int, timeout_s: float) -> dict:
    """`python -m areal.train recipe=math.yaml` with the device, mode and a shorter run; its summary."""
    run_dir = work_dir / f"recipe-{mode}"
    cmd = [sys.executable, "-m", "areal.train", "recipe=math.yaml", f"run.device={device}", f"run.mode={mode}",
           f"trainer.steps={steps}", f"run.eval_every={eval_every}", f"run.run_dir={run_dir}",
           "logging.wandb.mode=disabled"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work_dir, timeout=timeout_s, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        output, outcome = proc.stdout, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:  # its role processes are reaped with this check's process group
        output, outcome, proc = _text(exc.stdout), f"timed out after {timeout_s:.0f} s", None
    wall = time.perf_counter() - t0
    print(output[-6000:], flush=True)
    if proc is None or proc.returncode != 0:
        hint = " (NCCL refused two ranks on one GPU: 'Duplicate GPU detected')" if "Duplicate GPU" in output else ""
        last = [line for line in output.splitlines() if line.strip()][-3:]
        raise AssertionError(f"{outcome}{hint}: {' | '.join(last)[-400:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = {"steps": summary["steps"], "accuracy_initial": summary["eval_accuracy_initial"],
               "accuracy_final": summary["eval_accuracy_final"], "train_wall_s": summary["wall_seconds"],
               "process_wall_s": wall}
    if not figures["accuracy_final"] > figures["accuracy_initial"]:
        raise AssertionError(f"did not learn: held-out accuracy {figures['accuracy_initial']:.3f} -> "
                             f"{figures['accuracy_final']:.3f} in {figures['steps']} steps")
    return figures


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


RECIPE_STEPS = {"cuda": (100, 50), "cpu": (40, 20)}  # (trainer.steps, run.eval_every): learning shows by 60-100


def check_recipe(device: str, mode: str, timeout_s: float) -> dict:
    steps, every = RECIPE_STEPS[torch.device(device).type]
    work_dir = Path(os.environ.get("GPU_CHECK_WORK_DIR", "."))
    return run_recipe(device, mode, work_dir, steps, every, timeout_s)


# ------------------------------------------------------------------ 5. engine throughput
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def check_throughput(device: str) -> dict:
    """Engine vs HF generate, greedy, same prompts, every sample forced to full length: tokens/s of each.
    CUDA: a random Qwen2.5-0.5B-shaped model in bf16, 64 prompts x 128 new tokens."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from areal.rollout import Engine, SamplingParams

    cuda = _on_cuda(device)
    batch, prompt_len, new_tokens = (64, 64, 128) if cuda else (8, 16, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = Qwen2Config(**(QWEN25_05B if cuda else TINY))
    cfg.eos_token_id = None
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 2 GB copy from the host
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g)

    def hf_run(max_new: int) -> tuple[float, list[list[int]]]:
        ids = prompts.to(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0, out[:, prompt_len:].tolist()

    blocks = batch * -(-(prompt_len + new_tokens) // 16) + 64
    engine = Engine(model, num_blocks=blocks, block_size=16, max_num_seqs=batch,
                    max_num_batched_tokens=max(8192, batch * prompt_len))

    def engine_run(max_new: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
        _sync(device)
        t0 = time.perf_counter()
        outs = engine.generate(prompts.tolist(), params)
        _sync(device)
        return time.perf_counter() - t0, [o.token_ids for o in outs]

    hf_run(4), engine_run(4)  # warm-up: CUDA context, cuBLAS handles, Triton compilation
    hf_s, hf_tokens = hf_run(new_tokens)
    engine_s, engine_tokens = engine_run(new_tokens)
    total = batch * new_tokens
    if sum(map(len, engine_tokens)) != total or sum(map(len, hf_tokens)) != total:
        raise AssertionError("a run did not generate batch x new_tokens tokens")
    agree = sum(a == b for e, h in zip(engine_tokens, hf_tokens) for a, b in zip(e, h)) / total
    figures = {"model": "Qwen2.5-0.5B shape, random" if cuda else "tiny Qwen2, random",
               "dtype": str(dtype).removeprefix("torch."), "batch": batch, "prompt_len": prompt_len,
               "new_tokens": new_tokens, "engine_s": engine_s, "hf_s": hf_s,
               "engine_tokens_per_s": tokens_per_s(total, engine_s), "hf_tokens_per_s": tokens_per_s(total, hf_s),
               "greedy_token_agreement": agree}
    figures["engine_over_hf"] = figures["engine_tokens_per_s"] / figures["hf_tokens_per_s"]
    if cuda:
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures
