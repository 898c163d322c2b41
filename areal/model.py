"""Loading the policy model and tokenizer: a local Hugging Face folder or a hub name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from areal.options import option

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelConfig:
    path: str = option(
        "assets/models/tiny-math",
        "Policy model: a local Hugging Face folder (relative paths resolve against the current "
        "directory) or a hub name such as Qwen/Qwen2.5-0.5B-Instruct.",
    )
    dtype: str = option(
        "auto",
        "Weights dtype. auto = float32 on CPU (bf16 is 40-60x slower there), bfloat16 on CUDA. "
        "Rollout, the trainer's forward/backward, the published weights and the exported model use it; "
        "with bfloat16/float16 the trainer's AdamW steps fp32 master weights (in checkpoints too).",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = option(False, "Allow model code from the model folder or hub.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_model_path(path: str) -> None:
    """Fail early, naming the path, when a local model folder is missing."""
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {p} has no config.json; not a Hugging Face model folder")
        return
    if not _HUB_ID.match(path):
        raise FileNotFoundError(f"model.path: model folder not found: {p.resolve()}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    check_model_path(cfg.path)
    tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:  # many base models ship without one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    check_model_path(cfg.path)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code
    )
    return model.to(device)
