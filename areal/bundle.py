"""The bundled recipes and assets, found the same way from a checkout and from an installed wheel.

Bundle root: the folder that holds `recipes/` and `assets/`. In a checkout (or an editable
install) that is the repository root; a wheel installs both inside the package, as
`areal/recipes/` and `areal/assets/` (pyproject `[tool.setuptools.package-data]`).

`recipe=VALUE` is a file path when such a file exists; otherwise a bare name (no `/`) such as
`math` or `math.yaml` names a bundled recipe. Anything else fails with one line listing the
bundled recipes.

Relative paths, and which folder they resolve against:
- a user's own recipe and `key=value` overrides: the current directory, as always;
- a bundled recipe and the built-in defaults (`model.path`, `data.train_path`, ...): a relative
  path under `assets/` names a bundled asset and is rewritten to its place under the bundle
  root. It is left as written when it already reaches that same file from the current
  directory (running from the checkout root), so configs, run folders and resume checks there
  read exactly as before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent
RECIPE_SUFFIXES = (".yaml", ".yml")


def bundle_root() -> Path:
    """The installed package folder when it carries the bundle, else the checkout root."""
    for root in (_PKG, _PKG.parent):
        if (root / "recipes").is_dir() and (root / "assets").is_dir():
            return root
    return _PKG  # nothing bundled (a broken install): errors then name where it was expected


def recipes_dir() -> Path:
    return bundle_root() / "recipes"


def bundled_recipes() -> list[str]:
    """Names of the bundled recipes, e.g. ['math']."""
    d = recipes_dir()
    return sorted(p.stem for p in d.iterdir() if p.is_file() and p.suffix in RECIPE_SUFFIXES) if d.is_dir() else []


def find_recipe(value: str) -> Path:
    """The recipe file that `recipe=VALUE` names: an existing file, else a bundled recipe by bare name."""
    from areal.config import ConfigError

    p = Path(value)
    if p.is_file():
        return p
    names = bundled_recipes()
    listing = f"bundled recipes: {', '.join(names) if names else f'none (looked in {recipes_dir()})'}"
    if "/" in value or "\\" in value or not value:
        raise ConfigError(f"recipe file not found: {value} ({listing})")
    stem = value[: -len(p.suffix)] if p.suffix in RECIPE_SUFFIXES else value
    for suffix in RECIPE_SUFFIXES:
        found = recipes_dir() / f"{stem}{suffix}"
        if found.is_file():
            return found
    raise ConfigError(f"recipe file not found: {value} is neither a file nor a bundled recipe ({listing})")


def is_bundled(recipe: str | Path) -> bool:
    """True for a recipe file that lives among the bundled recipes (however it was named)."""
    return Path(recipe).resolve().parent == recipes_dir().resolve()


def resolve_asset(value: str) -> str:
    """A bundled `assets/...` path as it reaches the bundled file from the current directory."""
    p = Path(value)
    if p.is_absolute() or not p.parts or p.parts[0] != "assets":
        return value
    bundled = bundle_root() / p
    if p.resolve() == bundled.resolve():
        return value  # already right from here (the checkout root): keep the recipe's own text
    return str(bundled)


def resolve_assets_in(values: Any) -> Any:
    """`resolve_asset` on every string leaf of a loaded recipe mapping (a copy)."""
    if isinstance(values, dict):
        return {k: resolve_assets_in(v) for k, v in values.items()}
    if isinstance(values, list):
        return [resolve_assets_in(v) for v in values]
    return resolve_asset(values) if isinstance(values, str) else values


def resolve_default_assets(cfg: Any) -> None:
    """`resolve_asset` on every string field of a config dataclass tree, in place (the defaults)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolve_default_assets(value)
        elif isinstance(value, str):
            setattr(cfg, f.name, resolve_asset(value))
