"""benchmarks/faults.py on a CI-sized subset: its own functions, real runs of the default recipe in
subprocesses: every reward misbehaviour once, and a corrupted newest checkpoint on resume. Each must be
survived with nothing lost or duplicated. (Rollout workers and trainer ranks killed, SIGTERM, a silent
rollout worker and failing checkpoint writes are in tests/test_roles.py and tests/test_resume.py; the
harness runs every fault 5 times.)"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("faults_harness", ROOT / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


faults = _harness()


@pytest.fixture(scope="module")
def setting_and_baseline(tmp_path_factory):
    # one fault-free seed, so the accuracy range is a point: a wider margin than the harness's default
    setting = faults.Setting(steps=12, every=3, seed=1, out=tmp_path_factory.mktemp("faults"), margin=0.1)
    return setting, faults.fault_free(setting, [1])


@pytest.mark.slow
@pytest.mark.parametrize("fault, injections", [("reward", 5), ("ckpt_corrupt", 1)])
def test_a_fault_is_survived_with_nothing_lost_or_duplicated(setting_and_baseline, fault, injections):
    setting, baseline = setting_and_baseline
    outcome = getattr(faults, fault)(setting, baseline, 1, random.Random(f"{setting.seed}-{fault}"))
    assert outcome.injections == injections, outcome.notes
    assert outcome.survived == injections, outcome.notes
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome.notes


def test_moments_are_seeded_increasing_and_apart():
    for seed in range(20):
        steps = faults.moments(random.Random(seed), 5, 8, 29, 3)
        assert steps == faults.moments(random.Random(seed), 5, 8, 29, 3)
        assert len(steps) == 5 and 8 <= steps[0] and steps[-1] < 29
        assert all(b - a >= 3 for a, b in zip(steps, steps[1:]))


def test_the_checks_find_a_lost_and_a_duplicated_group(tmp_path):
    """check_run on hand-made rows: group 3 trained twice, group 4 neither trained nor waiting."""
    import json

    rows = [{"step": 0}] + [{"step": s, "data/group_ids": ids, "train/loss": 0.1, "train/grad_norm": 1.0,
                             "reward/mean": 0.5} for s, ids in ((1, [0, 1]), (2, [2, 3]), (3, [3, 5]))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ledger = {"admitted": 8, "consumed": 6, "filtered": 0, "held": 1, "running": 1, "held_ids": [6],
              "running_ids": [7]}
    (tmp_path / "summary.json").write_text(json.dumps({"groups": ledger, "eval_accuracy_final": 0.5}))
    lost, duplicated, problems = faults.check_run(tmp_path, 3, faults.Baseline([0.5], 1.0, 0.0))
    assert (lost, duplicated) == (1, 1) and problems == []  # the counts alone add up: only the ids tell
