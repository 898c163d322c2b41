"""areal's streaming continuous-batching rollout engine (paged KV cache, in-flight weight updates).

Offline:    Engine(path_or_model, num_blocks=..., block_size=...).generate(prompts, SamplingParams(n=8))
Streaming:  rid = engine.add_request(prompt_ids, params, on_finish=cb); while engine.has_unfinished(): engine.step()
            (cb(request_id, GenerationOutput) fires for each sample the step it finishes)
Resume:     partial = engine.unfinished(rid)   # samples still generating, tokens so far (a snapshot)
            other.add_request(prompt_ids, params, on_finish=cb, resume=partial)   # continue them elsewhere
Weights:    between two steps: begin_update(v); load_bucket(named_tensors)*; finish_update(v, mode)
            mode="keep": in-flight sequences continue on their old KV; "recompute": their KV is
            rebuilt under the new weights. Every token records the version that sampled it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from areal import faults

from areal.rollout.kv_cache import BlockPool
from areal.rollout.model_runner import ModelRunner
from areal.rollout.sampler import SamplingBatch, sample
from areal.rollout.scheduler import Request, Scheduler, Sequence
from areal.rollout.types import GenerationOutput, PartialSample, SamplingParams

FinishCallback = Callable[[int, GenerationOutput], None]


def _eos_ids(model: nn.Module) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    return frozenset(ids)


class Engine:
    def __init__(
        self,
        model_or_path: nn.Module | str,
        *,
        num_blocks: int = 2048,
        block_size: int = 16,
        max_num_seqs: int = 512,
        max_num_batched_tokens: int = 8192,
        tokenizer=None,
        version: int = 0,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(model_or_path, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
            if tokenizer is None:
                try:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(model_or_path)
                except Exception:  # a model dir without tokenizer files: stop strings unavailable
                    tokenizer = None
            copy_model = False
        else:
            model, copy_model = model_or_path, True
        if device is not None:
            model = model.to(device)
        self.runner = ModelRunner(model, num_blocks, block_size, copy_model=copy_model)
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens)
        self.tokenizer = tokenizer
        self.version = version
        self.eos_ids = _eos_ids(self.runner.model)
        self.max_model_len = min(
            getattr(self.runner.config, "max_position_embeddings", 1 << 30), num_blocks * block_size
        )
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self.requests: dict[int, Request] = {}
        self._updating: int | None = None
        self._driver: asyncio.Task | None = None
        self._stats = dict(generated_tokens=0, prefill_tokens=0, prefill_tokens_saved=0, steps=0, busy_s=0.0)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_finish: FinishCallback | None = None,
        prompt_index: int = 0,
        resume: list[PartialSample] | None = None,
    ) -> int:
        """Start a request of `params.n` samples; returns its id.

        `resume`: run only these samples of the request (the caller holds the others, finished):
        each continues from its tokens so far (prompt + tokens re-prefilled, like a recompute-mode
        update), its log-probs and versions lists starting as the given ones. The seed is derived as
        for the original request, so a seeded request yields the tokens it would have uninterrupted.
        All n samples with no tokens yet is exactly a fresh request."""
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_model_len={self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass Engine(..., tokenizer=...)")
        if resume is not None:
            self._check_resume(resume, params, len(prompt))
            if len(resume) == params.n and not any(p.token_ids for p in resume):
                resume = None  # nothing generated yet: start the group as new (one leader, forked)
        seed = self._rng.getrandbits(62) if params.seed is None else (params.seed * 1_000_003 + prompt_index)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        rid = next(self._ids)
        req = Request(rid, prompt_index, prompt, params, seed & ((1 << 62) - 1), stop_ids, on_finish)
        if resume is None:
            fork = params.n if params.n > 1 else 0
            req.sequences.append(Sequence(req, 0, list(prompt), len(prompt), fork_pending=fork))
        else:
            req.num_finished = params.n - len(resume)  # the caller's finished samples count as done
            for p in sorted(resume, key=lambda p: p.sample_index):
                req.sequences.append(Sequence(req, p.sample_index, prompt + list(p.token_ids), len(prompt),
                                              logprobs=list(p.logprobs), versions=list(p.versions)))
        self.requests[rid] = req
        for seq in req.sequences:
            self.scheduler.add(seq)
        return rid

    def _check_resume(self, resume: list[PartialSample], params: SamplingParams, prompt_len: int) -> None:
        indices = [p.sample_index for p in resume]
        if not resume:
            raise ValueError("resume=[]: no sample left to run")
        if len(set(indices)) != len(indices) or not all(0 <= i < params.n for i in indices):
            raise ValueError(f"resume: sample indices {indices} must be distinct and in [0, {params.n})")
        for p in resume:
            if not len(p.token_ids) == len(p.logprobs) == len(p.versions):
                raise ValueError(f"resume: sample {p.sample_index} has unequal tokens/logprobs/versions")
            if len(p.token_ids) >= params.max_new_tokens or prompt_len + len(p.token_ids) >= self.max_model_len:
                raise ValueError(f"resume: sample {p.sample_index} ({len(p.token_ids)} tokens) had already finished")

    def unfinished(self, request_id: int) -> list[PartialSample]:
        """The request's samples still generating, with their tokens, log-probs and versions so far
        (copies), by sample index; a group leader not yet forked stands for all n samples, empty.
        [] for an unknown or finished request. Reads only: generation is not disturbed."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        out: list[PartialSample] = []
        for seq in req.sequences:
            if seq.finish_reason is not None:
                continue
            if seq.fork_pending:
                out.extend(PartialSample(i) for i in range(seq.fork_pending))
            else:
                out.append(PartialSample(seq.sample_index, seq.token_ids[seq.num_prompt_tokens :],
                                         list(seq.logprobs), list(seq.versions)))
        return sorted(out, key=lambda p: p.sample_index)

    def get_rng_state(self) -> list:
        """The state of the generator that seeds unseeded requests, JSON-able."""
        version, internal, gauss = self._rng.getstate()
        return [version, list(internal), gauss]

    def set_rng_state(self, state: list) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: int) -> list[GenerationOutput]:
        """Stop a request; its unfinished samples come back (and to on_finish) with finish_reason 'abort'."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        outs = []
        for seq in list(req.sequences):
            if seq.finish_reason is None:
                outs.extend(self._finish_all(seq, "abort"))
        return outs

    def _finish_all(self, seq: Sequence, reason: str) -> list[GenerationOutput]:
        """Retire a sequence now; a group leader that never forked reports all n samples (empty)."""
        self.scheduler.remove(seq)
        if not seq.fork_pending:
            return [self._finish(seq, reason)]
        req = seq.request
        seq.finish_reason = reason
        prompt = req.prompt_token_ids
        return [self._finish(Sequence(req, i, list(prompt), len(prompt)), reason) for i in range(seq.fork_pending)]

    # ------------------------------------------------------------------ weights
    def begin_update(self, version: int) -> None:
        self._updating = version

    def load_bucket(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self._updating is None:
            raise RuntimeError("load_bucket() outside begin_update()/finish_update()")
        return self.runner.load_weights(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)

    def finish_update(self, version: int, mode: str = "keep") -> None:
        if mode not in ("keep", "recompute"):
            raise ValueError(f"mode must be 'keep' or 'recompute', got {mode!r}")
        if self._updating != version:
            raise RuntimeError(f"finish_update({version}) does not match begin_update({self._updating})")
        self._updating = None
        self.version = version
        if mode == "recompute":
            self.scheduler.reset_all()  # KV rebuilt under the new weights; generated tokens are kept

    def update_weights(self, version: int, named_tensors, mode: str = "keep") -> None:
        """One-shot update: an iterable of (name, tensor), a dict, or an iterable of such buckets."""
        self.begin_update(version)
        if isinstance(named_tensors, dict):
            named_tensors = [named_tensors]
        for item in named_tensors:
            if isinstance(item, dict):
                self.load_bucket(item)
            else:
                self.load_bucket([item])
        self.finish_update(version, mode)

    def copy_weights_from(self, other: "Engine") -> None:
        """Take `other`'s weights and version (an engine of the same model, e.g. one that evaluates a
        version while `other` moves on to newer weights)."""
        self.update_weights(other.version, list(other.runner._params.items()))

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[tuple[int, GenerationOutput]]:
        """Schedule, run one forward, sample; returns the (request_id, output) pairs finished now."""
        faults.hit("rollout.step")
        if self._updating is not None:
            raise RuntimeError("step() during a weight update: call finish_update() first")
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        finished: list[tuple[int, GenerationOutput]] = []
        # the scheduler flags a sequence that cannot fit even alone: finish it, nothing to run
        for seq, n in zip(batch.seqs, batch.num_new):
            if n == 0 and seq.finish_reason == "length":
                seq.finish_reason = None
                finished.extend((seq.request.request_id, o) for o in self._finish_all(seq, "length"))
        pairs = [(s, n) for s, n in zip(batch.seqs, batch.num_new) if n > 0]
        if pairs:
            # single-token queries first, by block-table length (attention buckets by length)
            pairs.sort(key=lambda p: (p[1] != 1, len(p[0].block_table)))
            seqs = [p[0] for p in pairs]
            num_new = [p[1] for p in pairs]
            self.runner.copy_blocks(batch.copies)
            sampling = [s.num_computed + n == s.num_tokens for s, n in pairs]
            logits = self.runner.run(seqs, num_new, sampling)
            for seq, n in pairs:
                if not (n == 1 and seq.num_generated > 0 and seq.num_computed + 1 == seq.num_tokens):
                    self._stats["prefill_tokens"] += n  # prompt chunks and recomputation
                seq.num_computed += n
            rows: list[Sequence] = []
            row_index: list[int] = []
            for i, seq in enumerate(s for s, flag in zip(seqs, sampling) if flag):
                if seq.fork_pending:
                    rows.extend(self._fork(seq))
                    row_index.extend([i] * seq.request.params.n)
                    seq.fork_pending = 0
                else:
                    rows.append(seq)
                    row_index.append(i)
            if rows:
                if len(row_index) != logits.shape[0] or row_index != list(range(len(row_index))):
                    logits = logits[torch.tensor(row_index, device=logits.device)]
                finished.extend(self._sample_and_append(rows, logits))
        self._stats["steps"] += 1
        self._stats["busy_s"] += time.perf_counter() - t0
        return finished

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """The group's prompt is cached: the n samples share its blocks (copy-on-write on write)."""
        req = leader.request
        seqs = [leader]
        for i in range(1, req.params.n):
            child = Sequence(req, i, list(leader.token_ids), leader.num_prompt_tokens)
            child.num_computed = leader.num_computed
            child.block_table = self.pool.share(leader.block_table)
            req.sequences.append(child)
            seqs.append(child)
        self.scheduler.running.extend(seqs[1:])
        self._stats["prefill_tokens_saved"] += (req.params.n - 1) * leader.num_tokens
        return seqs

    def _sample_and_append(self, rows: list[Sequence], logits: torch.Tensor) -> list[tuple[int, GenerationOutput]]:
        params = [s.request.params for s in rows]
        batch = SamplingBatch(
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [s.request.seed for s in rows],
            [s.sample_index for s in rows],
            [s.num_generated for s in rows],
            device=logits.device,
            any_seeded=any(p.seed is not None for p in params),
        )
        tokens, logprobs = sample(logits, batch)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        version = self.version
        finished = []
        for seq, tok, lp, p in zip(rows, tokens, logprobs, params):
            seq.token_ids.append(tok)
            seq.logprobs.append(lp)
            seq.versions.append(version)
            reason = None
            if tok in seq.request.stop_ids:
                reason = "stop"
            elif p.stop and self._hit_stop_string(seq, p.stop):
                reason = "stop"
            elif seq.num_generated >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                self.scheduler.remove(seq)
                finished.append((seq.request.request_id, self._finish(seq, reason)))
        self._stats["generated_tokens"] += len(rows)
        return finished

    def _hit_stop_string(self, seq: Sequence, stops: list[str]) -> bool:
        longest = max(len(s) for s in stops)
        # decode enough trailing tokens to cover the longest stop string (a token is >= 1 char)
        tail = seq.token_ids[max(seq.num_prompt_tokens, seq.num_tokens - longest - 1) :]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in stops)

    def _finish(self, seq: Sequence, reason: str) -> GenerationOutput:
        seq.finish_reason = reason
        req = seq.request
        out = GenerationOutput(
            prompt_index=req.prompt_index,
            token_ids=seq.token_ids[seq.num_prompt_tokens :],
            logprobs=list(seq.logprobs),
            versions=list(seq.versions),
            finish_reason=reason,
            sample_index=seq.sample_index,
        )
        req.num_finished += 1
        if req.num_finished >= req.params.n:
            self.requests.pop(req.request_id, None)
        if req.on_finish is not None:
            req.on_finish(req.request_id, out)
        return out

    # ------------------------------------------------------------------ offline API
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """vLLM-style offline generation: one output per sample, prompt-major (prompt 0's n samples first)."""
        results: dict[tuple[int, int], GenerationOutput] = {}
        mine = {self.add_request(prompt, params, prompt_index=i) for i, prompt in enumerate(prompt_token_ids)}
        while self.has_unfinished():
            for rid, out in self.step():
                if rid in mine:
                    results[(out.prompt_index, out.sample_index)] = out
        return [results[k] for k in sorted(results)]

    # ------------------------------------------------------------------ asyncio API
    async def agenerate(
        self, prompt_token_ids: list[int], params: SamplingParams, prompt_index: int = 0
    ) -> list[GenerationOutput]:
        """Await one prompt's n samples. Steps run in a driver task on the running loop; other
        coroutines (e.g. a weight update) run between two steps."""
        future = asyncio.get_running_loop().create_future()
        outs: list[GenerationOutput] = []

        def on_finish(_rid: int, out: GenerationOutput) -> None:
            outs.append(out)
            if len(outs) == params.n and not future.done():
                future.set_result(sorted(outs, key=lambda o: o.sample_index))

        self.add_request(prompt_token_ids, params, on_finish=on_finish, prompt_index=prompt_index)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        return await future

    async def _drive(self) -> None:
        while self.has_unfinished():
            if self._updating is None:
                self.step()
            await asyncio.sleep(0)

    def stats(self) -> dict:
        s = self._stats
        return dict(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.pool.num_used,
            kv_blocks_total=self.pool.num_blocks,
            generated_tokens=s["generated_tokens"],
            prefill_tokens=s["prefill_tokens"],
            prefill_tokens_saved=s["prefill_tokens_saved"] + self.scheduler.prefill_tokens_saved,
            preemptions=self.scheduler.num_preemptions,
            steps=s["steps"],
            tokens_per_s=s["generated_tokens"] / s["busy_s"] if s["busy_s"] > 0 else 0.0,
            version=self.version,
        )
