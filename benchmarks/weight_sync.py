"""Trainer -> rollout weight broadcast over gloo on loopback: bytes and seconds per update.

    python benchmarks/weight_sync.py            # both sections (~2 min on 2 CPU cores)
    python benchmarks/weight_sync.py --quick    # small models, fewer updates (~1 min)
    python benchmarks/weight_sync.py --sections direct --models 50m --bucket-mb 256 32 --receivers 1 2
    python benchmarks/weight_sync.py --sections channel --channel-models tiny-math --channel-workers 1 2 4

Section "direct": one publisher (this process) and k receiver processes, each holding an areal rollout
`Engine` of the same architecture, wired by hand (the DistSender's address passed as an argument, acks
on a multiprocessing queue). Per update we report: snapshot_s (what publish() costs the trainer),
transfer_s (start_update -> every receiver has every bucket), the receivers' recv_s and latency (publish
thread's start -> fully received), and pause_s (apply() into the engine: the only time generation stops).
Updates are sent one at a time (the publisher waits for each, as in η=0) so the figures are per update.

Section "channel": 1, 2 and 4 rollout worker processes reached the way a real async run reaches them.
This process plays the controller and trainer0: it hosts a `Hub` (areal/channel.py, with a run secret)
and an `Endpoint("trainer0")`; each worker process connects `Endpoint("rolloutR")`, loads its engine as
rollout_main does (the default recipe's model through areal.setup.make_backend for "tiny-math"; a
synthetic Qwen2 of MODELS otherwise) and says `WorkerReady(R)`. trainer0 then builds
`Fleet(endpoint, new_sender)`, `fleet.join(R)` for the first N workers and
`WeightPublisher(fleet.weight_group())`, which sends each of them a `WeightGroup` message; the worker
builds `WeightReceiver(DistReceiver(...))` from it, exactly as areal/roles.py does. The worker loop is
rollout/worker.py serve()'s idle loop: poll the receiver, apply() a complete update, then wait up to
--poll-ms (20 ms there) for a channel message. After each apply it sends trainer0
`WorkerStats({"version", "pause_s", "applied_at", "received_at", ...})`.
Per worker count N we publish --channel-updates versions (after a "training step" on the weights; the
next publish waits for every worker's stats of the previous one plus a random 20-60 ms, so nothing is
coalesced and the trainer's steps are not in phase with the workers' polls) and report, as median and
p90 over the updates after the first (which pays first-touch allocation):
    pause_s                        apply(update, engine) in each worker (pooled over the N workers)
    publish_to_last_applied_s      publish() called -> the LAST of the N workers applied that version
    publish_to_last_received_s     publish() called -> the last worker holds the whole version (no poll wait)
and group_form_s (weight_group() -> every member joined). The same worker processes serve every N (the
group re-forms over the first N ranks, as on a membership change; the others idle), so the workers are
started once per model. "vs_1_worker" is N workers' median publish_to_last_applied_s over that of 1
worker, measured in the same run. Timestamps compared across processes are time.time() on one host.

Every process runs with torch.set_num_threads(1). The last line printed is ONE JSON object with all the
figures: {"direct": [...], "channel_workers": {"N": {"MODEL": {...}}}, "elapsed_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import random
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
DEFAULT_MODEL = "tiny-math"  # the default recipe's model.path (assets/models/tiny-math), loaded as a run loads it
CHANNEL_MODELS = [DEFAULT_MODEL, *MODELS]


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


# ------------------------------------------------------------------ section "channel": workers reached as in a real run
def _trainer_model(name: str):
    """trainer0's copy of the policy: the weights that get published."""
    if name != DEFAULT_MODEL:
        return build(name, seed=0)
    from areal.model import load_model
    from areal.recipe import Recipe

    return load_model(Recipe().model, torch.device("cpu")).eval()


def _worker_engine(name: str, rank: int):
    """The rollout engine a worker serves from (for the default model: rollout_main's own calls)."""
    if name != DEFAULT_MODEL:
        from areal.rollout import Engine

        return Engine(build(name, seed=100 + rank), num_blocks=8, block_size=16, seed=0)
    from areal.model import load_model, load_tokenizer
    from areal.recipe import Recipe
    from areal.setup import make_backend

    recipe = Recipe()
    return make_backend(recipe, load_model(recipe.model, torch.device("cpu")), load_tokenizer(recipe.model), version=-1)


def _channel_worker(hub_address: str, secret: str, rank: int, model_name: str, poll_s: float) -> None:
    """One rollout worker process: areal/roles.py rollout_main + the weight part of RolloutWorker.serve."""
    torch.set_num_threads(1)
    from areal.channel import Endpoint
    from areal.messages import Stop, WeightGroup, WorkerReady, WorkerStats
    from areal.rollout.weight_receiver import WeightReceiver, apply
    from areal.transport import DistReceiver

    endpoint = Endpoint(f"rollout{rank}", hub_address, secret)
    receiver = None
    try:
        engine = _worker_engine(model_name, rank)
        endpoint.send("trainer0", WorkerReady(rank))
        while True:
            if receiver is not None:
                try:  # as serve()'s receive(): a group that ended or broke is left, a new WeightGroup follows
                    update = receiver.poll()
                    if update is not None:
                        version, recv_s = update.version, update.recv_s
                        received_at = update.header.sent_at + update.latency_s  # wall time it was complete here
                        pause_s = apply(update, engine)
                        endpoint.send("trainer0", WorkerStats({
                            "version": version, "pause_s": pause_s, "applied_at": time.time(),
                            "received_at": received_at, "recv_s": recv_s, "dropped": receiver.dropped}))
                    elif receiver.peer_closed:
                        receiver.close()
                        receiver = None
                except (RuntimeError, ConnectionError):
                    receiver.abandon()
                    receiver = None
            try:
                msg = endpoint.recv(timeout=poll_s).msg
            except queue.Empty:
                continue
            if isinstance(msg, Stop):
                break
            if isinstance(msg, WeightGroup):  # rollout_main's on_control
                if receiver is not None:
                    receiver.abandon()
                receiver = WeightReceiver(DistReceiver(msg.address, msg.rank, msg.world_size - 1, device="cpu",
                                                       timeout_s=60.0, connect_timeout_s=120.0))
    except BaseException as exc:  # noqa: BLE001 - reported to trainer0, which fails the configuration
        endpoint.send("trainer0", WorkerStats({"error": repr(exc)}))
    finally:
        if receiver is not None:
            receiver.abandon()
        endpoint.close()


def _quantile(xs, q: float) -> float:
    """Nearest-rank quantile (q=0.5 is the upper median for an even count; we report statistics.median)."""
    xs = sorted(xs)
    return xs[max(math.ceil(q * len(xs)) - 1, 0)]


def _summary(xs, digits: int = 5) -> dict:
    return {"median": round(statistics.median(xs), digits), "p90": round(_quantile(xs, 0.9), digits)}


def run_channel(model_name: str, counts: list[int], updates: int, poll_s: float, seed: int = 0) -> dict[int, dict]:
    """Start max(counts) workers once; for each N, form the weight group over the first N and publish."""
    from areal.fleet import Fleet
    from areal.channel import Endpoint, Hub, new_secret
    from areal.messages import Stop, WorkerReady, WorkerStats
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.transport import DistSender

    secret = new_secret()
    hub = Hub(secret)
    trainer = Endpoint("trainer0", hub.address, secret)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_channel_worker, args=(hub.address, secret, r, model_name, poll_s), daemon=True)
             for r in range(max(counts))]
    rng = random.Random(seed)

    def next_msg(deadline: float):
        while True:
            try:
                got = trainer.recv(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise TimeoutError(f"no message from the workers within the deadline ({model_name})") from None
            if isinstance(got.msg, WorkerStats) and "error" in got.msg.stats:
                raise RuntimeError(f"{got.src}: {got.msg.stats['error']}")
            return int(got.src.removeprefix("rollout")), got.msg

    def new_sender(num_receivers: int) -> DistSender:  # as roles.py: the group's store on the chosen interface
        return DistSender(num_receivers, address="tcp://127.0.0.1:0", timeout_s=60.0, connect_timeout_s=120.0)

    try:
        for p in procs:
            p.start()
        model = _trainer_model(model_name)
        params = sum(p.numel() for p in model.parameters())
        ready, deadline = set(), time.monotonic() + 300
        while len(ready) < len(procs):
            rank, msg = next_msg(deadline)
            if isinstance(msg, WorkerReady):
                ready.add(rank)
        out = {}
        version = 0
        for n in counts:
            fleet = Fleet(trainer, new_sender)
            for r in range(n):
                fleet.join(r)
            t0 = time.perf_counter()
            pub = WeightPublisher(fleet.weight_group())
            pub.wait_connected(180)
            form_s = time.perf_counter() - t0
            rows = []
            for _ in range(updates):
                version += 1
                with torch.no_grad():
                    for p in model.parameters():  # a "training step": weights change
                        p.add_(1e-3)
                published_at = time.time()
                pub.publish(version, ((name, p.detach()) for name, p in model.named_parameters()))
                got: dict[int, dict] = {}
                deadline = time.monotonic() + 300
                while len(got) < n:
                    rank, msg = next_msg(deadline)
                    if isinstance(msg, WorkerStats) and msg.stats.get("version") == version:
                        got[rank] = msg.stats
                rows.append((published_at, got))
                time.sleep(rng.uniform(0.02, 0.06))  # the trainer's next step: out of phase with the polls
            pub.close()
            rows = rows[1:]  # the first update of a group pays first-touch allocation; report the steady state
            applied = [max(s["applied_at"] for s in got.values()) - t for t, got in rows]
            received = [max(s["received_at"] for s in got.values()) - t for t, got in rows]
            pauses = [s["pause_s"] for _, got in rows for s in got.values()]
            out[n] = {
                "workers": n, "params": params, "bytes": pub.history[-1].bytes, "updates_measured": len(rows),
                "group_form_s": round(form_s, 3),
                "pause_s": _summary(pauses),
                "publish_to_last_applied_s": _summary(applied),
                "publish_to_last_received_s": _summary(received),
                "coalesced": pub.coalesced_total,
                "dropped": sum(s["dropped"] for s in rows[-1][1].values()),  # receivers count their own
            }
        base = out.get(1)
        for n, row in out.items():
            if base is not None:
                row["vs_1_worker"] = round(row["publish_to_last_applied_s"]["median"]
                                           / base["publish_to_last_applied_s"]["median"], 2)
        return out
    finally:
        for r in range(len(procs)):
            trainer.send(f"rollout{r}", Stop("benchmark done"))
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
        trainer.close()
        hub.close()


def _ms(s: dict) -> str:
    return f"median {s['median'] * 1e3:7.2f} ms  p90 {s['p90'] * 1e3:7.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models only, fewer updates")
    ap.add_argument("--sections", nargs="+", default=["direct", "channel"], choices=["direct", "channel"])
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="direct: 0.5m 50m (quick: 0.5m)")
    ap.add_argument("--receivers", nargs="+", type=int, default=[2])
    ap.add_argument("--bucket-mb", nargs="+", type=float, default=[256.0])
    ap.add_argument("--updates", type=int, default=None, help="direct: 5 (quick: 3)")
    ap.add_argument("--channel-models", nargs="+", default=None, choices=CHANNEL_MODELS,
                    help=f"channel: {DEFAULT_MODEL} 50m (quick: {DEFAULT_MODEL})")
    ap.add_argument("--channel-workers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--channel-updates", type=int, default=None, help="channel, per worker count: 11 (quick: 6)")
    ap.add_argument("--poll-ms", type=float, default=20.0,
                    help="a worker's wait for a channel message between two polls (serve()'s idle wait: 20)")
    args = ap.parse_args()
    models = args.models or (["0.5m"] if args.quick else ["0.5m", "50m"])
    updates = args.updates or (3 if args.quick else 5)
    channel_models = args.channel_models or ([DEFAULT_MODEL] if args.quick else [DEFAULT_MODEL, "50m"])
    channel_updates = args.channel_updates or (6 if args.quick else 11)
    torch.set_num_threads(1)
    started = time.perf_counter()
    summary: dict = {"direct": [], "channel_workers": {}}
    if "direct" in args.sections:
        for name in models:
            for k in args.receivers:
                for mb in args.bucket_mb:
                    try:
                        row = run(name, k, mb, updates)
                    except Exception as exc:  # report the failing configuration and go on with the others
                        row = {"model": name, "receivers": k, "bucket_mb": mb, "error": repr(exc)}
                    summary["direct"].append(row)
                    print(json.dumps(row), flush=True)
    if "channel" in args.sections:
        counts = sorted(set(args.channel_workers))
        for name in channel_models:
            try:
                rows = run_channel(name, counts, channel_updates, args.poll_ms / 1e3)
            except Exception as exc:
                rows = {n: {"error": repr(exc)} for n in counts}
            for n, row in rows.items():
                summary["channel_workers"].setdefault(str(n), {})[name] = row
                if "error" in row:
                    print(f"channel {name:9s} {n} worker(s): {row['error']}", flush=True)
                    continue
                print(f"channel {name:9s} {n} worker(s): pause {_ms(row['pause_s'])} | publish -> last applied "
                      f"{_ms(row['publish_to_last_applied_s'])} (x{row.get('vs_1_worker', float('nan')):.2f} vs 1 worker)"
                      f" | -> last received {_ms(row['publish_to_last_received_s'])}", flush=True)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
