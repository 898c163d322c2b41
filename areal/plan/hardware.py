"""Device profiles: what one accelerator (or this machine's cores) achieves, per phase.

A profile holds *achieved* rates, so a GPU's datasheet numbers pass through stated efficiencies,
the same for every GPU and every planned case (no per-case fitting):

    train_flops_s  = peak_bf16_dense · TRAIN_MFU          (TRAIN_MFU = 0.35)
    infer_flops_s  = peak_bf16_dense · INFER_MFU          (INFER_MFU = 0.5: prefill, compute-bound decode)
    decode_bytes_s = HBM bandwidth   · BW_EFFICIENCY      (BW_EFFICIENCY = 0.6: weights + KV reads)
    decode_step_s  = DECODE_STEP_S   = 4 ms fixed cost per decode step (scheduling, sampling, launch);
                     it dominates the long tail, when a few sequences are left
    train_update_s = TRAIN_UPDATE_S  = 1 s per optimizer update (optimizer step, sharding collectives)

Datasheet figures (SXM parts, bf16 dense, per GPU; bandwidths in bytes/s, one direction):

    GPU    peak FLOP/s  HBM       memory  NVLink    network (per GPU)
    H100   989e12       3.35e12   80 GB   450e9     50e9 (400 Gb/s InfiniBand)
    H800   989e12       3.35e12   80 GB   200e9     50e9 (400 Gb/s)
    A100   312e12       2.04e12   80 GB   300e9     25e9 (200 Gb/s)
    H200   989e12       4.8e12    141 GB  450e9     50e9 (400 Gb/s)

`--profile` (areal/plan/profile.py) measures the same fields on this machine ("here"); there one
device is one CPU core, and per-sequence / per-token overheads that a GPU hides are measured too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from areal.config import ConfigError

TRAIN_MFU = 0.35
INFER_MFU = 0.5
BW_EFFICIENCY = 0.6
DECODE_STEP_S = 4e-3
TRAIN_UPDATE_S = 1.0
WEIGHT_SYNC_LATENCY_S = 0.5  # gather + handshake before the broadcast

HERE_PROFILE = Path(__file__).with_name("data") / "here.json"


@dataclass(frozen=True)
class Hardware:
    name: str
    train_flops_s: float  # achieved training FLOP/s per device
    infer_flops_s: float  # achieved prefill / compute-bound decode FLOP/s per device
    decode_bytes_s: float  # achieved memory bandwidth while decoding, bytes/s per device
    intra_bw: float  # bytes/s per device inside a node
    inter_bw: float  # bytes/s per device between nodes
    mem_bytes: float  # memory per device
    devices_per_node: int
    dtype_bytes: int = 2
    decode_step_s: float = DECODE_STEP_S  # fixed cost of one decode step of a server
    decode_seq_s: float = 0.0  # per running sequence per decode step (host-side work)
    decode_kv_token_s: float = 0.0  # per KV-cache token per decode step, beyond the bytes roofline (host: paged reads)
    train_update_s: float = TRAIN_UPDATE_S  # fixed cost of one optimizer update
    train_token_s: float = 0.0  # per token and forward pass (costs.token_passes), beyond its FLOPs (host-side work)
    train_seq_s: float = 0.0  # per trained sequence (host-side work: packing, per-sequence attention)
    reward_s_per_sample: float = 0.0  # reward on the rollout device's host (0: separate CPUs)
    sequence_s: float = 0.0  # per generated sequence, once (host-side: admission, prefill bookkeeping, finishing)
    # the async trainer's step, wall time over its thread's CPU time (> 1 where rollout shares the trainer's
    # host: its main thread is preempted by the run's other threads and processes); measured by the loop
    # calibration, 1 on GPU clusters
    async_train_factor: float = 1.0
    # host-side work of areal's loops per group consumed (messages, buffer, batch building, publishing), on the
    # trainer's path: a step's time outside the phases its loop times; 0 on GPU clusters, where it is
    # negligible next to steps of minutes
    async_group_s: float = 0.0
    sync_group_s: float = 0.0
    weight_sync_latency_s: float = WEIGHT_SYNC_LATENCY_S
    kv_memory_fraction: float = 0.85  # of memory usable for weights + KV cache
    cores: int = 0  # > 0: devices are CPU cores that every process of a run shares (here)
    probe_s: float = 0.0  # here: seconds of profile.speed_probe() while profiled (how fast the host ran then)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def gpu(name: str, peak_flops: float, hbm_bw: float, mem_gb: float, nvlink: float, network: float) -> Hardware:
    """A datasheet GPU through the stated efficiencies (module docstring)."""
    return Hardware(name, peak_flops * TRAIN_MFU, peak_flops * INFER_MFU, hbm_bw * BW_EFFICIENCY, nvlink, network,
                    mem_gb * 1e9, 8)


GPUS: dict[str, Hardware] = {
    "h100": gpu("h100", 989e12, 3.35e12, 80, 450e9, 50e9),
    "h800": gpu("h800", 989e12, 3.35e12, 80, 200e9, 50e9),
    "a100": gpu("a100", 312e12, 2.039e12, 80, 300e9, 25e9),
    "h200": gpu("h200", 989e12, 4.8e12, 141, 450e9, 50e9),
}


def load_profile(path: str | Path) -> Hardware:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster.gpu: profile {p} not found; make it with `python -m areal.plan --profile`")
    data = json.loads(p.read_text())
    known = {f.name for f in fields(Hardware)}
    return Hardware(**{k: v for k, v in data.items() if k in known})


def get_hardware(name: str) -> Hardware:
    """A built-in GPU, `here` (the stored profile of this machine) or a profile JSON file."""
    key = name.lower()
    if key in GPUS:
        return GPUS[key]
    if key == "here":
        return load_profile(HERE_PROFILE)
    if key.endswith(".json"):
        return load_profile(name)
    raise ConfigError(f"cluster.gpu: unknown device '{name}'; expected one of {sorted(GPUS)}, here, or a profile .json")
