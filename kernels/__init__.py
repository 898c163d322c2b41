"""GPU kernels, each a PyTorch reference beside its Triton version; installed as `areal.kernels`.

Run from the repository root, Python can also import this folder as a top-level `kernels`, which
would shadow Hugging Face's `kernels` package (a dependency of transformers ≥ 5.25, imported as soon
as a model loads). Imported under that name, this file hands the import over to that package, or
fails as the import of a missing package does.
"""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    _repo_root = Path(__file__).resolve().parents[1]
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _repo_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
