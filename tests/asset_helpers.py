"""Loading the shipped assets (assets/models/*, assets/data/*), shared by the asset tests."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def read_rows(data_dir: Path, split: str) -> list[dict]:
    with open(data_dir / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_model(model_dir: Path):
    """The shipped model through the standard HF entry point, in eval mode, on one thread."""
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()
