"""Peak memory and time of the chunked log-prob kernel vs naive log_softmax + gather (CPU).

Workload (one "PPO log-prob" step): hidden [N, H] and LM head W [V, H] (float32, both
requiring grad), forward to per-token log-probs, loss = sum of log-probs, backward to
grad hidden and grad W.
- naive:            logits = h W^T; log_softmax(logits).gather(labels)   (what a trainer
                    does without a fused kernel; it materialises [N, V] several times)
- naive+entropy:    the same plus the per-token entropy as a no-grad statistic (opt-in:
                    --variants naive naive+entropy areal)
- areal:            `logprobs_and_entropy` (computes the entropy too, at no extra pass)

Memory method: every (variant, vocab) runs in a fresh Python subprocess. After building
the inputs and a small warm-up (so allocator/thread-pool start-up is in the baseline), the
child reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` (peak resident set, KiB on
Linux), runs the step once, reads it again: peak = after - before, i.e. the extra
resident memory the step needed at its worst moment (this includes grad W, [V, H], which
both variants must produce). Big tensors are mmap-backed in glibc, so freed buffers leave
the RSS and the peak reflects live memory.
Time method: the same single step, one thread. `time_ratio` uses the process CPU time
(user + sys, from getrusage) because the benchmark machine is shared and wall clock swings
with other people's load; sys time counts page faults, which are a real cost of the big
naive buffers. Wall-clock seconds are printed too (`wall_time_ratio`).

Usage: python benchmarks/logprob_kernel.py [--n 2048] [--hidden 512] [--chunk-size 256]
The last line printed is a JSON object; its `peak_memory_ratio` and `time_ratio` are
areal / naive at the largest vocabulary.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCABS = (32_000, 152_064)


def _step(variant: str, hidden, weight, labels, chunk_size: int) -> None:
    import torch

    from areal.kernels.logprob import logprobs_and_entropy

    if variant == "areal":
        logp, _entropy = logprobs_and_entropy(hidden, weight, labels, chunk_size=chunk_size)
    else:
        # one expression, so the raw logits are freed as soon as log_softmax has run
        logp_all = torch.log_softmax(hidden @ weight.t(), dim=-1)
        logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if variant == "naive+entropy":
            with torch.no_grad():
                _entropy = -(logp_all.exp() * logp_all).sum(-1)
        del logp_all
    logp.sum().backward()


def child(variant: str, n: int, h: int, v: int, chunk_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # warm-up on a tiny problem so one-off library start-up is not counted as peak
    small = [torch.randn(8, h, requires_grad=True), torch.randn(64, h, requires_grad=True), torch.zeros(8, dtype=torch.long)]
    _step(variant, *small, chunk_size)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).div_(h**0.5).requires_grad_()  # in place: no transient copy before the baseline
    labels = torch.randint(0, v, (n,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    _step(variant, hidden, weight, labels, chunk_size)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"variant": variant, "vocab": v, "peak_mib": (after.ru_maxrss - before.ru_maxrss) / 1024,
            "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H")
    parser.add_argument("--chunk-size", type=int, default=256, help="areal token chunk")
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--variants", nargs="+", default=["naive", "areal"],
                        choices=["naive", "naive+entropy", "areal"])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.n, args.hidden, int(args.child[1]), args.chunk_size)))
        return

    rows = []
    for v in args.vocabs:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--hidden", str(args.hidden),
                   "--chunk-size", str(args.chunk_size), "--child", variant, str(v)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"N={args.n} H={args.hidden} chunk_size={args.chunk_size} float32, 1 thread, forward+backward")
    print(f"{'vocab':>8} {'variant':>14} {'peak MiB':>10} {'wall s':>8} {'cpu s':>8} {'mem ratio':>10} {'time ratio':>10}")
    result: dict = {"n": args.n, "hidden": args.hidden, "chunk_size": args.chunk_size}
    for v in args.vocabs:
        by = {r["variant"]: r for r in rows if r["vocab"] == v}
        base = by.get("naive")
        for variant, r in by.items():
            mem_ratio = r["peak_mib"] / base["peak_mib"] if base else float("nan")
            time_ratio = r["cpu_seconds"] / base["cpu_seconds"] if base else float("nan")
            print(f"{v:>8} {variant:>14} {r['peak_mib']:>10.0f} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
                  f"{mem_ratio:>10.3f} {time_ratio:>10.3f}")
            result[f"{variant}_v{v}_peak_mib"] = round(r["peak_mib"], 1)
            result[f"{variant}_v{v}_wall_s"] = round(r["seconds"], 3)
            result[f"{variant}_v{v}_cpu_s"] = round(r["cpu_seconds"], 3)
    top = max(args.vocabs)
    by = {r["variant"]: r for r in rows if r["vocab"] == top}
    if "areal" in by and "naive" in by:
        result["vocab"] = top
        result["peak_memory_ratio"] = round(by["areal"]["peak_mib"] / by["naive"]["peak_mib"], 4)
        result["time_ratio"] = round(by["areal"]["cpu_seconds"] / by["naive"]["cpu_seconds"], 4)
        result["wall_time_ratio"] = round(by["areal"]["seconds"] / by["naive"]["seconds"], 4)
        if "naive+entropy" in by:
            result["peak_memory_ratio_vs_naive_entropy"] = round(by["areal"]["peak_mib"] / by["naive+entropy"]["peak_mib"], 4)
            result["time_ratio_vs_naive_entropy"] = round(by["areal"]["cpu_seconds"] / by["naive+entropy"]["cpu_seconds"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
