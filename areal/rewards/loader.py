"""Load a reward function from a spec string: "package.module:function" or "path/to/file.py:function".

Every error names the spec, so a typo in a config fails at start-up with a message that
says what was asked for and what exists instead.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

_SPEC_FORMS = "'package.module:function' or 'path/to/file.py:function'"


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward function spec {spec!r} is missing ':'; expected {_SPEC_FORMS}")
    module_part, _, attr_part = spec.rpartition(":")
    if not module_part.strip() or not attr_part.strip():
        raise ValueError(f"reward function spec {spec!r} has an empty side of ':'; expected {_SPEC_FORMS}")
    return module_part.strip(), attr_part.strip()


def _is_file_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def resolve_spec(spec: str) -> str:
    """The spec with a relative file path made absolute against the current directory.

    Worker processes may run in another directory, so the pool hands them this form.
    """
    module_part, attr = _split_spec(spec)
    if _is_file_path(module_part):
        return f"{Path(module_part).expanduser().resolve()}:{attr}"
    return f"{module_part}:{attr}"


def _import_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"reward function file {str(path)!r} not found (spec {spec!r})")
    # One module name per absolute path: loading the same file twice reuses the module,
    # and two files called rewards.py do not clash.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"_areal_reward_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function file {str(path)!r} cannot be imported (spec {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # registered first so the file's own pickling/dataclasses work
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise ValueError(
            f"reward function file {str(path)!r} failed to import (spec {spec!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # SyntaxError, SystemExit in a module body: cannot load
        raise ValueError(
            f"reward function module {module_name!r} cannot be imported (spec {spec!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _public_callables(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and callable(value) and not inspect.isclass(value)
    )


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """The callable named by `spec`; `async def` functions are returned as they are.

    The function is called as ``fn(prompt: str, completion: str, **fields) -> float``;
    use `is_async_reward_fn` to know whether it must be run with `asyncio.run`.
    Raises FileNotFoundError (file path that does not exist) or ValueError (any other
    problem); both messages name the spec.
    """
    module_part, attr_path = _split_spec(spec)
    if _is_file_path(module_part):
        path = Path(module_part).expanduser()
        module = _import_file(path if path.is_absolute() else Path.cwd() / path, spec)
    else:
        module = _import_module(module_part, spec)

    target: Any = module
    for attr in attr_path.split("."):  # "module:Class.method" works too
        if not hasattr(target, attr):
            available = ", ".join(_public_callables(module)) or "none"
            raise ValueError(
                f"reward function spec {spec!r}: module {module.__name__!r} has no attribute "
                f"{attr_path!r}; callables available: {available}"
            )
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(
            f"reward function spec {spec!r}: {attr_path!r} is a {type(target).__name__}, not callable"
        )
    return target


def is_async_reward_fn(fn: Callable[..., Any]) -> bool:
    """True for `async def` functions (and objects whose __call__ is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
