"""The wheel installs the one import root `areal` with the component folders beneath it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        check=True, timeout=600,
    )
    (path,) = out.glob("areal-*.whl")
    return path


def test_wheel_maps_components_under_areal(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"areal"}, tops  # no bare kernels/, buffer/, rollout/ or trainer/
    for sub in ("rollout", "trainer", "buffer", "kernels", "rewards"):
        assert f"areal/{sub}/__init__.py" in names


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
