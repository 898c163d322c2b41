"""Trainer -> rollout weight broadcast over gloo on loopback: bytes and seconds per update.

    python benchmarks/weight_sync.py                       # ~0.5M and ~50M-param Qwen2, 2 receivers
    python benchmarks/weight_sync.py --models 50m --bucket-mb 256 32 --receivers 1 2

One publisher (this process) and k receiver processes, each holding an areal rollout `Engine` of the
same architecture. Per update we report: snapshot_s (what publish() costs the trainer), transfer_s
(start_update -> every receiver has every bucket), the receivers' recv_s and latency (publish thread's
start -> fully received), and pause_s (apply() into the engine: the only time generation stops).
Updates are sent one at a time (the publisher waits for each, as in η=0) so the figures are per update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.multiprocessing as mp

MODELS = {  # tiny Qwen2 shapes (tied embeddings); the parameter counts are printed
    "0.5m": dict(vocab_size=3000, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "50m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=11,
                num_attention_heads=8, num_key_value_heads=4),
}


def build(name: str, seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(max_position_embeddings=256, tie_word_embeddings=True, **MODELS[name])
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _receiver(address, rank, k, model_name, updates, results):
    torch.set_num_threads(1)
    from areal.rollout import Engine
    from areal.rollout.weight_receiver import WeightReceiver, apply
    from areal.transport import DistReceiver

    try:
        engine = Engine(build(model_name, seed=100 + rank), num_blocks=8, block_size=16, seed=0)
        receiver = WeightReceiver(DistReceiver(address, rank, k, timeout_s=120, connect_timeout_s=300))
        rows = []
        for v in range(1, updates + 1):
            update = receiver.wait_for(v, timeout=300)
            row = dict(version=v, recv_s=update.recv_s, latency_s=update.latency_s)
            row["pause_s"] = apply(update, engine)
            rows.append(row)
            results.put(("ack", rank, v))
        receiver.close()
        results.put(("done", rank, rows))
    except BaseException as exc:
        results.put(("error", rank, repr(exc)))


def run(model_name: str, receivers: int, bucket_mb: float, updates: int) -> dict:
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.transport import DistSender

    model = build(model_name, seed=0)
    params = sum(p.numel() for p in model.parameters())
    sender = DistSender(num_receivers=receivers, timeout_s=120, connect_timeout_s=300)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(sender.address, r, receivers, model_name, updates, results), daemon=True)
             for r in range(1, receivers + 1)]
    for p in procs:
        p.start()
    pub = WeightPublisher(sender, bucket_mb=bucket_mb)
    pub.wait_connected(300)
    publish_s = []
    for v in range(1, updates + 1):
        with torch.no_grad():
            for p in model.parameters():  # a "training step": weights change
                p.add_(1e-3)
        t0 = time.perf_counter()
        pub.publish(v, ((n, p.detach()) for n, p in model.named_parameters()))
        publish_s.append(time.perf_counter() - t0)
        for _ in range(receivers):  # η=0: every worker applied v before the next step
            msg = results.get(timeout=600)
            if msg[0] == "error":
                raise RuntimeError(f"receiver {msg[1]}: {msg[2]}")
    rows = []
    for _ in range(receivers):
        msg = results.get(timeout=600)
        if msg[0] != "done":
            raise RuntimeError(f"receiver {msg[1]}: {msg[2]}")
        rows += msg[2][1:]  # the first update pays first-touch allocation; report the steady state
    pub.close()
    for p in procs:
        p.join(30)
    hist = pub.history[1:]
    med = statistics.median
    nbytes = hist[0].bytes
    transfer = med(h.transfer_s for h in hist)
    return {
        "model": model_name, "params": params, "bytes": nbytes, "buckets": hist[0].buckets,
        "receivers": receivers, "bucket_mb": bucket_mb, "updates_measured": len(hist),
        "connect_s": round(pub.connect_s, 3),
        "publish_s (snapshot)": round(med(publish_s[1:]), 4),
        "transfer_s": round(transfer, 4),
        "transfer_MBps": round(nbytes / transfer / 1e6, 1),
        "recv_latency_s": round(med(r["latency_s"] for r in rows), 4),
        "pause_s (apply)": round(med(r["pause_s"] for r in rows), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["0.5m", "50m"], choices=list(MODELS))
    ap.add_argument("--receivers", nargs="+", type=int, default=[2])
    ap.add_argument("--bucket-mb", nargs="+", type=float, default=[256.0])
    ap.add_argument("--updates", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        for k in args.receivers:
            for mb in args.bucket_mb:
                try:
                    row = run(name, k, mb, args.updates)
                except Exception as exc:  # report the failing configuration and go on with the others
                    row = {"model": name, "receivers": k, "bucket_mb": mb, "error": repr(exc)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
