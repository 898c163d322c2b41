"""A short real run on the shipped model and data (its files, and the model it leaves), and the bad inputs a
run must name."""

import json
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module", params=["sync", "async"])
def short_run(request, tmp_path_factory):
    """One short run per mode, checked by the tests below: (mode, its recipe, its result). It exports every 2
    steps too, at a learning rate that surely moves the weights."""
    mode = request.param
    cfg = recipe(tmp_path_factory.mktemp(f"short_{mode}"), f"run.mode={mode}", "trainer.lr=1e-3",
                 "checkpoint.export_every=2")
    return mode, cfg, train(cfg)


def test_short_run_writes_config_metrics_summary_and_report(short_run):
    mode, cfg, result = short_run
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert build(Recipe, str(run / "config.yaml")) == cfg  # reloads as is
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


@pytest.mark.slow
def test_the_exported_model_scores_the_runs_final_accuracy(short_run, tmp_path):
    """Every run leaves its trained model: run_dir/model loads in transformers and as the model of a new areal
    run, whose greedy held-out accuracy is the first run's final accuracy."""
    from transformers import AutoModelForCausalLM

    _, _, first = short_run
    model_dir = first.run_dir / "model"
    assert first.summary["model_dir"] == str(model_dir)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()}
    assert (first.run_dir / "exports" / "step_2" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained("assets/models/tiny-math", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), initial.state_dict().values()))

    again = train(build(Recipe, "recipes/math.yaml", [*SMALL, "run.mode=sync", "trainer.steps=0",
                                                      f"model.path={model_dir}", f"run.run_dir={tmp_path / 'eval'}"]))
    assert again.summary["eval_accuracy_initial"] == first.summary["eval_accuracy_final"]
    assert json.loads((again.run_dir / "summary.json").read_text())["resumed_from_step"] is None


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
