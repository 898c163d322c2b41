"""The weight group's backend: NCCL only when every member has a GPU of its own, else gloo.

The rule is a pure function of the members' devices (weight_group_backend); the wiring tests form real
groups on this CPU box with the members' reported GPUs stood in for (`reported`) and the NCCL group built
as gloo (`record_backend`), so they check what each end decides and forms the group with, not NCCL itself.
"""

import threading

import pytest
import torch

import areal.transport as transport
from areal.rollout.weight_receiver import WeightReceiver
from areal.trainer.weight_publisher import WeightPublisher
from areal.transport import DistReceiver, DistSender, MemberDevice, local_member_device, weight_group_backend

TIMEOUT_S = 30.0
GPU_A, GPU_B = "GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"


# ------------------------------------------------------------------ the rule
@pytest.mark.parametrize("gpus, backend", [
    ([GPU_A, GPU_B], "nccl"),  # a GPU each (on one host or two: UUIDs differ across hosts)
    ([GPU_A, GPU_A], "gloo"),  # one GPU for trainer and rollout (or one GPU seen from two containers)
    ([GPU_A, GPU_B, GPU_B], "gloo"),  # 1 trainer + 2 rollout workers on 2 GPUs; fractional Ray GPUs alike
    ([GPU_A, None], "gloo"),  # a member in host memory
    ([None, None], "gloo"),  # CPU run: gloo as always
    ([GPU_A], "nccl"),  # the sender alone (every worker lost)
])
def test_backend_is_nccl_only_when_every_member_has_its_own_gpu(gpus, backend):
    assert weight_group_backend([MemberDevice(g) for g in gpus]) == backend


def test_member_device_json_round_trip_and_checks():
    for member in (MemberDevice(GPU_A), MemberDevice(None)):
        assert MemberDevice.from_json(member.to_json()) == member
    for bad in (b"{", b"[]", b'{"gpu": 0}', b'{"gpu": null, "more": 1}', b"{}"):
        with pytest.raises(ValueError, match="member device"):
            MemberDevice.from_json(bad)


def test_cpu_member_reports_no_gpu():
    assert local_member_device("cpu").gpu is None


# ------------------------------------------------------------------ the wiring, on CPU
@pytest.fixture
def reported(monkeypatch):
    """Each end reports the GPU its `device` names ("cuda:0" -> GPU_A, "cuda:1" -> GPU_B) without CUDA."""
    def fake(device):
        device = torch.device(device)
        return MemberDevice(None if device.type == "cpu" else (GPU_A, GPU_B)[device.index])

    monkeypatch.setattr(transport, "local_member_device", fake)


@pytest.fixture
def record_backend(monkeypatch):
    """Every group is built as gloo (no NCCL here); returns the backends the ends asked for."""
    asked, real = [], transport._make_group

    def make_group(store, rank, world_size, backend, timeout, bind_host):
        asked.append(backend)
        return real(store, rank, world_size, "gloo", timeout, bind_host)

    monkeypatch.setattr(transport, "_make_group", make_group)
    return asked


def form(sender_device: str, receiver_devices: list[str]) -> tuple[DistSender, list[DistReceiver]]:
    """A group formed on threads; returns its ends once every one joined."""
    sender = DistSender(len(receiver_devices), device=sender_device, timeout_s=TIMEOUT_S)
    receivers = [DistReceiver(sender.address, r, len(receiver_devices), device=d, timeout_s=TIMEOUT_S)
                 for r, d in enumerate(receiver_devices, 1)]
    threads = [threading.Thread(target=end.connect) for end in [sender, *receivers]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    return sender, receivers


@pytest.mark.parametrize("devices, backend", [
    (["cuda:0", "cuda:1"], "nccl"),
    (["cuda:0", "cuda:0"], "gloo"),
    (["cuda:0", "cuda:1", "cuda:1"], "gloo"),
    (["cuda:0", "cpu"], "gloo"),
])
def test_every_end_forms_the_group_with_the_backend_the_members_imply(reported, record_backend, devices, backend):
    sender, receivers = form(devices[0], devices[1:])
    try:
        assert [end.backend for end in [sender, *receivers]] == [backend] * len(devices)
        assert sorted(record_backend) == [backend] * len(devices)
        assert sender.members == receivers[0].members == [
            MemberDevice(None if d == "cpu" else (GPU_A, GPU_B)[int(d[-1])]) for d in devices]
    finally:
        for end in [sender, *receivers]:
            end.close()


def test_cpu_group_stays_gloo_without_any_stand_in(record_backend):
    sender, receivers = form("cpu", ["cpu", "cpu"])
    try:
        assert [end.backend for end in [sender, *receivers]] == ["gloo"] * 3
        assert record_backend == ["gloo"] * 3
    finally:
        for end in [sender, *receivers]:
            end.close()


def test_a_re_formed_group_decides_its_backend_anew(reported, record_backend):
    """A worker sharing the trainer's GPU is replaced by one on a GPU of its own: the first group is gloo,
    the re-formed one nccl, and the newest weights reach the new member over it."""
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    first = DistSender(1, device="cuda:0", timeout_s=TIMEOUT_S)
    # buffers in host memory: the members' GPUs are stood in for, the tensors are real
    old = WeightReceiver(DistReceiver(first.address, 1, 1, device="cuda:0", timeout_s=TIMEOUT_S), device="cpu")
    pub = WeightPublisher(first)
    pub.publish(1, weights)
    update = old.wait_for(1, timeout=TIMEOUT_S)
    assert torch.equal(dict(update.named_tensors())["w"], weights["w"])
    update.release()
    assert first.backend == "gloo"

    second = DistSender(1, device="cuda:0", timeout_s=TIMEOUT_S)
    new = WeightReceiver(DistReceiver(second.address, 1, 1, device="cuda:1", timeout_s=TIMEOUT_S), device="cpu")
    old.abandon()
    pub.reform(second)
    update = new.wait_for(1, timeout=TIMEOUT_S)  # the publisher sends the newest version to the new group
    assert torch.equal(dict(update.named_tensors())["w"], weights["w"])
    update.release()
    assert second.backend == new.transport.backend == "nccl"
    assert record_backend == ["gloo", "gloo", "nccl", "nccl"]
    pub.close()
    new.close()
