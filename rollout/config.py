"""Rollout settings: which backend generates, and how it samples."""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option


@dataclass
class RolloutConfig:
    backend: str = option(
        "engine",
        "Generation backend: 'engine' (areal's paged continuous-batching engine) or 'hf' "
        "(Hugging Face generate, the reference and baseline).",
        choices=("hf", "engine"),
    )
    group_size: int = option(8, "Samples per prompt (the GRPO group size n).")
    temperature: float = option(1.0, "Sampling temperature for training rollouts; the loss uses the same one.")
    top_p: float = option(1.0, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = option(0, "Top-k sampling (0 = off).")
    max_new_tokens: int = option(8, "Longest completion sampled for training.")
    eval_max_new_tokens: int = option(8, "Longest greedy completion during evaluation.")
    stop: list[str] = option([], "Extra stop strings (the model's EOS always stops).")
    eval_engine: bool = option(
        True,
        "Async, engine: each rollout worker evaluates on a second engine holding a copy of the weights it "
        "scores (one more copy of the model per worker, and a KV pool of at most a quarter of "
        "rollout.kv_blocks), so training generation takes newer "
        "weights meanwhile and the trainer does not wait after an evaluation. false: evaluate on the "
        "worker's engine, which then holds its weights until the evaluation is scored.",
    )
    weight_update_mode: str = option(
        "keep",
        "What in-flight sequences do when new weights arrive: 'keep' their KV cache, or "
        "'recompute' it under the new weights. Each token records its version either way.",
        choices=("keep", "recompute"),
    )
    batch_size: int = option(256, "Most sequences the backend decodes at once.")
    max_staleness: int = option(
        2,
        "eta: a new prompt is admitted only while accepted + running < (eta + v + 1) * B, so rollouts "
        "stay within eta policy versions of the trainer. 0 = synchronous RL. A ceiling: see admission.",
    )
    admission: str = option(
        "fresh",
        "fresh: admit a prompt only as many versions ahead of the trainer (1..eta) as measured generation "
        "latency and training step time need for the trainer never to wait, so data is as fresh as overlap "
        "allows; greedy: fill the whole eta budget at once.",
        choices=("fresh", "greedy"),
    )
    max_concurrent: int = option(64, "Cap on groups generating at once (across all rollout workers).")
    num_workers: int = option(1, "Rollout worker processes (async mode).")
    threads_per_worker: int = option(1, "torch threads of each rollout worker process (async mode).")
    max_restarts: int = option(
        3, "A rollout worker that dies is restarted this many times in all (by launchers that can); meanwhile "
        "its prompts are re-issued to the others and the run goes on.")
    kv_blocks: int = option(2048, "Engine: KV-cache blocks per worker (the memory bound).")
    kv_block_size: int = option(16, "Engine: tokens per KV-cache block.")
