"""Regenerate the README's configuration reference from the config dataclasses.

`python scripts/config_reference.py` rewrites the block between the markers; the test suite
fails when the README and the code disagree, so no default changes silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

from areal.config import help_text
from areal.recipe import Recipe

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render() -> str:
    lines, section = [], None
    for key, type_name, default, text in help_text(Recipe):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines += ["", f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{key}` | {cell(type_name)} | `{cell(default)}` | {cell(text)} |")
    return "\n".join([START, *lines, "", END])


def current_block(readme: str) -> str:
    return readme[readme.index(START) : readme.index(END) + len(END)]


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(text.replace(current_block(text), render()))
    sys.exit(0)
