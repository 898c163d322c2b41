"""Nested state (a torch or DeepSpeed optimizer state_dict) <-> tensors keyed by path + a JSON skeleton.

The tensors go into a checkpoint shard (store.py); the skeleton into state.json, with a tensor written as
{"__tensor__": key}, a tuple as {"__tuple__": [...]} and a dict with non-str keys as
{"__dict__": [[key, value], ...]}, so that optimizer state keyed by int round-trips exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from areal.checkpoint.store import CheckpointError

_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _key(k: Any, path: str) -> Any:
    if k is None or isinstance(k, (str, bool, float)):
        return k
    if isinstance(k, int):
        return int(k)
    if type(k) is tuple:
        return {"__tuple__": [_key(v, path) for v in k]}
    raise CheckpointError(f"{path or '<root>'}: cannot checkpoint a dict key of type {type(k).__name__}")


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors keyed by path, JSON-able skeleton). The tensors are the live ones, not copies."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise CheckpointError(f"{path}: two tensors flatten to this key")
            tensors[path] = x
            return {"__tensor__": path}
        if x is None or isinstance(x, (str, bool, float)):
            return x
        if isinstance(x, int):  # IntEnum (e.g. DeepSpeed's ZeRO stage) -> int
            return int(x)
        if type(x) is tuple or isinstance(x, torch.Size):
            return {"__tuple__": [walk(v, _join(path, i)) for i, v in enumerate(x)]}
        if type(x) is list:
            return [walk(v, _join(path, i)) for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(type(k) is str and k not in _MARKERS for k in x):
                return {k: walk(v, _join(path, k)) for k, v in x.items()}
            return {"__dict__": [[_key(k, path), walk(v, _join(path, k))] for k, v in x.items()]}
        raise CheckpointError(f"{path or '<root>'}: cannot checkpoint a {type(x).__name__} "
                              "(only dict, list, tuple, str, int, float, bool, None and Tensor)")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_state."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        (tag, v), = skeleton.items()
        if tag == "__tensor__":
            if v not in tensors:
                raise CheckpointError(f"tensor {v!r} is not in the checkpoint")
            return tensors[v]
        if tag == "__tuple__":
            return tuple(unflatten_state(i, tensors) for i in v)
        if tag == "__dict__":
            return {unflatten_state(k, tensors): unflatten_state(i, tensors) for k, i in v}
    return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
