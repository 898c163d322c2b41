"""A short real run on the shipped model and data, and the bad inputs a run must name."""

import json
from pathlib import Path

import pytest

from areal.config import build
from areal.data import DataError
from areal.train import train
from areal.metrics import read_metrics
from areal.recipe import Recipe

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"
SMALL = [
    "trainer.steps=3", "trainer.batch_size=4", "rollout.group_size=4", "data.eval_size=16",
    "run.eval_every=2", "logging.wandb.mode=disabled", "logging.progress_bar=false", "run.num_threads=1",
]


def recipe(tmp_path, *extra):
    return build(Recipe, "recipes/math.yaml", [*SMALL, f"run.run_dir={tmp_path / 'run'}", *extra])


COMMON_KEYS = ("reward/mean", "reward/accuracy", "rollout/response_length", "train/loss", "train/clip_fraction",
               "train/importance_weight_mean", "rollout/tokens_per_s", "train/tokens_per_s", "time/train_s",
               "time/proximal_s", "time/step_s")
MODE_KEYS = {
    "sync": ("time/generate_s", "time/reward_s", "time/weight_sync_s"),
    "async": ("time/wait_for_batch_s", "staleness/lag_max", "staleness/lag_hist", "buffer/held_groups",
              "idle/trainer", "idle/rollout", "weights/bytes", "weights/transfer_s", "weights/pause_s_total",
              "rollout/prefill_tokens_saved"),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_short_run_writes_config_metrics_summary_and_report(tmp_path, mode):
    result = train(recipe(tmp_path, f"run.mode={mode}"))
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert build(Recipe, str(run / "config.yaml")) == recipe(tmp_path, f"run.mode={mode}")  # reloads as is
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records[1:]:
        for key in COMMON_KEYS + MODE_KEYS[mode]:
            assert key in r, key
        assert r["version"] == r["step"]
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[2] and "eval/accuracy" in records[3]
    if mode == "async":  # the engine prefills each group's prompt once and shares it
        assert records[-1]["rollout/prefill_tokens_saved"] > 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("eval_accuracy_initial", "eval_accuracy_final", "steps", "wall_seconds", "generated_tokens"):
        assert key in summary
    assert summary["steps"] == 3 and summary["generated_tokens"] > 0 and summary["mode"] == mode
    assert summary["eval_accuracy_final"] == records[-1]["eval/accuracy"]
    assert (run / "report.png").stat().st_size > 10_000


def test_a_failing_reward_never_stops_training(tmp_path):
    result = train(recipe(tmp_path, f"reward.fn={FIXTURES / 'bad_rewards.py'}:raising_reward", "reward.timeout_s=2"))
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(r["reward/mean"] == 0.0 for r in records[1:])
    assert records[1]["reward/failures_error"] == 16  # 4 prompts x 4 samples, each counted
    assert result.summary["reward_failures"]["error"] > 0


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*no-such-model"):
        train(recipe(tmp_path, f"model.path={tmp_path / 'no-such-model'}"))


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_path: file not found: .*missing.jsonl"):
        train(recipe(tmp_path, f"data.train_path={tmp_path / 'missing.jsonl'}"))


def test_prompt_longer_than_the_budget_names_the_row(tmp_path):
    with pytest.raises(DataError, match="prompt of row 0 has .* tokens, over data.max_prompt_tokens=5"):
        train(recipe(tmp_path, "data.max_prompt_tokens=5"))


def test_prompt_longer_than_the_context_names_the_row(tmp_path):
    # 250 of the model's 256 positions reserved for the completion: no prompt of the data fits the other 6
    with pytest.raises(DataError, match="train row 0: prompt of .* tokens does not fit the context"):
        train(recipe(tmp_path, "rollout.max_new_tokens=250"))


def test_missing_column_names_the_column(tmp_path):
    with pytest.raises(DataError, match="column 'problem' not in"):
        train(recipe(tmp_path, "data.prompt_key=problem"))


def test_unknown_reward_function_fails_before_training(tmp_path):
    with pytest.raises(Exception, match="no_such_fn"):
        train(recipe(tmp_path, f"reward.fn={FIXTURES / 'bad_rewards.py'}:no_such_fn"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
