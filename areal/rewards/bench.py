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


def latex_samples(n: int, offset: int = 0) -> list[RewardRequest]:
    """Distinct completions (offset differs per repeat) so math-verify's caches do not help."""
    return [
        RewardRequest(
            "Simplify the fraction.",
            f"Dividing both by the gcd gives $\\boxed{{\\frac{{{i + 1}}}{{{2 * (i + 1)}}}}}$.",
            {"answer": "\\boxed{\\frac{1}{2}}" if i % 3 else "\\boxed{0.5}"},
        )
        for i in range(offset, offset + n)
    ]


def calls_per_second(score, make_samples, repeats: int = 3) -> float:
    """Best of `repeats` passes; make_samples(repeat) gives each pass its own samples."""
    best = float("inf")
    for repeat in range(repeats):
        samples = make_samples(repeat)
        start = time.perf_counter()
        score(samples)
        best = min(best, (time.perf_counter() - start) / len(samples))
    return 1.0 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    def in_process(samples):
        return [math_reward(r.prompt, r.completion, **r.fields) for r in samples]

    n_latex = args.calls // 8
    cases = {
        "gsm8k (numeric fast path)": (lambda repeat: gsm8k_samples(args.calls), lambda repeat: gsm8k_samples(args.calls)),
        "latex (math-verify)": (
            lambda repeat: latex_samples(n_latex, offset=10**6 + repeat * n_latex),
            lambda repeat: latex_samples(n_latex, offset=2 * 10**6 + repeat * n_latex),
        ),
    }
    with RewardPool("areal.rewards.math:math_reward", args.workers, timeout_s=10.0) as pool:
        pool.score(latex_samples(8))  # workers up and math-verify imported
        in_process(latex_samples(8))
        for name, (direct_samples, pool_samples) in cases.items():
            direct = calls_per_second(in_process, direct_samples)
            pooled = calls_per_second(pool.score, pool_samples)
            per_call_us = 1e6 / pooled
            print(
                f"{name:28s} in-process {direct:9.0f} calls/s | pool({args.workers} workers) "
                f"{pooled:9.0f} calls/s ({per_call_us:.0f} us/call)"
            )


if __name__ == "__main__":
    main()
