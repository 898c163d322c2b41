"""The on-disk checkpoint format: atomic commit, verification, retention.

Layout under a checkpoint directory D (e.g. run_dir/ckpt):

    D/step_00000025/            one complete checkpoint
        manifest.json           written last: {"format": "areal-ckpt/1", "step", "config_hash", "world_size",
                                "created", "files": {name: {"bytes", "crc32"}},
                                "tensors": {file: {tensor: {"crc32", "dtype", "shape"}}}}
        state.json              the caller's JSON state
        rank00000.safetensors   tensors of trainer rank 0 (one file per rank)
    D/step_00000025.tmp/        being written; never read
    D/latest -> step_00000025   a hint, swapped atomically; find_latest does not trust it

Commit: every rank writes its shard and a rank{r}.json entry into step_N.tmp (write_shard); rank 0 waits for
all entries (a file rendezvous on the shared filesystem), writes state.json, then manifest.json, fsyncs, and
renames step_N.tmp -> step_N. That rename is the commit point: a crash before it leaves a .tmp dir nothing
reads; after it the checkpoint is complete even if `latest` still names the previous one.

Verification refuses, with a CheckpointError naming the file: a missing, truncated or foreign manifest, a
listed file missing or differing in size or crc32, a tensor differing from its crc32/dtype/shape, and any file
the manifest does not list. Nothing here unpickles: a pickle or zip (torch.save) file is refused by its magic
bytes, never opened.

Nested state (a torch or DeepSpeed optimizer state_dict) becomes shard tensors plus a JSON skeleton through
areal/checkpoint/nested.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from areal import faults

FORMAT = "areal-ckpt/1"
MANIFEST, STATE, LATEST = "manifest.json", "state.json", "latest"
_STEP_DIR = re.compile(r"step_(\d{8,})(\.tmp)?")
_SHARD = re.compile(r"rank(\d{5})\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or holds what the format forbids; the message names the file."""


@dataclass
class Checkpoint:
    step: int
    path: Path
    state: dict
    tensors: dict[int, dict[str, torch.Tensor]]  # rank -> its shard, loaded eagerly (only the ranks asked for)
    manifest: dict


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _entry_path(tmp_dir: Path, rank: int, suffix: str = ".json") -> Path:
    return Path(tmp_dir) / f"rank{rank:05d}{suffix}"


def config_hash(d: dict) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces), first 16 hex digits."""
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- bytes and fsync


def tensor_crc32(t: torch.Tensor) -> int:
    """crc32 of the tensor's bytes in C order (zlib releases the GIL on large buffers)."""
    flat = t.detach().reshape(-1).cpu().contiguous()
    return zlib.crc32(flat.view(torch.uint8).numpy())


def file_crc32(path: Path) -> tuple[int, int]:
    """(size in bytes, crc32) of a file, streamed."""
    crc, size, buf = 0, 0, bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc, size = zlib.crc32(memoryview(buf)[:n], crc), size + n
    return size, crc


def _fsync(path: Path) -> None:  # works for files and directories alike
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    faults.hit("ckpt.write")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- writing and committing


def tmp_dir_for(directory: Path, step: int, fresh: bool = True) -> Path:
    """D/step_N.tmp, created. fresh removes a stale one first: only for rank 0 before any rank writes (other
    ranks of a multi-rank checkpoint pass fresh=False)."""
    tmp = step_dir(directory, step).with_suffix(".tmp")
    if fresh and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_CHUNK = 1 << 24  # 16 MiB: checksummed, then written while still in cache


@dataclass
class FlatShard:
    """Tensors laid out back to back in one host byte buffer, in the order of a safetensors file (widest
    dtype first, so every view is aligned without padding). A lazy checkpoint copies into it with one
    call and writes it in a few large writes: the trainer's thread barely notices either."""

    data: torch.Tensor  # uint8, 1-D
    entries: list[tuple[str, torch.dtype, list[int], int, int]]  # name, dtype, shape, begin, end in data

    @classmethod
    def like(cls, tensors: dict[str, torch.Tensor], pin: bool = False) -> "FlatShard":
        entries, offset = [], 0
        for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
            n = t.numel() * t.element_size()
            entries.append((name, t.dtype, list(t.shape), offset, offset + n))
            offset += n
        return cls(torch.empty(offset, dtype=torch.uint8, pin_memory=pin), entries)

    def fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        return len(tensors) == len(self.entries) and all(
            name in tensors and tensors[name].dtype == dtype and list(tensors[name].shape) == shape
            for name, dtype, shape, _, _ in self.entries)

    def views(self) -> dict[str, torch.Tensor]:
        return {name: self.data[begin:end].view(dtype).view(shape) for name, dtype, shape, begin, end in self.entries}


def _write_safetensors(path: Path, shard: FlatShard) -> tuple[int, int, dict[str, int]]:
    """Write the shard as a safetensors file straight from its buffer (fsynced); return (bytes, file crc32,
    {name: tensor crc32}). safetensors' own writer first copies every tensor into a Python bytes object while
    holding the GIL, stalling the trainer's thread for that long; here every large step (crc32, write) runs
    with the GIL released, over a few big slices."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in shard.entries:
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [begin, end]}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    prefix = len(head).to_bytes(8, "little") + head
    data = memoryview(shard.data.numpy())
    crcs = {name: zlib.crc32(data[begin:end]) for name, _, _, begin, end in shard.entries}
    file_crc = zlib.crc32(prefix)
    with open(path, "wb", buffering=0) as f:
        f.write(prefix)
        for i in range(0, len(data), _CHUNK):
            chunk = data[i:i + _CHUNK]
            file_crc = zlib.crc32(chunk, file_crc)
            f.write(chunk)
        os.fsync(f.fileno())
    return len(prefix) + len(data), file_crc, crcs


def write_shard(tmp_dir: Path, rank: int, tensors: dict[str, torch.Tensor] | FlatShard) -> dict:
    """Write rank{rank}.safetensors (fsynced) and rank{rank}.json, this rank's manifest entry; return it."""
    tmp_dir, name = Path(tmp_dir), shard_name(rank)
    if not isinstance(tensors, FlatShard):
        shard = FlatShard.like(tensors)
        views = shard.views()
        for key, t in tensors.items():
            views[key].copy_(t.detach())
        tensors = shard
    faults.hit("ckpt.write")
    size, crc, crcs = _write_safetensors(tmp_dir / name, tensors)
    meta = {k: {"crc32": crcs[k], "dtype": str(dtype).removeprefix("torch."), "shape": shape}
            for k, dtype, shape, _, _ in tensors.entries}
    entry = {"file": name, "bytes": size, "crc32": crc, "tensors": meta}
    part = _entry_path(tmp_dir, rank, ".json.part")
    _write_file(part, json.dumps(entry).encode())
    os.replace(part, _entry_path(tmp_dir, rank))  # rank 0 never reads half an entry
    return entry


def mark_failed(tmp_dir: Path, rank: int, error: str) -> None:
    """Tell rank 0's rendezvous that this rank's shard will not come, so it fails now rather than at timeout."""
    _entry_path(tmp_dir, rank, ".failed").write_text(error)


def _rendezvous(tmp: Path, world_size: int, wait_s: float) -> list[dict]:
    deadline = time.monotonic() + wait_s
    while True:
        if not tmp.is_dir():
            raise CheckpointError(f"{tmp}: no such directory (tmp_dir_for and write_shard come before commit)")
        failed = [r for r in range(world_size) if _entry_path(tmp, r, ".failed").exists()]
        if failed:
            raise CheckpointError(f"{tmp}: rank(s) {failed} failed to write their shard")
        missing = [r for r in range(world_size) if not _entry_path(tmp, r).exists()]
        if not missing:
            return [json.loads(_entry_path(tmp, r).read_bytes()) for r in range(world_size)]
        if time.monotonic() > deadline:
            raise CheckpointError(f"{tmp}: rank(s) {missing} wrote no shard within {wait_s:g} s")
        time.sleep(0.02)


def commit(directory: Path, step: int, state: dict, config_hash: str, world_size: int = 1,
           wait_ranks_s: float = 600) -> Path:
    """Rank 0: turn D/step_N.tmp (every rank's shard written) into the complete checkpoint D/step_N."""
    directory = Path(directory)
    final = step_dir(directory, step)
    tmp = final.with_suffix(".tmp")
    entries = _rendezvous(tmp, world_size, wait_ranks_s)
    try:
        state_bytes = json.dumps(state).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{tmp / STATE}: state is not JSON-able ({e})") from e
    _write_file(tmp / STATE, state_bytes)
    files = {STATE: {"bytes": len(state_bytes), "crc32": zlib.crc32(state_bytes)}}
    files.update({e["file"]: {"bytes": e["bytes"], "crc32": e["crc32"]} for e in entries})
    manifest = {"format": FORMAT, "step": step, "config_hash": config_hash, "world_size": world_size,
                "created": time.time(), "files": files, "tensors": {e["file"]: e["tensors"] for e in entries}}
    for r in range(world_size):
        _entry_path(tmp, r).unlink()
    _write_file(tmp / MANIFEST, json.dumps(manifest).encode())  # no indent: the C encoder, the GIL held briefly
    _fsync(tmp)
    if final.exists():  # re-saving a step after resuming from an earlier one: the new one wins
        shutil.rmtree(final)
    os.rename(tmp, final)  # the commit point
    _fsync(directory)
    faults.hit("ckpt.rename")
    link, tmp_link = directory / LATEST, directory / (LATEST + ".tmp")
    tmp_link.unlink(missing_ok=True)
    os.symlink(final.name, tmp_link)
    os.replace(tmp_link, link)
    _fsync(directory)
    return final


# ---------------------------------------------------------------- verifying and loading


def _refusal(path: Path) -> str | None:
    """Why a file must not be read by its contents' kind (pickle, zip, not safetensors), or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save output); checkpoints hold no pickle"
    if path.suffix == ".safetensors":  # its first 8 bytes are a length and may look like a pickle header
        n = int.from_bytes(head[:8], "little")
        return None if head[8:9] == b"{" and 8 + n <= path.stat().st_size else "not a safetensors file"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:
        return "pickle data; checkpoints hold no pickle"
    return None


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing manifest (checkpoint never completed)")
    try:
        m = json.loads(mpath.read_bytes())
    except ValueError as e:  # includes UnicodeDecodeError
        raise CheckpointError(f"{mpath}: truncated or invalid manifest ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CheckpointError(f"{mpath}: format {found!r}, expected {FORMAT!r}")
    types = {"step": int, "world_size": int, "files": dict, "tensors": dict}
    if not all(isinstance(m.get(k), t) for k, t in types.items()):
        raise CheckpointError(f"{mpath}: manifest lacks one of {sorted(types)}")
    return m


def verify_dir(path: Path) -> dict:
    """Check the manifest and every file's kind, size and crc32 (not each tensor: load does); return the manifest."""
    path = Path(path)
    m = read_manifest(path)
    mpath, files = path / MANIFEST, m["files"]
    if path.name != step_dir(path.parent, m["step"]).name:
        raise CheckpointError(f"{mpath}: manifest is for step {m['step']}, directory is {path.name}")
    shards = {shard_name(r) for r in range(m["world_size"])}
    if set(m["tensors"]) != shards or not shards <= set(files) or STATE not in files:
        raise CheckpointError(f"{mpath}: manifest does not list {STATE} and one shard per rank")
    for entry in sorted(path.iterdir()):
        if entry.name != MANIFEST and entry.name not in files:
            reason = _refusal(entry) if entry.is_file() else "a directory"
            raise CheckpointError(f"{entry}: unexpected file" + (f" ({reason})" if reason else ""))
    for name, meta in files.items():
        f = path / name
        if "/" in name or name in (".", "..") or not isinstance(meta, dict):
            raise CheckpointError(f"{mpath}: bad file entry {name!r}")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in the manifest)")
        if reason := _refusal(f):
            raise CheckpointError(f"{f}: refused, {reason}")
        if f.stat().st_size != meta.get("bytes"):
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {meta.get('bytes')} (truncated?)")
        if file_crc32(f)[1] != meta.get("crc32"):
            raise CheckpointError(f"{f}: crc32 mismatch, contents corrupt")
    return m


def _check_tensors(file: Path, shard: dict[str, torch.Tensor], expected: dict) -> None:
    if set(shard) != set(expected):
        raise CheckpointError(f"{file}: tensors {sorted(set(shard) ^ set(expected))} differ from the manifest")
    for name, t in shard.items():
        e = expected[name]
        if str(t.dtype).removeprefix("torch.") != e["dtype"] or list(t.shape) != e["shape"]:
            raise CheckpointError(f"{file}: tensor {name!r} is {t.dtype}{list(t.shape)}, manifest says "
                                  f"{e['dtype']}{e['shape']}")
        if tensor_crc32(t) != e["crc32"]:
            raise CheckpointError(f"{file}: tensor {name!r} crc32 mismatch")


def load(path: Path, verify: bool = True, ranks: Iterable[int] | None = None) -> Checkpoint:
    """Load a checkpoint (a step dir or the `latest` link): the state, and the shards of `ranks` (default all)
    into memory. verify=True runs verify_dir and checks every loaded tensor against its crc32."""
    path = Path(path).resolve()
    m = verify_dir(path) if verify else read_manifest(path)
    try:
        state = json.loads((path / STATE).read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE}: unreadable state ({e})") from e
    wanted = None if ranks is None else set(ranks)
    tensors = {}
    for file, expected in m["tensors"].items():
        rank = int(_SHARD.fullmatch(file)[1]) if _SHARD.fullmatch(file) else -1
        if wanted is not None and rank not in wanted:
            continue
        try:
            shard = load_file(path / file)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path / file}: unreadable shard ({e})") from e
        if verify:
            _check_tensors(path / file, shard, expected)
        tensors[rank] = shard
    return Checkpoint(step=m["step"], path=path, state=state, tensors=tensors, manifest=m)


# ---------------------------------------------------------------- finding and pruning


def _step_dirs(directory: Path) -> Iterator[tuple[int, bool, Path]]:
    """(step, is_tmp, path) of every step_N and step_N.tmp directory."""
    if not Path(directory).is_dir():
        return
    for p in Path(directory).iterdir():
        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and not p.is_symlink():
            yield int(m[1]), bool(m[2]), p


def find_latest(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The highest-step checkpoint that passes verify_dir, and (path, reason) for every newer one skipped.
    `latest` is not consulted: a crash between the commit rename and the link swap leaves it one behind."""
    skipped: list[tuple[Path, str]] = []
    for _, is_tmp, p in sorted(_step_dirs(directory), key=lambda c: (c[0], c[1]), reverse=True):
        if is_tmp:
            skipped.append((p, "partial: never committed"))
            continue
        try:
            verify_dir(p)
            return p, skipped
        except (CheckpointError, OSError) as e:
            skipped.append((p, str(e)))
    return None, skipped


def prune(directory: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last (never the one `latest` names) and .tmp dirs
    no newer than the newest complete one (a newer .tmp may be another rank's write in progress)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    dirs = list(_step_dirs(directory))
    complete = sorted(((s, p) for s, t, p in dirs if not t), reverse=True)
    if not complete:
        return []
    link = Path(directory) / LATEST
    protected = link.resolve() if link.is_symlink() else None
    doomed = [p for _, p in complete[keep_last:] if p.resolve() != protected]
    doomed += [p for s, t, p in dirs if t and s <= complete[0][0]]
    for p in doomed:
        if not p.name.endswith(".tmp"):  # rename first: a crash mid-delete leaves a .tmp, not a broken checkpoint
            shutil.rmtree(p.with_suffix(".tmp"), ignore_errors=True)
            p = p.rename(p.with_suffix(".tmp"))
        shutil.rmtree(p, ignore_errors=True)
    return doomed
