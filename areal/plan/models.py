"""Model architectures the planner knows: a local folder's config.json, or a table of hub models.

Counts (Qwen2 family: q/k/v projections with bias, SwiGLU MLP, RMSNorm; d = hidden size,
f = intermediate size, L = layers, h = attention heads, h_kv = key/value heads, d_h = d / h, V = vocab):

    per layer   P_layer = d·(d + 2·h_kv·d_h) + (d + 2·h_kv·d_h)   (q, k, v weights and biases)
                        + d·d                                      (o projection)
                        + 3·d·f                                    (gate, up, down)
                        + 2·d                                      (two RMSNorm scales)
    params      P = L·P_layer + d + V·d·(1 if tied else 2)
    matmul      P_mm = L·(P_layer − 2·d) + V·d   (weights a token multiplies with: the embedding
                lookup is free, the LM head is not; a tied head is the embedding matrix once more)
    KV cache    2·L·h_kv·d_h·bytes per token

The table holds the published config.json numbers of each hub model (so planning needs no
download). A hub name the table lacks and no local folder -> ConfigError naming model.path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from areal.config import ConfigError


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        qkv_out = self.hidden + 2 * self.kv_heads * self.head_dim
        return (self.hidden * qkv_out + qkv_out + self.hidden * self.hidden
                + 3 * self.hidden * self.intermediate + 2 * self.hidden)

    @property
    def params(self) -> int:
        """P in the module docstring: every stored parameter."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + self.hidden + embeddings

    @property
    def matmul_params(self) -> int:
        """P_mm: parameters one token multiplies with (2·P_mm FLOPs per token forward)."""
        return self.layers * (self.layer_params - 2 * self.hidden) + self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Published config.json values of the hub models (huggingface.co/<name>/blob/main/config.json).
KNOWN_MODELS: dict[str, Architecture] = {a.name: a for a in (
    Architecture("Qwen/Qwen2.5-0.5B-Instruct", 24, 896, 4864, 14, 2, 151936, True),
    Architecture("Qwen/Qwen2.5-1.5B-Instruct", 28, 1536, 8960, 12, 2, 151936, True),
    Architecture("Qwen/Qwen2.5-Math-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    Architecture("Qwen/Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False),
    Architecture("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 28, 1536, 8960, 12, 2, 151936, False),
    Architecture("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 28, 3584, 18944, 28, 4, 152064, False),
)}


def from_config(name: str, cfg: dict) -> Architecture:
    """An Architecture from a Hugging Face config.json's fields."""
    try:
        return Architecture(
            name, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["intermediate_size"]),
            int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"model.path: {name}/config.json lacks {e.args[0]}") from None


def load_architecture(path: str) -> Architecture:
    """A local model folder's config.json, else the table of known hub models."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return from_config(str(path), json.loads((folder / "config.json").read_text()))
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path]
    raise ConfigError(f"model.path: {path} is neither a local model folder with config.json nor a hub model the "
                      f"planner knows ({', '.join(sorted(KNOWN_MODELS))})")
