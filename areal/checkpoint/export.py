"""The policy as a Hugging Face model folder: what vLLM, transformers or a later run load.

    out_dir/config.json, generation_config.json, model.safetensors (or shards + index), tokenizer files

Written atomically: into out_dir.tmp, then renamed; an existing out_dir is replaced (moved to
out_dir.old first, then deleted), so a reader sees the old folder or the new one, never a mix.
Every rank calls export_model: under ZeRO-3 the full weights are gathered from every rank's
partition (engine.named_weights does the collective gather); only rank 0 writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

# files of a base model folder that are weights (never copied: the export writes its own)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gather_state_dict(engine, keep: bool) -> dict[str, torch.Tensor]:
    """The policy's full weights under the HF model's names (+ its persistent buffers); {} when not `keep`.
    Iterated on every rank: under ZeRO-3 each parameter is an all-gather every rank must join."""
    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        """On the CPU, in storage of its own: ZeRO-1/2 parameters are views of one flat buffer, which
        save_pretrained would take for tied weights. A CPU tensor with its own storage is not copied."""
        t = t.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(t.untyped_storage().data_ptr())
        return t

    for name, tensor in engine.named_weights():
        if keep:
            state[name] = own(tensor)
    if keep:
        persistent = set(engine.model.state_dict(keep_vars=True))  # keys only (ZeRO-3 params there are empty)
        for name, buf in engine.model.named_buffers():
            if name in persistent and name not in state:
                state[name] = own(buf)
    return state


def _copy_base_files(base: Path, out: Path) -> list[str]:
    """Files of the base model folder the export did not write (custom code, chat template, README...)."""
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def export_model(engine, out_dir: Path, tokenizer, base_model_path: str | None = None) -> Path | None:
    """Write the policy as a Hugging Face model folder (save_pretrained: config, safetensors weights, generation
    config, tokenizer), atomically (write out_dir.tmp, then rename; an existing out_dir is replaced). Full weights
    are gathered from every rank (ZeRO-3 partitions); only rank 0 writes (returns the path there, None elsewhere);
    every rank must call it.

    base_model_path: a local model folder whose other files (e.g. custom modelling code, a chat template) are
    copied along when the export did not write a file of that name; weight files are never copied.
    tokenizer: saved with save_pretrained; None writes no tokenizer files (unless base_model_path has them)."""
    out_dir = Path(out_dir)
    rank = engine.rank
    state = _gather_state_dict(engine, keep=rank == 0)
    error: BaseException | None = None
    if rank == 0:
        try:
            _write(engine.model, state, out_dir, tokenizer, base_model_path)
        except BaseException as e:  # reported to the other ranks below, then re-raised
            error = e
    del state
    if engine.world_size > 1 and dist.is_initialized():
        # every rank returns once the folder is there, or raises with rank 0 (none waits for a dead writer)
        failed = torch.tensor([0 if error is None else 1], device=engine.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is None and int(failed.item()):
            raise RuntimeError(f"export to {out_dir} failed on rank 0")
    if error is not None:
        raise error
    return out_dir if rank == 0 else None


def _write(model, state: dict[str, torch.Tensor], out_dir: Path, tokenizer, base_model_path: str | None) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # safetensors; tied weights (lm_head = embed_tokens) are written once and re-tied on load
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if base_model_path is not None and Path(base_model_path).is_dir():
        _copy_base_files(Path(base_model_path), tmp)
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)  # the commit point
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
