"""Trainer -> rollout weight broadcast over gloo/loopback: layout, JSON headers, publisher/receiver logic with
receivers on threads of this process, and real processes."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from areal.rollout.weight_receiver import WeightReceiver, apply
from areal.trainer.weight_publisher import HISTORY_LEN, WeightPublisher
from areal.transport import ALIGN, DistReceiver, DistSender, SenderTransport, UpdateHeader, plan_layout
from pickle_helpers import RunsCode

TIMEOUT_S = 20.0  # every collective / store wait in these tests; a hang fails instead of blocking CI


def make_weights(version: int, scale: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic per version, mixed dtypes and odd shapes; ~0.2 MB per unit of scale."""
    g = torch.Generator().manual_seed(1000 + version)
    return {
        "embed.weight": torch.randn(97 * scale, 129, generator=g),
        "layer.0.bias": torch.randn(13, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(129, 301 * scale, generator=g),
        "step_count": torch.full((3,), version, dtype=torch.int64),
        "scalar": torch.tensor(float(version)),
    }


def digest(named_tensors) -> str:
    """sha256 over names and raw bytes: equal digests = bit-identical tensors."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tiny_qwen2(seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


class RecordingEngine:
    """Stands in for the rollout engine: keeps a copy of every tensor it is given."""

    def __init__(self):
        self.version, self.weights, self.modes = None, {}, []

    def update_weights(self, version, named_tensors, mode="keep"):
        self.weights = {n: t.clone() for n, t in named_tensors}
        self.version = version
        self.modes.append(mode)


# ------------------------------------------------------------------ pure layout
def test_layout_offsets_aligned_and_buckets_cover_buffer():
    w = make_weights(0)
    layout = plan_layout(w.items(), bucket_bytes=100_000)
    assert [t.name for t in layout.tensors] == list(w)
    for t, (name, x) in zip(layout.tensors, w.items()):
        assert t.offset % ALIGN == 0 and t.nbytes == x.numel() * x.element_size()
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(layout.tensors, layout.tensors[1:]))
    # buckets are consecutive byte ranges of 100_032 bytes (100_000 rounded up to 64) covering everything
    assert layout.buckets[0] == (0, 100_032)
    assert all(a[1] == b[0] for a, b in zip(layout.buckets, layout.buckets[1:]))
    assert layout.buckets[-1][1] == layout.total_bytes and len(layout.buckets) == -(-layout.total_bytes // 100_032)
    flat = layout.new_buffer()
    for (_, dst), x in zip(layout.views(flat), w.values()):
        dst.copy_(x)
    assert all(torch.equal(v, w[n]) for n, v in layout.views(flat))


def test_header_json_round_trip():
    layout = plan_layout(make_weights(0).items(), bucket_bytes=100_000)  # float32, bfloat16, int64, a 0-d scalar
    header = UpdateHeader(seq=3, version=7, layout=layout, total_bytes=layout.total_bytes, sent_at=time.time())
    back = UpdateHeader.from_json(header.to_json())
    assert back == header  # shapes and buckets come back as tuples, not lists
    assert all(type(t.shape) is tuple for t in back.layout.tensors) and type(back.layout.buckets[0]) is tuple
    assert back.layout.signature() == layout.signature()


def _header_dict() -> dict:
    w = {"w": torch.zeros(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}
    layout = plan_layout(w.items(), bucket_bytes=64)
    return json.loads(UpdateHeader(0, 1, layout, layout.total_bytes, 1.5).to_json())


def _set(path, value):
    def edit(h):
        *parents, last = path
        for key in parents:
            h = h[key]
        h[last] = value
    return edit


@pytest.mark.parametrize("entry,match", [
    (b"\x80\x04\x95", "not valid JSON"),  # a pickle's first bytes: not even UTF-8
    (b"{'seq': 0}", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),  # nesting deep enough to exhaust the parser's recursion
    (b"[]", "must be an object with fields"),
    (_set(("layout",), None), "layout must be an object"),
    (lambda h: h.pop("sent_at"), "must be an object with fields"),
    (_set(("extra",), 1), "must be an object with fields"),
    (_set(("seq",), True), "seq must be a non-negative integer"),
    (_set(("seq",), -1), "seq must be a non-negative integer"),
    (_set(("version",), "1"), "version must be an integer"),
    (_set(("sent_at",), "now"), "sent_at must be a finite number"),
    (_set(("total_bytes",), 1.0), "total_bytes must be a non-negative integer"),
    (_set(("layout", "total_bytes"), 64), "layout total_bytes"),
    (_set(("layout", "tensors"), {}), "layout tensors must be a list"),
    (_set(("layout", "tensors", 0), ["w", [2, 3], "float32", 0]), "tensor entry must be a list of 5"),
    (_set(("layout", "tensors", 0, 0), 7), "tensor name must be a string"),
    (_set(("layout", "tensors", 0, 1), "2x3"), "the shape of 'w' must be a list"),
    (_set(("layout", "tensors", 0, 1), [2, -3]), "a dimension of 'w'"),
    (_set(("layout", "tensors", 0, 2), "nn"), "no torch dtype 'nn'"),  # an attribute of torch, not a dtype
    (_set(("layout", "tensors", 0, 3), -64), "offset of 'w'"),
    (_set(("layout", "tensors", 0, 4), 25), "does not match its shape"),
    (_set(("layout", "tensors", 1, 3), 10**6), "outside the 128-byte buffer"),
    (_set(("layout", "buckets", 0), [0, 10**6]), "outside the 128-byte buffer"),
    (_set(("layout", "buckets", 0), [0]), "a bucket must be a list of 2"),
])
def test_malformed_header_raises_value_error(entry, match):
    if callable(entry):
        h = _header_dict()
        entry(h)
        entry = json.dumps(h).encode()
    with pytest.raises(ValueError, match=match):
        UpdateHeader.from_json(entry)


def test_receiver_refuses_store_entries_that_are_not_json_and_never_unpickles(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(RunsCode(marker))
    sender = DistSender(num_receivers=1, timeout_s=TIMEOUT_S)
    sender.ctl.set("update/0", payload)  # what anyone reaching the store's port could write
    receiver = WeightReceiver(DistReceiver(sender.address, 1, 1, timeout_s=TIMEOUT_S))
    sender.connect()  # the receiver's thread joins the group, then reads the entry
    with pytest.raises(RuntimeError, match="weight receiver failed: update header is not valid JSON") as info:
        receiver.wait_for(1, timeout=TIMEOUT_S)
    assert isinstance(info.value.__cause__, ValueError)
    receiver.close()
    sender.ctl.set("meta", payload)
    with pytest.raises(ValueError, match="meta is not valid JSON"):
        DistReceiver(sender.address, 1, 1, timeout_s=TIMEOUT_S)
    sender.ctl.set("meta", b'{"backend": "gloo", "world_size": 2, "more": 1}')
    with pytest.raises(ValueError, match="meta must be an object with fields"):
        DistReceiver(sender.address, 1, 1, timeout_s=TIMEOUT_S)
    sender.close()
    assert not marker.exists()
    pickle.loads(payload)  # the payload was live: unpickling it does run code
    assert marker.exists()


# ------------------------------------------------------------------ one process, receivers on threads
def local_dist(num_receivers: int = 1) -> tuple[DistSender, list[DistReceiver]]:
    """A real sender and receivers on 127.0.0.1 in this process: the WeightPublisher's and each
    WeightReceiver's background thread join the gloo group as their own rank."""
    sender = DistSender(num_receivers=num_receivers, timeout_s=TIMEOUT_S)
    return sender, [DistReceiver(sender.address, r, num_receivers, timeout_s=TIMEOUT_S)
                    for r in range(1, num_receivers + 1)]


class GatedSender(SenderTransport):
    """Wraps a sender; start_update blocks until the test opens the gate (a slow wire, made deterministic)."""

    def __init__(self, inner):
        self.inner, self.gate, self.started = inner, threading.Event(), threading.Event()

    @property
    def control_messages(self):
        return self.inner.control_messages

    def connect(self):
        self.inner.connect()

    def start_update(self, header):
        self.started.set()
        assert self.gate.wait(TIMEOUT_S)
        self.inner.start_update(header)

    def send_bucket(self, b):
        self.inner.send_bucket(b)

    def finish_update(self, h):
        self.inner.finish_update(h)

    def close(self):
        self.inner.close()


def test_a_long_run_keeps_bounded_update_records_and_counts_every_update():
    # one record per training step kept for ever was a leak: ~0.6 KB per step in trainer0, ~13 MB an hour here
    dist_sender, (dist_receiver,) = local_dist()
    receiver = WeightReceiver(dist_receiver)
    pub = WeightPublisher(dist_sender, bucket_mb=0.1)
    total, weights = HISTORY_LEN + 20, make_weights(1)
    try:
        for v in range(1, total + 1):
            pub.publish(v, weights)
            pub.wait(TIMEOUT_S)  # one at a time: none coalesced
        assert pub.updates_sent == pub.stats["weights/updates_sent"] == total
        assert [s.version for s in pub.history] == list(range(total - HISTORY_LEN + 1, total + 1))
        pause = apply(receiver.wait_for(total, timeout=TIMEOUT_S), RecordingEngine())
        assert receiver.stats["weights/received"] == total and receiver.stats["weights/applied_version"] == total
        assert receiver.stats["weights/pause_s"] == pause and receiver.stats["weights/recv_s"] >= 0
    finally:
        pub.close()
        receiver.close()


def test_coalescing_latest_version_wins_and_publish_never_waits():
    dist_sender, (dist_receiver,) = local_dist()
    receiver = WeightReceiver(dist_receiver)
    sender = GatedSender(dist_sender)
    pub = WeightPublisher(sender, bucket_mb=0.1)
    pub.publish(1, make_weights(1))
    assert sender.started.wait(TIMEOUT_S)  # v1 is now "on the wire" and stuck there
    t0 = time.perf_counter()
    for v in range(2, 7):
        pub.publish(v, make_weights(v))  # v2..v5 are replaced by v6 before they start
    assert time.perf_counter() - t0 < 1.0  # never waited for the stuck transfer
    with pytest.raises(ValueError):
        pub.publish(5, make_weights(5))  # versions never go back
    pub.publish(6, make_weights(7))  # an in-step update: the same label, newer weights; the latest still wins
    sender.gate.set()
    pub.wait(TIMEOUT_S)
    assert [s.version for s in pub.history] == [1, 6]
    assert [s.coalesced for s in pub.history] == [0, 5] and pub.coalesced_total == 5
    assert sender.control_messages == 2  # one per update sent
    update = receiver.wait_for(6, timeout=TIMEOUT_S)
    engine = RecordingEngine()
    pause = apply(update, engine, mode="recompute")
    assert engine.version == 6 and engine.modes == ["recompute"] and pause >= 0
    assert all(torch.equal(engine.weights[n], t) for n, t in make_weights(7).items())
    assert receiver.stats["weights/applied_version"] == 6 and receiver.stats["weights/pause_s"] == pause
    pub.close()
    receiver.close()


def test_receiver_keeps_only_newest_unpolled_and_wait_for_semantics():
    sender, (dist_receiver,) = local_dist()
    receiver = WeightReceiver(dist_receiver)
    pub = WeightPublisher(sender, bucket_mb=0.05)
    for v in (1, 2, 3):
        pub.publish(v, make_weights(v))
        pub.wait(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while receiver.received < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert receiver.received == 3 and receiver.dropped == 2  # nobody polled v1, v2
    held = receiver.poll()
    assert held.version == 3 and receiver.poll() is None
    assert receiver.wait_for(2, timeout=1) is None  # already handed out: nothing new to apply
    with pytest.raises(TimeoutError):
        receiver.wait_for(4, timeout=0.05)
    assert all(torch.equal(t, make_weights(3)[n]) for n, t in held.named_tensors())
    pub.close()
    with pytest.raises(ConnectionError):
        receiver.wait_for(4, timeout=TIMEOUT_S)  # publisher closed: a clear error, not a hang
    assert receiver.peer_closed
    receiver.close()


def test_update_applies_to_the_rollout_engine():
    from areal.rollout import Engine, SamplingParams

    trainer_model, engine = tiny_qwen2(seed=1), Engine(tiny_qwen2(seed=2), num_blocks=16, block_size=4, seed=0)
    sender, (dist_receiver,) = local_dist()
    receiver = WeightReceiver(dist_receiver)
    pub = WeightPublisher(sender)
    pub.publish(1, ((n, p.detach()) for n, p in trainer_model.named_parameters()))
    apply(receiver.wait_for(1, timeout=TIMEOUT_S), engine)
    assert engine.version == 1
    engine_params = dict(engine.runner.model.named_parameters())
    assert all(torch.equal(engine_params[n], p) for n, p in trainer_model.named_parameters())
    out = engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    assert out[0].versions == [1, 1, 1]
    pub.close()
    receiver.close()


# ------------------------------------------------------------------ real processes
def _receiver_proc(address, rank, k, scenario, arg, results):
    torch.set_num_threads(1)
    out = {"rank": rank, "applied": [], "exact": [], "pauses": []}
    try:
        receiver = WeightReceiver(DistReceiver(address, rank, k, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S * 2))
        engine = RecordingEngine()
        if scenario == "sync":  # η=0: wait for each version, apply, acknowledge
            for v in range(1, arg + 1):
                update = receiver.wait_for(v, timeout=TIMEOUT_S)
                out["pauses"].append(apply(update, engine))
                out["applied"].append(engine.version)
                out["exact"].append(all(torch.equal(engine.weights[n], t) for n, t in make_weights(v).items()))
                results.put(("ack", rank, v))
            # then version arg+1 carries a tiny Qwen2 (a new layout). Rank 1 loads it into a differently
            # initialised model through named_tensors and returns its logits; rank 2 (sparing this 2-core
            # box a second transformers import) returns a digest of what it received.
            model = tiny_qwen2(seed=123) if rank == 1 else None
            update = receiver.wait_for(arg + 1, timeout=TIMEOUT_S)
            out["digest"] = digest(update.named_tensors())
            if model is not None:
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for n, t in update.named_tensors():
                        params[n].copy_(t)
                    out["logits"] = model(torch.tensor([[5, 9, 2, 33, 7]])).logits.numpy()  # plain bytes, no shm
            update.release()
        elif scenario == "stream":  # poll between "engine steps"; rank 2 is slow to poll
            step_s = 0.25 if rank == 2 else 0.002
            deadline = time.monotonic() + TIMEOUT_S
            while engine.version != arg and time.monotonic() < deadline:
                update = receiver.poll()
                if update is not None:
                    apply(update, engine)
                    out["applied"].append(engine.version)
                    out["exact"].append(all(torch.equal(engine.weights[n], t)
                                            for n, t in make_weights(engine.version, 16).items()))
                time.sleep(step_s)
        elif scenario == "hold":  # take the first update, then die without a word
            receiver.wait_for(1, timeout=TIMEOUT_S)
            results.put(("ack", rank, 1))
            time.sleep(60)
        out["control_messages"] = receiver.transport.control_messages
        out["stats"] = receiver.stats
        receiver.close()
    except BaseException as exc:  # report, do not hang the parent
        out["error"] = repr(exc)
    results.put(("done", rank, out))


def _pool_worker(tasks, results):
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        _receiver_proc(*task, results)


class ReceiverPool:
    """Two long-lived spawned receiver processes shared by the multi-process tests: starting a process
    (importing torch) costs seconds on this box, running one more scenario in it costs nothing."""

    def __init__(self, k: int = 2):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(k)]
        self.procs = [ctx.Process(target=_pool_worker, args=(q, self.results), daemon=True) for q in self.tasks]
        for p in self.procs:
            p.start()

    def run(self, sender, scenario, arg):  # receivers: transfer timeout TIMEOUT_S, joining 2x that
        while not self.results.empty():  # leftovers of a failed earlier test
            self.results.get_nowait()
        k = len(self.procs)
        for rank, q in enumerate(self.tasks, start=1):
            q.put((sender.address, rank, k, scenario, arg))
        return self.procs, self.results

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def pool():
    pool = ReceiverPool(2)
    yield pool
    pool.close()


def _collect(procs, results, kind="done", n=None):
    got = {}
    for _ in range(n or len(procs)):
        msg = results.get(timeout=TIMEOUT_S * 2)
        assert msg[0] == kind, msg
        got[msg[1]] = msg[2]
    return got


def test_two_processes_receive_bit_identical_versions_in_order_then_a_model(pool):
    sender = DistSender(num_receivers=2, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S * 2)
    procs, results = pool.run(sender, "sync", 4)
    pub = WeightPublisher(sender, bucket_mb=0.02)  # ~0.2 MB -> 10 buckets
    try:
        for v in range(1, 5):
            pub.publish(v, make_weights(v))
            acks = [results.get(timeout=TIMEOUT_S * 2) for _ in range(2)]  # both applied v: synchronous RL
            assert sorted(a[1] for a in acks) == [1, 2] and all(a[2] == v for a in acks), acks
        trainer_model = tiny_qwen2(seed=7)
        pub.publish(5, ((n, p.detach()) for n, p in trainer_model.named_parameters()))
    finally:
        pub.close()
    done = _collect(procs, results)
    for rank, out in done.items():
        assert "error" not in out, out
        assert out["applied"] == [1, 2, 3, 4] and all(out["exact"])
        assert out["control_messages"] == 5
        assert len(out["pauses"]) == 4 and out["stats"]["weights/received"] == 5
    assert sender.control_messages == 5  # one control message per update, not per tensor/bucket
    assert [s.version for s in pub.history] == [1, 2, 3, 4, 5] and [s.seq for s in pub.history] == [0, 1, 2, 3, 4]
    first = pub.history[0]
    assert first.bytes == plan_layout(make_weights(1).items(), 1).total_bytes
    assert first.buckets == -(-first.bytes // 20992) == 10  # 0.02 MiB = 20971.52 -> 20992 bytes (64-aligned)
    assert first.transfer_s > 0 and first.snapshot_s > 0
    assert pub.stats["weights/coalesced"] == 0
    # model round trip: the receivers' differently initialised Qwen2 now computes the trainer's logits
    with torch.no_grad():
        x = torch.tensor([[5, 9, 2, 33, 7]])
        expected = trainer_model(x).logits
        assert not torch.equal(tiny_qwen2(seed=123)(x).logits, expected)
    assert torch.equal(torch.from_numpy(done[1]["logits"]), expected)
    trainer_digest = digest((n, p.detach()) for n, p in trainer_model.named_parameters())
    assert done[1]["digest"] == done[2]["digest"] == trainer_digest


def test_slow_receiver_never_blocks_publish_and_latest_version_wins(pool):
    sender = DistSender(num_receivers=2, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S * 2)
    procs, results = pool.run(sender, "stream", 20)
    pub = WeightPublisher(sender, bucket_mb=1)  # ~3.2 MB per version, 4 buckets
    burst = {v: make_weights(v, scale=16) for v in range(11, 21)}
    publish_s = []
    try:
        pub.wait_connected(TIMEOUT_S * 2)
        for v in range(1, 11):  # paced: one version per ~"training step"
            weights = make_weights(v, scale=16)
            t0 = time.perf_counter()
            pub.publish(v, weights)
            publish_s.append(time.perf_counter() - t0)
            time.sleep(0.02)
        for v in range(11, 21):  # a burst: faster than the wire (a transfer takes ~10 ms here)
            t0 = time.perf_counter()
            pub.publish(v, burst[v])
            publish_s.append(time.perf_counter() - t0)
        pub.wait(TIMEOUT_S)
        done = _collect(procs, results)
    finally:
        pub.close()
    # publish() only copies: it never waits for the wire or for rank 2, which polls every 0.25 s
    assert max(publish_s) < 0.05, publish_s
    assert sorted(publish_s)[len(publish_s) // 2] < 0.01, publish_s  # a 3 MB memcpy, typically ~1 ms
    sent = [s.version for s in pub.history]
    assert sent == sorted(sent) and sent[-1] == 20
    assert pub.coalesced_total > 0 and len(sent) + pub.coalesced_total == 20  # burst versions were skipped
    assert sum(s.coalesced for s in pub.history) == pub.coalesced_total
    for rank, out in done.items():
        assert "error" not in out, out
        assert out["applied"][-1] == 20 and out["applied"] == sorted(out["applied"]) and all(out["exact"])
        assert out["control_messages"] == len(sent) == out["stats"]["weights/received"]
    # the slow poller applied fewer versions: complete updates it had not polled yet were superseded
    assert done[2]["stats"]["weights/dropped"] > 0
    assert len(done[2]["applied"]) < len(done[1]["applied"])


def test_dead_receiver_surfaces_an_error_instead_of_hanging(pool):
    # the last test to use the pool: it kills one of its processes (the fixture reaps the rest)
    sender = DistSender(num_receivers=2, timeout_s=5, connect_timeout_s=TIMEOUT_S * 2)
    procs, results = pool.run(sender, "hold", None)
    pub = WeightPublisher(sender, bucket_mb=0.1, reform_wait_s=0.0)  # nobody re-forms the group here
    try:
        pub.publish(1, make_weights(1))
        _collect(procs, results, kind="ack", n=2)
        procs[1].kill()
        procs[1].join(10)
        pub.publish(2, make_weights(2))
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="weight publisher failed"):
            pub.wait(TIMEOUT_S)
        assert time.perf_counter() - t0 < 10
        with pytest.raises(RuntimeError):
            pub.publish(3, make_weights(3))
    finally:
        pub.close()


def _publisher_proc(results):
    torch.set_num_threads(1)
    sender = DistSender(num_receivers=1, timeout_s=5, connect_timeout_s=TIMEOUT_S * 2)
    results.put(sender.address)
    pub = WeightPublisher(sender)
    pub.publish(1, make_weights(1))
    pub.wait(TIMEOUT_S)
    results.put("sent")
    time.sleep(60)  # then gets killed


def test_dead_publisher_surfaces_an_error_on_the_receiver():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_publisher_proc, args=(results,), daemon=True)
    proc.start()
    receiver = None
    try:
        address = results.get(timeout=TIMEOUT_S * 2)
        receiver = WeightReceiver(DistReceiver(address, 1, 1, timeout_s=5, connect_timeout_s=TIMEOUT_S * 2))
        assert receiver.wait_for(1, timeout=TIMEOUT_S * 2).version == 1
        assert results.get(timeout=TIMEOUT_S) == "sent"
        proc.kill()
        proc.join(10)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="unreachable"):
            receiver.wait_for(2, timeout=TIMEOUT_S)
        assert time.perf_counter() - t0 < 10
    finally:
        proc.kill()
        if receiver is not None:
            receiver.close()


def test_receiver_that_never_joins_times_out():
    # connect timeout = timeout_s; nobody re-forms the group here, so the failure is final at once
    pub = WeightPublisher(DistSender(num_receivers=1, timeout_s=1.5), reform_wait_s=0.0)
    pub.publish(1, make_weights(1))
    with pytest.raises(RuntimeError, match="weight publisher failed"):
        pub.wait(TIMEOUT_S)
    pub.close()


class CountingStore:
    """Wraps a store and counts the requests made through it."""

    def __init__(self, inner):
        self.inner, self.requests = inner, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.requests += 1
            return attr(*args, **kwargs)
        return counted


def test_an_idle_receiver_blocks_on_the_store_instead_of_polling_it_and_wakes_at_once():
    # every poll of the sender's store wakes the trainer's process: on shared cores it paid for each one
    sender, (receiver,) = local_dist()
    receiver.ctl = CountingStore(receiver.ctl)
    layout = plan_layout([("w", torch.zeros(4))], 1 << 20)
    header = UpdateHeader(0, 1, layout, layout.total_bytes, time.time())
    threading.Timer(1.0, sender.start_update, (header,)).start()
    t0 = time.perf_counter()
    got = receiver.recv_start(timeout_s=TIMEOUT_S)
    waited = time.perf_counter() - t0
    assert got is not None and got.seq == 0 and got.version == 1
    assert 0.9 < waited < 1.5  # woken by the write itself
    assert receiver.ctl.requests <= 3  # one wait and one read: no polling through the idle second
    assert receiver.recv_start(timeout_s=0.2) is None  # nothing new: a timeout is None, not an error
    threading.Timer(0.5, sender.close).start()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="closed"):  # PeerClosed, as soon as the sender closes
        receiver.recv_start(timeout_s=TIMEOUT_S)
    assert time.perf_counter() - t0 < 1.5
    receiver.close()
