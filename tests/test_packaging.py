"""The wheel installs the one import root `areal` with the component folders beneath it, and
carries the bundled recipes, model and data so `recipe=math.yaml` works from any directory."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Never copied into the build tree: environments, build outputs, run folders.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "runs", "wandb", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built offline (no build isolation: the dev venv's setuptools) from a copy of the tree, so a
    stale build/ in the checkout cannot leak into the wheel and nothing is written into the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out)],
        check=True, timeout=600,
    )
    (path,) = out.glob("areal-*.whl")
    return path


def test_wheel_maps_components_under_areal(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"areal"}, tops  # no bare kernels/, buffer/, rollout/ or trainer/
    for sub in ("rollout", "trainer", "buffer", "kernels", "rewards", "launchers"):
        assert f"areal/{sub}/__init__.py" in names
    bundled = [p.relative_to(ROOT).as_posix() for d in ("recipes", "assets") for p in sorted((ROOT / d).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts]
    assert {"recipes/math.yaml", "recipes/r1-distill-qwen-1.5b.yaml", "assets/models/tiny-math/model.safetensors"} <= set(bundled)
    missing = [f for f in bundled if f"areal/{f}" not in names]
    assert not missing, missing  # every bundled recipe and asset file ships in the wheel


def test_wheel_declares_the_runtime_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert "pyzmq>=25" in requires and "msgpack>=1.0" in requires


def test_wheel_imports_from_site_packages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    assert not (target / "kernels").exists() and not (target / "buffer").exists()
    code = (
        "import areal, areal.rollout, areal.trainer, areal.buffer, areal.kernels, areal.rewards;"
        "import areal.trainer.loss, areal.kernels.logprob, areal.recipe;"
        "print(areal.rollout.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # -P keeps the current directory off sys.path; run from tmp so the checkout cannot leak in.
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(target)), proc.stdout


def test_editable_install_resolves_to_the_checkout():
    import areal.buffer
    import areal.kernels

    assert Path(areal.kernels.__file__).parent == ROOT / "kernels"
    assert Path(areal.buffer.__file__).parent == ROOT / "buffer"


# Run by the installed package from a directory outside the checkout: the bundled recipe by bare
# name, its paths, then the default model config, tokenizer and first data row through areal's loaders.
_INSTALLED_CHECK = r"""
import json, subprocess, sys
from pathlib import Path
import yaml
import areal
from areal.config import build
from areal.data import encode_prompt, load_rows
from areal.model import check_model_path, load_tokenizer
from areal.recipe import Recipe

dry = subprocess.run([sys.executable, "-m", "areal.train", "recipe=math.yaml", "--dry-run"],
                     capture_output=True, text=True, timeout=120)
assert dry.returncode == 0, dry.stderr
printed = yaml.safe_load(dry.stdout)
recipe = build(Recipe, "math")
from transformers import AutoConfig
check_model_path(recipe.model.path)
config = AutoConfig.from_pretrained(recipe.model.path)
tokenizer = load_tokenizer(recipe.model)
row = load_rows(recipe.data, "train")[0]
print(json.dumps(dict(
    package=str(Path(areal.__file__).parent), printed=printed, model=recipe.model.path,
    train=recipe.data.train_path, test=recipe.data.test_path, model_type=config.model_type,
    prompt_ids=encode_prompt(row, 0, recipe.data, tokenizer)[1], row=row,
)))
"""


def test_installed_wheel_runs_the_bundled_recipe_from_any_directory(wheel, tmp_path):
    """Not editable: a fresh venv gets the wheel (--no-deps); the dev venv's packages are appended to its
    path by a .pth (not processed as a site dir, so the checkout's editable areal stays out of it)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_dev_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"  # no recipes/ or assets/ here
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), "-P", "-c", _INSTALLED_CHECK], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    package = Path(got["package"])
    assert package == site / "areal", got["package"]  # the installed copy, not the checkout
    assert (package / "recipes" / "math.yaml").is_file()
    for key, path in (("model", got["model"]), ("train", got["train"]), ("test", got["test"])):
        assert Path(path).is_absolute() and Path(path).exists(), (key, path)
        assert Path(path).is_relative_to(package / "assets"), (key, path)
    assert got["printed"]["model"]["path"] == got["model"]  # --dry-run resolves the same way
    assert got["printed"]["data"]["train_path"] == got["train"]
    assert got["model_type"] == "qwen2"
    assert set(got["row"]) >= {"question", "answer"} and got["prompt_ids"]
    with open(ROOT / "assets" / "data" / "arith" / "train.jsonl", encoding="utf-8") as f:
        assert got["row"] == json.loads(f.readline())  # the shipped first row, unchanged

    bad = subprocess.run([str(python), "-P", "-m", "areal.train", "recipe=nope", "--dry-run"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and ("bundled recipes: chain, gsm8k-qwen2.5-0.5b, gsm8k-qwen2.5-1.5b, math, "
                                    "math-qwen2.5-math-1.5b, r1-distill-qwen-1.5b") in bad.stderr, bad.stderr


def test_the_repo_roots_kernels_folder_does_not_shadow_hugging_faces_kernels_package():
    """transformers ≥ 5.25 imports Hugging Face's `kernels`; run from the repository root, the folder
    kernels/ (areal.kernels) is importable under that name too, and must hand the import over."""
    probe = ("import importlib.metadata as md, kernels, transformers.integrations.hub_kernels;"
             "print(kernels.__file__)")
    try:
        import importlib.metadata as md

        md.version("kernels")
    except md.PackageNotFoundError:  # older transformers: without the package, `import kernels` must fail
        probe = "import kernels"
        result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode != 0 and "No module named 'kernels'" in result.stderr
        return
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve().parent != ROOT / "kernels"
