"""Throughput of the built-in math reward, in-process and through RewardPool.

    python -m areal.rewards.bench [--calls 4000] [--workers 2]

GSM8K-style samples (plain numbers: the fast path) and MATH-style samples (LaTeX: the
math-verify path) are measured separately; each sample is distinct so nothing is cached
beyond what a GRPO group would share.
"""

from __future__ import annotations

import argparse
import time

from areal.rewards.math import math_reward
from areal.rewards.pool import RewardPool, RewardRequest


def gsm8k_samples(n: int) -> list[RewardRequest]:
    return [
        RewardRequest(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May...",
            f"In April she sold {i} clips. In May she sold {i} / 2 = {i / 2:g} clips.\n"
            f"Altogether she sold {i} + {i / 2:g} = {1.5 * i:,g} clips.\n#### {1.5 * i:,g}",
            {"answer": f"She sold {1.5 * i:g} clips in total.\n#### {1.5 * i + (i % 2):g}"},
        )
        for i in range(n)
    ]


def latex_samples(n: int) -> list[RewardRequest]:
    return [
        RewardRequest(
            "Simplify the fraction.",
            f"Dividing both by the gcd gives $\\boxed{{\\frac{{{i % 50 + 1}}}{{{2 * (i % 50 + 1)}}}}}$.",
            {"answer": "\\boxed{\\frac{1}{2}}" if i % 3 else "\\boxed{0.5}"},
        )
        for i in range(n)
    ]


def calls_per_second(score, samples: list[RewardRequest], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        score(samples)
        best = min(best, time.perf_counter() - start)
    return len(samples) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    def in_process(samples):
        return [math_reward(r.prompt, r.completion, **r.fields) for r in samples]

    cases = {"gsm8k (numeric fast path)": gsm8k_samples(args.calls), "latex (math-verify)": latex_samples(args.calls // 4)}
    with RewardPool("areal.rewards.math:math_reward", args.workers, timeout_s=10.0) as pool:
        pool.score(cases["latex (math-verify)"][:8])  # workers up and math-verify imported
        for name, samples in cases.items():
            in_process(samples[:8])
            direct = calls_per_second(in_process, samples)
            pooled = calls_per_second(pool.score, samples)
            per_call_us = 1e6 / pooled
            print(
                f"{name:28s} in-process {direct:9.0f} calls/s | pool({args.workers} workers) "
                f"{pooled:9.0f} calls/s ({per_call_us:.0f} us/call)"
            )


if __name__ == "__main__":
    main()
