"""The lazy checkpointer with real files and threads: a snapshot taken at save() survives the trainer's next
update, the trainer blocks only for an unfinished copy, one checkpoint in flight, failures leave the previous
checkpoint intact and training going."""

import concurrent.futures
import subprocess
import threading
import time

import pytest
import torch

from areal import faults
from areal.checkpoint import store
from areal.checkpoint.lazy import LazyCheckpointer


def params(n: int = 4, numel: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(numel, generator=g) for i in range(n)}


def saved_tensors(path) -> dict[str, torch.Tensor]:
    return store.load(path).tensors[0]


def test_save_returns_at_once_and_the_snapshot_survives_the_next_update(tmp_path):
    live = params(n=4, numel=4_000_000)  # 64 MB
    expected = {k: v.clone() for k, v in live.items()}
    ckpt = LazyCheckpointer(tmp_path)
    t0 = time.perf_counter()
    assert ckpt.save(1, live, {"step": 1})
    save_s = time.perf_counter() - t0
    ckpt.before_update()  # the copy is still running: this blocks until it is done
    for t in live.values():  # the trainer's optimizer.step()
        t.add_(1.0)
    ckpt.wait()
    (rec,) = ckpt.records()
    assert rec.ok and rec.step == 1 and rec.error is None
    assert save_s < rec.snapshot_s / 2, (save_s, rec.snapshot_s)
    assert rec.blocked_s > 0 and rec.persist_s > 0
    assert rec.bytes == sum(f.stat().st_size for f in (tmp_path / "step_00000001").iterdir()) > 64e6
    got = saved_tensors(rec.path)
    assert all(torch.equal(got[k], expected[k]) for k in live)
    assert store.load(rec.path).state == {"step": 1}


def test_host_buffers_are_reused(tmp_path):
    live = params()
    ckpt = LazyCheckpointer(tmp_path, keep_last=1)
    ckpt.save(1, live, {})
    ckpt.wait()
    ptrs = {k: b.data_ptr() for k, b in ckpt._views.items()}
    live["p0"].mul_(2)
    ckpt.save(2, live, {})
    ckpt.wait()
    assert {k: b.data_ptr() for k, b in ckpt._views.items()} == ptrs
    assert torch.equal(saved_tensors(tmp_path / "step_00000002")["p0"], live["p0"])
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000002"]  # keep_last=1
    assert all(r.ok for r in ckpt.records())


def test_on_busy_skip_counts_and_extras_are_merged(tmp_path):
    ckpt = LazyCheckpointer(tmp_path)
    rollout_state = concurrent.futures.Future()  # e.g. the rollout workers' in-flight state
    assert ckpt.save(1, params(), {"step": 1}, extras=[rollout_state])
    ckpt.before_update()
    assert ckpt.busy and not ckpt.save(2, params(), {"step": 2})  # step 1 is still being persisted
    assert ckpt.skipped == 1
    rollout_state.set_result({"rollout": [1, 2]})
    ckpt.wait()
    assert [r.step for r in ckpt.records()] == [1]
    assert store.load(tmp_path / "latest").state == {"step": 1, "rollout": [1, 2]}


def test_on_busy_wait_blocks_until_the_previous_one_is_done(tmp_path):
    ckpt = LazyCheckpointer(tmp_path, on_busy="wait")
    gate = concurrent.futures.Future()
    ckpt.save(1, params(), {}, extras=[gate])
    second = threading.Thread(target=ckpt.save, args=(2, params(), {}))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for step 1
    gate.set_result({})
    second.join()
    ckpt.wait()
    recs = ckpt.records()
    assert [r.step for r in recs] == [1, 2] and recs[1].blocked_s > 0 and ckpt.skipped == 0


@pytest.mark.parametrize("spec", ["ckpt.write:enospc", "ckpt.copy:eio", "ckpt.persist:raise"])
def test_injected_failure_keeps_the_previous_checkpoint_and_training_going(tmp_path, monkeypatch, spec):
    ckpt = LazyCheckpointer(tmp_path)
    ckpt.save(1, params(seed=1), {})
    ckpt.wait()
    monkeypatch.setenv(faults.ENV, spec)
    assert ckpt.save(2, params(seed=2), {})  # returns normally
    ckpt.before_update()
    ckpt.wait()
    ok, failed = ckpt.records()
    assert ok.ok and not failed.ok and failed.path is None and ckpt.failures == 1
    assert spec.split(":")[0] in failed.error
    assert store.find_latest(tmp_path) == (tmp_path / "step_00000001", [])  # the tmp dir is gone
    assert torch.equal(saved_tensors(tmp_path / "latest")["p0"], params(seed=1)["p0"])
    ckpt.save(3, params(seed=3), {})  # a spec fires once
    ckpt.wait()
    assert ckpt.records()[0].ok and store.find_latest(tmp_path)[0].name == "step_00000003"


def test_wait_true_raises_when_the_checkpoint_failed(tmp_path, monkeypatch):
    ckpt = LazyCheckpointer(tmp_path)
    monkeypatch.setenv(faults.ENV, "ckpt.write:eio")
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.save(1, params(), {}, wait=True)
    assert ckpt.save(2, params(), {}, wait=True) and (tmp_path / "step_00000002").is_dir()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 256k tmpfs for a real ENOSPC: {mounted.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_real_enospc(small_disk):
    ckpt = LazyCheckpointer(small_disk)
    ckpt.save(1, params(n=1, numel=8_000), {})  # 32 kB fits
    ckpt.wait()
    ckpt.save(2, params(n=1, numel=100_000), {})  # 400 kB does not
    ckpt.wait()
    ok, failed = ckpt.records()
    assert ok.ok and not failed.ok and ckpt.failures == 1
    assert failed.error.startswith("OSError: [Errno 28]"), failed.error
    assert store.find_latest(small_disk)[0].name == "step_00000001"
    assert not list(small_disk.glob("*.tmp"))
    ckpt.save(3, params(n=1, numel=8_000, seed=3), {})
    ckpt.wait()
    assert ckpt.records()[0].ok
    assert torch.equal(saved_tensors(small_disk / "latest")["p0"], params(n=1, numel=8_000, seed=3)["p0"])


def test_two_ranks(tmp_path):
    rank0 = LazyCheckpointer(tmp_path, world_size=2, rank=0)
    rank1 = LazyCheckpointer(tmp_path, world_size=2, rank=1)
    rank0.save(5, params(seed=0), {"step": 5})
    rank1.save(5, params(seed=1), {})
    rank0.wait(), rank1.wait()
    (r0,), (r1,) = rank0.records(), rank1.records()
    assert r0.ok and r1.ok and r1.path is None and r1.bytes > 0
    ckpt = store.load(r0.path)
    assert torch.equal(ckpt.tensors[1]["p2"], params(seed=1)["p2"]) and ckpt.state == {"step": 5}


def test_a_failing_rank_fails_rank_0_at_once(tmp_path, monkeypatch):
    rank0 = LazyCheckpointer(tmp_path, world_size=2, rank=0)
    rank1 = LazyCheckpointer(tmp_path, world_size=2, rank=1)
    monkeypatch.setenv(faults.ENV, "ckpt.copy:eio")
    rank1.save(5, params(seed=1), {})  # the first hit: rank 1 fails before writing anything
    rank1.wait()
    rank0.save(5, params(seed=0), {})
    rank0.wait()  # not the 600 s rendezvous timeout
    (r0,), (r1,) = rank0.records(), rank1.records()
    assert not r1.ok and not r0.ok and "rank(s) [1] failed" in r0.error
    assert store.find_latest(tmp_path) == (None, [])  # rank 0 removed the tmp dir
