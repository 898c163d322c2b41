"""Recipe loading: defaults, YAML, overrides, and an error that names the key for each bad input."""

import re
import subprocess
import sys

import pytest
import yaml

from areal.config import ConfigError, all_keys, build, help_text, parse_override, to_yaml
from areal.recipe import Recipe
from areal.train import main


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 0.01\n  steps: 7\nrollout:\n  group_size: 4\n")
    cfg = build(Recipe, path, ["trainer.lr=3e-4", "rollout.stop=[a, b]"])
    assert cfg.trainer.lr == pytest.approx(3e-4)  # override beats YAML
    assert cfg.trainer.steps == 7  # YAML beats default
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.trainer.batch_size == Recipe().trainer.batch_size  # untouched default


def test_int_is_accepted_for_float_and_converted():
    cfg = build(Recipe, None, ["trainer.lr=1"])
    assert isinstance(cfg.trainer.lr, float) and cfg.trainer.lr == 1.0


def test_unknown_yaml_key_names_key_file_and_nearest(tmp_path):
    path = write(tmp_path, "trainer:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError) as e:
        build(Recipe, path)
    msg = str(e.value)
    assert "trainer.lrr" in msg and path in msg and "did you mean 'trainer.lr'" in msg


def test_unknown_override_suggests_the_full_key():
    with pytest.raises(ConfigError, match=r"unknown key 'group_size'.*did you mean 'rollout.group_size'"):
        build(Recipe, None, ["group_size=4"])


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'trainr.lr'.*did you mean 'trainer.lr'"):
        build(Recipe, None, ["trainr.lr=1"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lr=fast", "trainer.lr: expected float, got 'fast' (str)"),
        ("trainer.steps=2.5", "trainer.steps: expected int, got 2.5 (float)"),
        ("trainer.decoupled=maybe", "trainer.decoupled: expected bool, got 'maybe' (str)"),
        ("rollout.stop=5", "rollout.stop: expected list[str], got 5 (int)"),
        ("trainer=3", "trainer: expected a section of keys, got 3"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, expected):
    with pytest.raises(ConfigError) as e:
        build(Recipe, None, [override])
    assert expected in str(e.value)


def test_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"rollout.backend: expected one of \['hf', 'engine'\], got 'vllm'"):
        build(Recipe, None, ["rollout.backend=vllm"])


def test_missing_recipe_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"recipe file not found: {missing}"):
        build(Recipe, missing)


def test_cross_field_validation_names_the_key():
    with pytest.raises(ConfigError, match="trainer.minibatches: 3 must divide trainer.batch_size=16"):
        build(Recipe, None, ["trainer.minibatches=3"])
    with pytest.raises(ConfigError, match="rollout.group_size: must be >= 1"):
        build(Recipe, None, ["rollout.group_size=0"])


def test_interpolation_inside_a_recipe(tmp_path):
    path = write(tmp_path, "rollout:\n  max_new_tokens: 12\n  eval_max_new_tokens: ${rollout.max_new_tokens}\n")
    assert build(Recipe, path).rollout.eval_max_new_tokens == 12


def test_override_values_parse_as_yaml_scalars():
    assert parse_override("a.b=1.0e-3") == ("a.b", 0.001)
    assert parse_override("a.b=12") == ("a.b", 12)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("trainer.lr")


def test_dry_run_output_round_trips(tmp_path):
    cfg = build(Recipe, "recipes/math.yaml", ["trainer.steps=3"])
    text = to_yaml(cfg)
    assert build(Recipe, write(tmp_path, text)) == cfg
    assert yaml.safe_load(text)["trainer"]["steps"] == 3


def test_every_key_has_help_and_defaults_are_not_shared():
    rows = help_text(Recipe)
    assert [r[0] for r in rows] == all_keys(Recipe)
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]
    a, b = Recipe(), Recipe()
    a.rollout.stop.append("x")
    a.logging.wandb.mode = "disabled"
    assert b.rollout.stop == [] and b.logging.wandb.mode == "offline"


def test_cli_help_dry_run_and_errors(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "trainer.lr" in out and "AdamW learning rate" in out and "[reward]" in out
    assert main(["recipe=recipes/math.yaml", "trainer.steps=2", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["steps"] == 2
    assert main(["recipe=recipes/math.yaml", "trainer.lrr=1"]) == 2
    assert "did you mean 'trainer.lr'" in capsys.readouterr().err
    assert main(["recipe=recipes/math.yaml", "--dryrun"]) == 2
    assert "unknown flag" in capsys.readouterr().err


def test_module_entry_point_fails_fast_on_bad_key():
    proc = subprocess.run(
        [sys.executable, "-m", "areal.train", "recipe=recipes/math.yaml", "model.pth=x"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown key 'model.pth'" in proc.stderr and "did you mean 'model.path'" in proc.stderr


def test_readme_config_reference_is_current():
    """Defaults never change silently: the README's reference is generated from the code."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("config_reference", Path("scripts/config_reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    assert ref.current_block(ref.README.read_text()) == ref.render(), "run: python scripts/config_reference.py"


# Bundled recipes by bare name, from any directory (areal/bundle.py).

def test_bundled_recipe_by_bare_name_from_another_directory(tmp_path, monkeypatch):
    from pathlib import Path

    from areal.bundle import bundle_root, bundled_recipes

    monkeypatch.chdir(tmp_path)  # no recipes/ or assets/ here
    assert "math" in bundled_recipes()
    by_name, by_file = build(Recipe, "math"), build(Recipe, "math.yaml")
    assert by_name == by_file
    assert by_name.trainer.steps == 300 and by_name.rollout.backend == "engine"  # the recipe's values
    for path in (by_name.model.path, by_name.data.train_path, by_name.data.test_path):
        assert Path(path).is_absolute() and Path(path).exists() and Path(path).is_relative_to(bundle_root() / "assets")
    assert build(Recipe).model.path == by_name.model.path  # the built-in defaults name the same bundled model
    assert main(["recipe=math", "trainer.steps=2", "--dry-run"]) == 0


BUNDLED_LISTING = ("bundled recipes: chain, gsm8k-qwen2.5-0.5b, gsm8k-qwen2.5-1.5b, math, math-qwen2.5-math-1.5b, "
                   "r1-distill-qwen-1.5b")


def test_unknown_recipe_name_lists_the_bundled_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        build(Recipe, "maths")
    msg = str(e.value)
    assert "\n" not in msg and "maths" in msg and BUNDLED_LISTING in msg
    with pytest.raises(ConfigError, match=re.escape(f"recipe file not found: conf/math.yaml ({BUNDLED_LISTING})")):
        build(Recipe, "conf/math.yaml")  # an explicit path is never looked up by name
    assert main(["recipe=maths", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and BUNDLED_LISTING in err


def test_user_recipe_paths_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "model:\n  path: assets/models/tiny-math\ntrainer:\n  steps: 5\n", name="math.yaml")
    cfg = build(Recipe, "math.yaml")  # an existing file wins over the bundled name
    assert cfg.trainer.steps == 5
    assert cfg.model.path == "assets/models/tiny-math"  # a user's recipe: relative to the cwd, as written
    assert build(Recipe, "math", ["data.train_path=assets/x.jsonl"]).data.train_path == "assets/x.jsonl"  # overrides too


def test_bundled_recipe_from_the_checkout_root_reads_as_written(monkeypatch):
    """From the root, the relative text already reaches the bundled files: configs and resume checks are unchanged."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = build(Recipe, "recipes/math.yaml")
    assert cfg.model.path == "assets/models/tiny-math" and cfg.data.train_path == "assets/data/arith/train.jsonl"
    assert build(Recipe, "math") == cfg


def test_launcher_type_ray_without_ray_installed_is_one_line(monkeypatch):
    from areal.launchers.ray import RayLauncher

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"launcher.type=ray needs Ray .* pip install 'areal\[ray\]'"):
        RayLauncher(build(Recipe, "recipes/math.yaml", ["launcher.type=ray"]))
