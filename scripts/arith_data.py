"""Generator for the embedded 2-digit addition dataset (GSM8K-like rows).

Every row is ``{"question": "What is 37 + 48?", "answer": "37 + 48 = 85\\n#### 85"}``:
the final numeric answer follows ``####`` exactly as in GSM8K, so the same reward
code that parses GSM8K answers works on it.

The (a, b) pairs with 10 <= a, b <= 99 (8100 of them) are shuffled once with a fixed
seed and cut into disjoint train / test / validation slices, so no pair of the test
split is ever seen in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT_TEMPLATE = "Q: {question}\nA: "  # raw prompt format used by SFT and by recipes/math.yaml


def make_row(a: int, b: int) -> dict:
    """One GSM8K-style row for ``a + b``."""
    total = a + b
    return {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {total}\n#### {total}"}


def final_answer(answer: str) -> str:
    """The text after ``####`` (GSM8K convention), stripped."""
    return answer.split("####")[-1].strip()


def split_pairs(
    n_train: int, n_test: int, n_valid: int, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint (train, test, valid) lists of (a, b) pairs, 10 <= a, b <= 99."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if n_train + n_test + n_valid > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct pairs exist")
    random.Random(seed).shuffle(pairs)
    train = pairs[:n_train]
    test = pairs[n_train : n_train + n_test]
    valid = pairs[n_train + n_test : n_train + n_test + n_valid]
    return train, test, valid


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
