"""Recipes: typed dataclass configs loaded from YAML plus `key=value` overrides.

Every error names what is wrong: an unknown key comes with the nearest valid key,
a wrong type with the key, the value and the expected type, and a missing recipe
file with its path. Nothing is loaded or started before the whole config checks out.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe or override that cannot be applied; the message names the key."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache  # resolving string annotations is slow, and every key of every recipe asks
def _resolved_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class, e.g. `trainer.lr`."""
    keys = []
    hints = _resolved_hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if is_config(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def leaf_type(cls, key: str) -> Any:
    """The annotation of a dotted leaf key, e.g. `str` for `data.prompt_template`; None if there is no such key."""
    tp: Any = cls
    for part in key.split("."):
        if not is_config(tp) or part not in _fields(tp):
            return None
        tp = _resolved_hints(tp)[part]
    return None if is_config(tp) else tp


def _nearest(key: str, cls) -> str:
    candidates = all_keys(cls)
    leaf_matches = [k for k in candidates if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5) or leaf_matches[:1]
    if not close:  # compare leaves only, e.g. "lrr" -> "trainer.lr"
        leaves = {k.rsplit(".", 1)[-1]: k for k in candidates}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.5)]
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arm in get_args(tp):
            if arm is type(None):
                continue
            try:
                return coerce(value, arm, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int past float's range, e.g. 10**400
                raise bad from None
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. model.path=123 typed bare on the command line
        raise bad
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _apply(cfg: Any, values: dict[str, Any], prefix: str, source: str, root_cls) -> None:
    hints = _resolved_hints(type(cfg))
    fields = _fields(type(cfg))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            while isinstance(value, dict) and value:  # name the full dotted key, e.g. trainr.lr
                sub = next(iter(value))
                key, value = f"{key}.{sub}", value[sub]
            raise ConfigError(f"unknown key {key!r} in {source}{_nearest(key, root_cls)}")
        tp = hints[name]
        if is_config(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section of keys, got {value!r} in {source}")
            _apply(getattr(cfg, name), value, f"{key}.", source, root_cls)
            continue
        value = coerce(value, tp, key)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r} in {source}")
        setattr(cfg, name, value)


def _dotted_to_nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`trainer.lr=1e-3` -> ("trainer.lr", 0.001); values parse as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"empty key in override {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return key, value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:  # OmegaConf: YAML plus ${section.key} interpolation inside a recipe
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=True) or {}
    except (yaml.YAMLError, OmegaConfBaseException, OSError) as e:  # OSError: unreadable, or a bare scalar
        # YAML's message spans several lines
        raise ConfigError(f"recipe {p} could not be read: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of sections, got {type(data).__name__}")
    return data


def build(cls, recipe_path: str | None = None, overrides: list[str] = ()) -> Any:
    """Defaults <- recipe YAML <- overrides, checked key by key.

    Override values parse as YAML, except that a text key takes the text as typed when YAML would read
    something else (`data.prompt_template=Q: {problem}` is a mapping to YAML, `model.path=010` an int).

    `recipe_path` is a file, or the bare name of a bundled recipe (`math`, `math.yaml`). The
    defaults' and a bundled recipe's `assets/...` paths name the bundled assets; a user's own
    recipe and the overrides keep paths relative to the current directory (see areal/bundle.py).
    """
    from areal import bundle

    cfg = cls()
    bundle.resolve_default_assets(cfg)
    if recipe_path:
        path = bundle.find_recipe(str(recipe_path))
        values = load_yaml(path)
        if bundle.is_bundled(path):
            values = bundle.resolve_assets_in(values)
        _apply(cfg, values, "", f"recipe {recipe_path}", cls)
    for text in overrides:
        key, value = parse_override(text)
        if not isinstance(value, str) and leaf_type(cls, key) is str:
            value = text.split("=", 1)[1]  # text as typed: 'Q: {problem}' would read as a YAML mapping
        _apply(cfg, _dotted_to_nested(key, value), "", f"override {text!r}", cls)  # repr: one line, whatever was typed
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict, source: str = "a resolved recipe") -> Any:
    """The inverse of `to_dict`, checked key by key (a role rebuilds its recipe from its spec this way)."""
    cfg = cls()
    _apply(cfg, values, "", source, cls)
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, in declaration order."""
    rows = []
    hints = _resolved_hints(cls)
    defaults = cls()
    for name, f in _fields(cls).items():
        tp = hints[name]
        if is_config(tp):
            rows += help_text(tp, f"{prefix}{name}.")
            continue
        choices = f.metadata.get("choices")
        type_name = " | ".join(map(repr, choices)) if choices else _type_name(tp)
        rows.append((f"{prefix}{name}", type_name, repr(getattr(defaults, name)), f.metadata.get("help", "")))
    return rows
