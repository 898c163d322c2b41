"""The checkpoint format: round trips, atomic commit, verification refusals, latest, retention, multi-rank."""

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from areal import faults
from areal.checkpoint import nested, store
from areal.checkpoint.store import CheckpointError


def save(directory: Path, step: int, tensors: dict, state: dict | None = None) -> Path:
    """One single-rank checkpoint, the way the lazy checkpointer writes it."""
    tmp = store.tmp_dir_for(directory, step)
    store.write_shard(tmp, 0, tensors)
    return store.commit(directory, step, state or {"step": step}, "cfg")


def small(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).bfloat16(),
            "n": torch.tensor(7)}


# -- flatten / unflatten and a real model + AdamW round trip -----------------------------------


def test_model_and_adamw_round_trip(tmp_path, tiny_qwen2):
    model = tiny_qwen2.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(input_ids=torch.randint(3, 40, (2, 8)), labels=torch.randint(3, 40, (2, 8))).loss.backward()
        opt.step()
        opt.zero_grad()
    model_t, model_s = nested.flatten_state(model.state_dict(), "model")
    opt_t, opt_s = nested.flatten_state(opt.state_dict(), "optim")
    assert opt_t["optim/state/0/exp_avg"] is opt.state[next(model.parameters())]["exp_avg"]  # live, by path
    path = save(tmp_path, 2, {**model_t, **opt_t}, {"model": model_s, "optim": opt_s})

    ckpt = store.load(path)
    assert ckpt.step == 2 and ckpt.manifest["format"] == store.FORMAT
    model2 = type(model)(model.config)
    model2.load_state_dict(nested.unflatten_state(ckpt.state["model"], ckpt.tensors[0]))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    restored = nested.unflatten_state(ckpt.state["optim"], ckpt.tensors[0])
    assert set(restored["state"]) == set(opt.state_dict()["state"])  # int keys came back as ints
    opt2.load_state_dict(restored)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]  # a tuple stays a tuple


def test_flatten_encodings_round_trip():
    t = torch.arange(3)
    obj = {1: (t, None, "s"), "a": [1.5, True, {(2, "x"): t}], "__tensor__": 3, "size": torch.Size([2, 3])}
    tensors, skel = nested.flatten_state(obj, "p")
    assert tensors["p/1/0"] is t  # no copy
    back = nested.unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert back[1][0] is t and back[1][1:] == (None, "s")
    assert back["a"][:2] == [1.5, True] and back["a"][2][(2, "x")] is t
    assert back["__tensor__"] == 3 and back["size"] == (2, 3)


def test_flatten_refuses_other_objects_naming_the_path():
    with pytest.raises(CheckpointError, match=r"opt/state/0/fn: cannot checkpoint a function"):
        nested.flatten_state({"state": {0: {"fn": lambda: 0}}}, "opt")


def test_config_hash_is_canonical():
    assert store.config_hash({"a": 1, "b": [1, 2]}) == store.config_hash({"b": [1, 2], "a": 1})
    assert store.config_hash({"a": 1}) != store.config_hash({"a": 2})


# -- commit, latest, find_latest -------------------------------------------------------------


def test_commit_layout_and_latest_swap(tmp_path):
    p1 = save(tmp_path, 1, small(1))
    assert sorted(os.listdir(p1)) == ["manifest.json", "rank00000.safetensors", "state.json"]
    assert os.readlink(tmp_path / "latest") == "step_00000001"
    p2 = save(tmp_path, 2, small(2))
    assert os.readlink(tmp_path / "latest") == "step_00000002"
    assert store.load(tmp_path / "latest").step == 2 and store.load(p1).step == 1
    assert not list(tmp_path.glob("*.tmp"))
    assert store.find_latest(tmp_path) == (p2, [])


def test_find_latest_skips_partial_and_manifestless_checkpoints(tmp_path):
    good = save(tmp_path, 1, small())
    # a crash before the commit rename: the .tmp dir with a shard but nothing else
    store.write_shard(store.tmp_dir_for(tmp_path, 3), 0, small())
    # a step dir without a manifest (e.g. copied by hand, half deleted)
    no_manifest = save(tmp_path, 2, small())
    (no_manifest / "manifest.json").unlink()
    best, skipped = store.find_latest(tmp_path)
    assert best == good
    assert [p.name for p, _ in skipped] == ["step_00000003.tmp", "step_00000002"]
    assert "never committed" in skipped[0][1] and "missing manifest" in skipped[1][1]
    assert store.find_latest(tmp_path / "nothing-here") == (None, [])


def test_crash_between_rename_and_latest_swap(tmp_path, monkeypatch):
    save(tmp_path, 1, small())
    monkeypatch.setenv(faults.ENV, "ckpt.rename:raise")
    with pytest.raises(RuntimeError, match="injected fault at ckpt.rename"):
        save(tmp_path, 2, small(2))
    assert os.readlink(tmp_path / "latest") == "step_00000001"  # the hint lags behind
    assert store.find_latest(tmp_path)[0].name == "step_00000002"  # verification decides


def test_injected_enospc_on_write(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "ckpt.write@2:enospc")  # the 1st write is the shard, the 2nd its entry
    with pytest.raises(OSError) as e:
        save(tmp_path, 1, small())
    assert e.value.errno == errno.ENOSPC and "ckpt.write" in str(e.value)
    assert store.find_latest(tmp_path)[0] is None


def test_fault_spec_parsing():
    assert faults.parse("a@2:eio, b") == {"a": {2: "eio"}, "b": {1: "kill"}}
    with pytest.raises(ValueError, match="bad spec"):
        faults.parse("a:explode")


# -- verification refusals -------------------------------------------------------------------


def test_flipped_byte_in_shard_is_refused(tmp_path):
    path = save(tmp_path, 1, small())
    shard = path / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank00000\.safetensors: crc32 mismatch"):
        store.load(path)
    best, skipped = store.find_latest(tmp_path)
    assert best is None and "crc32 mismatch" in skipped[0][1]


def test_tensor_crc_mismatch_is_refused(tmp_path):
    path = save(tmp_path, 1, small())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["rank00000.safetensors"]["w"]["crc32"] ^= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rank00000\.safetensors: tensor 'w' crc32 mismatch"):
        store.load(path)


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "manifest.json").write_bytes((p / "manifest.json").read_bytes()[:40]),
     r"manifest\.json: truncated or invalid manifest"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({"format": "other/9"})),
     r"manifest\.json: format 'other/9'"),
    (lambda p: (p / "rank00000.safetensors").unlink(), r"rank00000\.safetensors: missing"),
    (lambda p: (p / "state.json").write_text("{}"), r"state\.json: 2 bytes, manifest says"),
    (lambda p: (p / "notes.txt").write_text("hi"), r"notes\.txt: unexpected file$"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = save(tmp_path, 1, small())
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        store.load(path)


def test_pickle_files_are_refused(tmp_path):
    path = save(tmp_path, 1, small())
    torch.save(small(), path / "extra.pt")  # zip
    with pytest.raises(CheckpointError, match=r"extra\.pt: unexpected file \(a zip archive \(torch\.save"):
        store.load(path)
    (path / "extra.pt").unlink()
    torch.save(small(), path / "rank00000.safetensors")  # replacing the shard
    with pytest.raises(CheckpointError, match=r"rank00000\.safetensors: refused, a zip archive"):
        store.load(path)
    torch.save(small(), path / "rank00000.safetensors", _use_new_zipfile_serialization=False)  # raw pickle
    with pytest.raises(CheckpointError, match=r"rank00000\.safetensors: refused, not a safetensors file"):
        store.load(path)
    (path / "x.pkl").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"x\.pkl: unexpected file \(pickle data"):
        store.load(path)


# -- retention -----------------------------------------------------------------------------


def test_prune_keeps_newest_and_never_latest(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, small(step))
    store.tmp_dir_for(tmp_path, 3)  # stale: older than the newest complete one
    store.tmp_dir_for(tmp_path, 9)  # maybe another rank's write in progress: kept
    (tmp_path / "latest").unlink()
    os.symlink("step_00000002", tmp_path / "latest")  # e.g. resumed from step 2
    store.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000002", "step_00000004", "step_00000005", "step_00000009.tmp"]
    with pytest.raises(ValueError):
        store.prune(tmp_path, keep_last=0)


# -- several ranks -----------------------------------------------------------------------------


def test_two_rank_commit(tmp_path):
    tmp = store.tmp_dir_for(tmp_path, 4)
    result = {}
    # rank 0 waits in commit() until rank 1 (a thread here) has written its shard
    rank0 = threading.Thread(target=lambda: result.update(path=store.commit(tmp_path, 4, {"a": 1}, "h", 2, 10)))
    store.write_shard(tmp, 0, small(0))
    rank0.start()
    store.write_shard(store.tmp_dir_for(tmp_path, 4, fresh=False), 1, small(1))
    rank0.join()
    ckpt = store.load(result["path"])
    assert ckpt.manifest["world_size"] == 2 and sorted(ckpt.tensors) == [0, 1]
    assert torch.equal(ckpt.tensors[1]["w"], small(1)["w"])
    assert sorted(os.listdir(result["path"])) == [
        "manifest.json", "rank00000.safetensors", "rank00001.safetensors", "state.json"]
    assert list(store.load(result["path"], ranks=[1]).tensors) == [1]


def test_rendezvous_timeout_and_failed_rank(tmp_path):
    tmp = store.tmp_dir_for(tmp_path, 4)
    store.write_shard(tmp, 0, small())
    with pytest.raises(CheckpointError, match=r"step_00000004\.tmp: rank\(s\) \[1\] wrote no shard within 0\.1 s"):
        store.commit(tmp_path, 4, {}, "h", world_size=2, wait_ranks_s=0.1)
    store.mark_failed(tmp, 1, "OSError: disk full")
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] failed"):
        store.commit(tmp_path, 4, {}, "h", world_size=2, wait_ranks_s=10)
    assert store.find_latest(tmp_path)[0] is None
