"""`option()`: the one way a config field is declared, with its default and help text."""

from __future__ import annotations

import copy
from dataclasses import field, is_dataclass
from typing import Any


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with a default, help text and optional allowed values.

    Mutable defaults (lists, dicts, nested config sections) are copied per instance.
    """
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
