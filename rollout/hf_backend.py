"""Hugging Face `generate` as a rollout backend: the reference and the baseline.

Static batches, padded on the left. Log-probs come from `generate`'s processed scores,
i.e. the distribution each token was actually sampled from (temperature, top-k and
top-p applied), so they are exact behaviour log-probs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from areal.rollout.types import GenerationOutput, SamplingParams


class HFGenerateBackend:
    def __init__(self, model, *, eos_token_ids: list[int], pad_token_id: int, batch_size: int = 256, version: int = 0):
        self.model = model.eval()
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.version = version
        self._generated_tokens, self._busy_s = 0, 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], mode: str = "keep") -> None:
        """Copy new weights in place. Static batches never straddle an update, so `mode` is moot."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"weight update names '{name}', which the rollout model lacks")
                params[name].copy_(tensor)
        self.version = version

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """One output per sample, prompt-major: prompt 0's n samples come first."""
        t0 = time.perf_counter()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        flat = [(i, ids) for i, ids in enumerate(prompt_token_ids) for _ in range(params.n)]
        outputs: list[GenerationOutput] = []
        for start in range(0, len(flat), self.batch_size):
            outputs += self._generate_batch(flat[start : start + self.batch_size], params)
        for k, out in enumerate(outputs):
            out.sample_index = k % params.n
        self._generated_tokens += sum(len(o.token_ids) for o in outputs)
        self._busy_s += time.perf_counter() - t0
        return outputs

    def stats(self) -> dict:
        return {"generated_tokens": self._generated_tokens, "version": self.version,
                "tokens_per_s": self._generated_tokens / self._busy_s if self._busy_s else 0.0}

    def _generate_batch(self, items: list[tuple[int, list[int]]], params: SamplingParams) -> list[GenerationOutput]:
        width = max(len(ids) for _, ids in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        stop_ids = [] if params.ignore_eos else self.eos_token_ids
        stop_ids = list(dict.fromkeys(stop_ids + list(params.stop_token_ids)))
        sampling = {} if params.greedy else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
        }
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.max_new_tokens if params.ignore_eos else None,
            eos_token_id=stop_ids or None,
            pad_token_id=self.pad_token_id,
            do_sample=not params.greedy,
            output_scores=True,
            return_dict_in_generate=True,
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
        new_tokens = out.sequences[:, width:].cpu()
        scores = torch.stack(out.scores, dim=1).float()  # [batch, new, vocab], processed logits
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.to(scores.device).unsqueeze(-1))
        logprobs = logprobs.squeeze(-1).cpu()
        results = []
        stop_set = set(stop_ids)
        for row, (prompt_index, _) in enumerate(items):
            tokens = new_tokens[row].tolist()
            length, reason = len(tokens), "length"
            for t, tok in enumerate(tokens):
                if tok in stop_set:
                    length, reason = t + 1, "stop"
                    break
            results.append(
                GenerationOutput(
                    prompt_index=prompt_index,
                    token_ids=tokens[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    versions=[self.version] * length,
                    finish_reason=reason,
                )
            )
        return results
