"""Loading the policy model and tokenizer: a local Hugging Face folder or a hub name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from areal.hub import HUB_ID, is_hub_name
from areal.options import option


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
    if not HUB_ID.match(path):
        raise FileNotFoundError(f"model.path: model folder not found: {p.resolve()}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_weights(path: str) -> None:
    """A local model folder holds weights transformers can load (checked before any process loads them)."""
    from areal.config import ConfigError

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model.path: {folder} has no weights ({', '.join(WEIGHT_FILES)})")


def _from_pretrained(load, cfg: ModelConfig, **kwargs):
    """`load(path)`, where what transformers cannot read is one line naming model.path."""
    from areal.config import ConfigError

    check_model_path(cfg.path)
    try:
        return load(cfg.path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as e:  # a folder without tokenizer files or with a broken config.json; a hub name the hub
        # and the local cache cannot give (areal/hub.py settles reachability first), a gated repo
        where = "from the hub or the local cache" if is_hub_name(cfg.path) else "as a Hugging Face model folder"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path: '{cfg.path}' could not be loaded {where}: {first}") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, cfg)
    if tok.pad_token_id is None:  # many base models ship without one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(cfg: ModelConfig):
    """The model's config.json (its context length and shapes) without the weights."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, cfg)


def load_model(cfg: ModelConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, cfg, dtype=resolve_dtype(cfg.dtype, device))
    return model.to(device)
