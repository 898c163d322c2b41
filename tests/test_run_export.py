"""Every run leaves its trained model: run_dir/model loads in transformers and as the model of a
new areal run, whose greedy held-out accuracy is the first run's final accuracy."""

import json

import pytest
import torch

from areal.config import build
from areal.train import train
from areal.recipe import Recipe

SMALL = [
    "trainer.batch_size=4", "rollout.group_size=4", "data.eval_size=32", "logging.wandb.mode=disabled",
    "logging.progress_bar=false", "run.num_threads=1", "trainer.lr=1e-3",
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_exported_model_scores_the_runs_final_accuracy(tmp_path, mode):
    from transformers import AutoModelForCausalLM

    first = train(build(Recipe, "recipes/math.yaml", [*SMALL, f"run.mode={mode}", "trainer.steps=6", "run.eval_every=6",
                                                      "checkpoint.export_every=3", f"run.run_dir={tmp_path / 'train'}"]))
    model_dir = first.run_dir / "model"
    assert first.summary["model_dir"] == str(model_dir)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()}
    assert (first.run_dir / "exports" / "step_3" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained("assets/models/tiny-math", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), initial.state_dict().values()))

    again = train(build(Recipe, "recipes/math.yaml", [*SMALL, "run.mode=sync", "trainer.steps=0",
                                                      f"model.path={model_dir}", f"run.run_dir={tmp_path / 'eval'}"]))
    assert again.summary["eval_accuracy_initial"] == first.summary["eval_accuracy_final"]
    assert json.loads((again.run_dir / "summary.json").read_text())["resumed_from_step"] is None
