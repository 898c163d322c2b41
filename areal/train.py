"""`python -m areal.train recipe=PATH|NAME key=value ... [--help] [--dry-run]`

NAME is a bundled recipe (`math` or `math.yaml`), found from any directory (areal/bundle.py).
"""

from __future__ import annotations

import logging
import sys

from areal.bundle import find_recipe
from areal.config import ConfigError, build, help_text, to_yaml
from areal.recipe import Recipe

USAGE = "usage: python -m areal.train recipe=PATH|NAME [section.key=value ...] [--dry-run] [--help]"


def print_help() -> None:
    """Every key with its type, default and help, section by section."""
    import textwrap

    print(USAGE)
    print("Keys are set in the recipe YAML or as section.key=value; an unknown key is an error.")
    section = None
    for key, type_name, default, text in help_text(Recipe):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            print(f"\n[{section}]")
        print(f"  {key}  ({type_name}; default {default})")
        print(textwrap.indent(textwrap.fill(text, 88), "      "))


def parse_args(argv: list[str]) -> tuple[Recipe, str | None, bool]:
    flags = {a for a in argv if a.startswith("--")}
    unknown_flags = flags - {"--dry-run", "--help", "-h"}
    if unknown_flags:
        raise ConfigError(f"unknown flag(s) {sorted(unknown_flags)}; {USAGE}")
    pairs = [a for a in argv if not a.startswith("-")]
    recipe_path = None
    overrides = []
    for arg in pairs:
        if arg.startswith("recipe="):  # a file, else a bundled recipe's bare name; run folders take its stem
            recipe_path = arg.split("=", 1)[1]
            recipe_path = str(find_recipe(recipe_path)) if recipe_path else None
        else:
            overrides.append(arg)
    return build(Recipe, recipe_path, overrides), recipe_path, "--dry-run" in flags


def train(recipe: Recipe, recipe_path: str | None = None, launcher=None):
    """Run a recipe in its mode, write summary.json and print the held-out accuracy before and after.
    Async roles are placed by `launcher` (areal/launchers), by default the one `launcher.type` names."""
    import json
    import time

    from areal.console import console
    from areal.setup import check_inputs

    start = time.perf_counter()
    if recipe.run.mode == "async" and recipe.launcher.type != "ray":
        # here, before any role starts; sync: setup() checks them before the weights load; Ray: trainer0 does,
        # on its node, with that node's files and network
        check_inputs(recipe)
    if recipe.run.mode == "sync":
        from areal.sync_loop import train_sync

        result = train_sync(recipe, recipe_path)
    else:
        from areal.controller import train_async

        result = train_async(recipe, recipe_path, launcher)
    sm = result.summary
    sm["wall_seconds"] = time.perf_counter() - start  # everything: loading, processes, evaluation
    (result.run_dir / "summary.json").write_text(json.dumps(sm, indent=2))
    console.print(
        f"[bold]held-out accuracy {sm['eval_accuracy_initial']:.3f} -> {sm['eval_accuracy_final']:.3f}[/bold] "
        f"in {sm['wall_seconds']:.0f} s ({sm['steps']} steps, {sm['mode']}); run_dir={result.run_dir}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help()
        return 0
    try:
        recipe, recipe_path, dry_run = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if recipe.launcher.type == "slurm":  # submit a batch job that runs this recipe (--dry-run: print its script)
        from areal.launchers.slurm import submit

        return submit(recipe, recipe_path, dry_run)
    if dry_run:
        print(to_yaml(recipe), end="")
        return 0
    logging.basicConfig(level=recipe.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from areal.checkpoint.session import PREEMPTED_EXIT_CODE, Preempted
    from areal.controller import RoleFailed
    from areal.data import DataError

    try:
        train(recipe, recipe_path)
    except (ConfigError, DataError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # a checkpoint is committed: the same command resumes from it
        print(str(e), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except RoleFailed as e:  # a process of the run died or failed: its name (and traceback, if it had one)
        print(f"error: {e}\n(rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every role has been stopped by the controller
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
