"""How long a checkpoint stops the trainer: areal's lazy checkpoint vs synchronous and DCP saves.

    python benchmarks/checkpoint_stall.py            # the shipped model and a ~100M-parameter Qwen2, ~3 min
    python benchmarks/checkpoint_stall.py --quick    # the shipped model only

Subjects are areal `TrainEngine`s after two real updates, so the optimizer state (AdamW moments)
is the trainer's own. For each subject, in one process:
* stall per checkpoint, the seconds the training loop cannot go on:
    areal      `LazyCheckpointer.save()` + the wait at the next optimizer step (its `blocked_s`;
               the host copy overlaps the next step's forward and backward, the write runs behind)
    torch.save the same state (model + optimizer state dicts) written synchronously
    safetensors the same tensors written synchronously with `safetensors.torch.save_file`
    dcp_async  `torch.distributed.checkpoint.async_save` (its staging copy blocks; the write does not)
  The synchronous baselines are not fsynced (that would only make them slower); areal's write is.
* training step time with no checkpoint and with an areal checkpoint every step
  (`on_busy=skip`: one falling due while the previous is still being written is skipped; the
  count is printed), in alternating pairs of blocks so the machine's drift hits both alike; the
  overhead is the median over the pairs.
One torch thread for training (the 2-core machine): the background copy and write get the other.
Last line: one JSON object with `stall_ratio_vs_sync` (best synchronous stall / areal stall),
`stall_ratio_vs_dcp_async` and `step_overhead_fraction` (extra step time at one checkpoint per
step), for the larger subject, plus every figure per subject.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "models" / "tiny-math"
QWEN2_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4)


def build_model(name: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    if name == "tiny-math":
        return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    cfg = Qwen2Config(**QWEN2_100M, max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).float()


def make_groups(vocab: int, groups: int, n: int, prompt: int, completion: int):
    from areal.trajectory import Group, Trajectory

    g = torch.Generator().manual_seed(1234)
    out = []
    for gi in range(groups):
        p = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        trajs = [Trajectory(p, torch.randint(3, vocab, (completion,), generator=g).tolist(),
                            (-torch.rand(completion, generator=g)).tolist(), [0] * completion,
                            reward=float(i % 2)) for i in range(n)]
        out.append(Group(gi, trajs))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, blocks: int, steps_per_block: int, repeats: int, workdir: Path) -> dict:
    from safetensors.torch import save_file

    from areal.checkpoint import nested
    from areal.checkpoint.lazy import LazyCheckpointer
    from areal.trainer.batch import build_batch
    from areal.trainer.config import TrainerConfig
    from areal.trainer.engine import TrainEngine

    model = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    shape = (8, 8, 16, 12) if name == "tiny-math" else (2, 2, 48, 48)  # groups, n, prompt, completion
    batch = build_batch(make_groups(model.config.vocab_size, *shape), None, pad_token_id=0)
    engine = TrainEngine(model, TrainerConfig(lr=1e-5, minibatches=1), temperature=1.0)
    for _ in range(2):  # AdamW allocates its moments in the first update
        engine.train_step(batch)
    tensors, _meta = engine.checkpoint_state()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    lazy = LazyCheckpointer(workdir / "areal", keep_last=1, on_busy="skip")
    plain, with_ckpt, overheads = [], [], []
    step = 0
    for _ in range(blocks):  # pairs of blocks: no checkpoint, then a checkpoint every step
        lazy.wait()  # the previous block's write must not slow this one's baseline
        engine.set_before_step(None)
        a = [timed(lambda: engine.train_step(batch)) for _ in range(steps_per_block)]
        engine.set_before_step(lazy.before_update)
        b = []
        for _ in range(steps_per_block):
            step += 1
            t0 = time.perf_counter()
            live, meta = engine.checkpoint_state()
            lazy.save(step, live, {"trainer": meta})
            engine.train_step(batch)
            b.append(time.perf_counter() - t0)
        plain += a
        with_ckpt += b
        overheads.append(sum(b) / sum(a) - 1)
    engine.set_before_step(None)
    lazy.wait()
    records = [r for r in lazy.records() if r.ok]
    skipped = lazy.skipped
    lazy.close()
    # areal alone, one checkpoint followed by one step, as a trainer checkpointing now and then sees it
    spaced = LazyCheckpointer(workdir / "areal-spaced", keep_last=1, on_busy="wait")
    engine.set_before_step(spaced.before_update)
    for i in range(repeats):
        live, meta = engine.checkpoint_state()
        spaced.save(10_000 + i, live, {"trainer": meta})
        engine.train_step(batch)
        spaced.wait()
    engine.set_before_step(None)
    spaced_records = [r for r in spaced.records() if r.ok]
    spaced.close()

    def state_dicts():
        return {"model": model.state_dict(), "optim": engine.backend.optimizer.state_dict()}

    def torch_save():
        torch.save(state_dicts(), workdir / "torch.pt")

    def safetensors_save():
        flat, skeleton = nested.flatten_state(state_dicts(), "")
        seen, unique = set(), {}
        for k, v in flat.items():  # tied weights once, as safetensors' save_model does
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v.contiguous()
        save_file(unique, str(workdir / "st.safetensors"))
        (workdir / "st.json").write_text(json.dumps(skeleton))

    sync = {"torch.save": [timed(torch_save) for _ in range(repeats)],
            "safetensors": [timed(safetensors_save) for _ in range(repeats)]}
    dcp = dcp_async_stalls(state_dicts, workdir, repeats)

    areal_stall = statistics.median(r.blocked_s for r in spaced_records)
    best_sync = min(statistics.median(v) for v in sync.values())
    dcp_stall = statistics.median(dcp) if dcp else math.nan
    overhead = statistics.median(overheads)  # paired blocks: robust to the machine's drift
    return {
        "model": name, "params_m": round(params / 1e6, 2), "checkpoint_mb": round(nbytes / 2**20, 1),
        "stall_s": {"areal": areal_stall, **{k: statistics.median(v) for k, v in sync.items()}, "dcp_async": dcp_stall},
        "areal_snapshot_s": statistics.median(r.snapshot_s for r in spaced_records),
        "areal_persist_s": statistics.median(r.persist_s for r in spaced_records),
        "step_s": {"no_checkpoint": statistics.median(plain), "checkpoint_every_step": statistics.median(with_ckpt)},
        "every_step": {"committed": len(records), "skipped": skipped,
                       "blocked_s_median": statistics.median(r.blocked_s for r in records) if records else None},
        "stall_ratio_vs_sync": best_sync / max(areal_stall, 1e-9),
        "stall_ratio_vs_dcp_async": dcp_stall / max(areal_stall, 1e-9),
        "step_overhead_fraction": overhead,
    }


def dcp_async_stalls(state_dicts, workdir: Path, repeats: int) -> list[float]:
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return []
    if not dist.is_initialized():
        from areal.trainer.backends import init_process_group

        init_process_group()
    stalls = []
    for i in range(repeats):
        sd = state_dicts()
        t0 = time.perf_counter()
        future = dcp.async_save(sd, checkpoint_id=str(workdir / f"dcp{i}"))
        stalls.append(time.perf_counter() - t0)
        future.result()  # one in flight at a time, as for areal
    return stalls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the shipped model only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    subjects = [("tiny-math", 20, 5, 5)] + ([] if args.quick else [("qwen2-100m", 7, 2, 3)])
    results = []
    for name, blocks, steps, repeats in subjects:
        workdir = Path(tempfile.mkdtemp(prefix=f"areal-ckpt-bench-{name}-"))
        try:
            r = measure(name, blocks, steps, repeats, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results.append(r)
        st = r["stall_s"]
        print(f"{name:11s} {r['params_m']:7.2f}M params, {r['checkpoint_mb']:7.1f} MiB per checkpoint | stall per "
              f"checkpoint: areal {st['areal'] * 1e3:8.2f} ms, torch.save {st['torch.save'] * 1e3:8.1f} ms, "
              f"safetensors {st['safetensors'] * 1e3:8.1f} ms, DCP async_save {st['dcp_async'] * 1e3:8.1f} ms | "
              f"areal copy {r['areal_snapshot_s'] * 1e3:.1f} ms (overlapped), write {r['areal_persist_s'] * 1e3:.0f} ms "
              f"(background)", flush=True)
        print(f"{'':11s} step {r['step_s']['no_checkpoint'] * 1e3:.1f} ms without, "
              f"{r['step_s']['checkpoint_every_step'] * 1e3:.1f} ms with a checkpoint every step "
              f"({r['every_step']['committed']} committed, {r['every_step']['skipped']} skipped while one was being "
              f"written): overhead {r['step_overhead_fraction'] * 100:+.2f}%", flush=True)
    head = results[-1]
    print(json.dumps({
        "model": head["model"],
        "stall_ratio_vs_sync": round(head["stall_ratio_vs_sync"], 1),
        "stall_ratio_vs_dcp_async": round(head["stall_ratio_vs_dcp_async"], 1),
        "step_overhead_fraction": round(head["step_overhead_fraction"], 4),
        "per_model": results,
    }))


if __name__ == "__main__":
    sys.exit(main())
