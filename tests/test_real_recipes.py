"""The bundled recipes for real models (recipes/*.yaml). Every bundled recipe resolves by its bare
name from any directory and passes `--dry-run` offline (a Slurm recipe prints its job script). Every
recipe that names a hub model trains 2 steps in a real `python -m areal.train` process on CPU, with
only the weights and sizes swapped by overrides: a tiny random Qwen2ForCausalLM whose tokenizer
has a chat template of the model's family, and local files of the recipe's dataset schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from areal.bundle import bundled_recipes, recipes_dir
from areal.config import build
from areal.data import encode_prompt, load_rows
from areal.recipe import Recipe
from areal.train import main

OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "OMP_NUM_THREADS": "1"}

# The chat templates the smoke runs' tokenizers carry: Qwen2.5's ChatML (with its default system turn)
# and DeepSeek-R1's, whose generation prompt opens the reasoning block.
CHATML = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
R1_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")

# Rows of each dataset's schema: GSM8K (question, answer ending "#### N"), MATH (problem, solution with
# \boxed{}), DeepScaleR (problem, answer, solution; one .json array) and MATH-500 (problem, answer, ...).
GSM8K = [{"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
          "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a in range(3, 9) for b in (2, 5)]
MATH = [{"problem": f"Compute $\\frac{{{a}}}{{{a + 1}}} + \\frac{{1}}{{{a + 1}}}$.", "level": "Level 1", "type": "Algebra",
         "solution": f"The sum is $\\frac{{{a}+1}}{{{a + 1}}} = \\boxed{{1}}$."} for a in range(2, 14)]
DEEPSCALER = [{"problem": f"Find $x$ if $2x = {a}$.", "answer": f"\\frac{{{a}}}{{2}}",
               "solution": f"Divide by 2: $x = \\frac{{{a}}}{{2}}$."} for a in range(1, 13)]
MATH500 = [{"problem": f"What is ${a} \\cdot 3$?", "solution": f"$\\boxed{{{3 * a}}}$", "answer": str(3 * a),
            "subject": "Prealgebra", "level": 1, "unique_id": f"test/prealgebra/{a}.json"} for a in range(1, 9)]

# recipe -> (tokenizer family, train file, test file); every hub-model recipe must be listed.
SMOKE = {
    "gsm8k-qwen2.5-0.5b": ("qwen", "gsm8k_train.jsonl", "gsm8k_test.jsonl"),
    "gsm8k-qwen2.5-1.5b": ("qwen", "gsm8k_train.jsonl", "gsm8k_test.jsonl"),
    "math-qwen2.5-math-1.5b": ("qwen", "math_train.jsonl", "math_test.jsonl"),
    "r1-distill-qwen-1.5b": ("r1", "deepscaler.json", "math500_test.jsonl"),
}

# Sizes and placement only: everything else comes from the recipe.
SMALL = [
    "model.dtype=float32", "data.eval_size=4", "rollout.max_new_tokens=16", "rollout.eval_max_new_tokens=16",
    "rollout.batch_size=64", "rollout.max_concurrent=8", "rollout.num_workers=1", "rollout.kv_blocks=1024",
    "reward.num_workers=1", "trainer.steps=2", "trainer.batch_size=4", "trainer.world_size=1",
    "trainer.max_tokens_per_microbatch=4096", "launcher.type=local", "run.device=cpu",
    "logging.wandb.mode=disabled", "logging.progress_bar=false",
]


def _recipe_yaml(name: str) -> dict:
    return yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text())


def _hub_model_recipes() -> list[str]:
    return [n for n in bundled_recipes() if not _recipe_yaml(n)["model"]["path"].startswith("assets/")]


def test_every_hub_model_recipe_has_a_smoke_run():
    assert sorted(_hub_model_recipes()) == sorted(SMOKE)


@pytest.mark.parametrize("name", bundled_recipes())
def test_bundled_recipe_dry_runs_offline_by_bare_name(name, tmp_path, monkeypatch, capsys):
    """`python -m areal.train recipe=NAME --dry-run` (its `main`, in process: a subprocess per recipe
    would cost ~1.5 s of imports each) from a directory without recipes/, with the hub unreachable."""
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    assert main([f"recipe={name}", "--dry-run"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    raw = _recipe_yaml(name)
    if raw.get("launcher", {}).get("type") == "slurm":  # the job script, naming the recipe's allocation
        assert printed.startswith("#!/bin/bash\n")
        assert f"#SBATCH --gpus-per-node={raw['launcher']['slurm']['gpus_per_node']}" in printed
        assert f"#SBATCH --job-name={raw['launcher']['slurm']['job_name']}" in printed
    else:  # the resolved recipe
        resolved = yaml.safe_load(printed)
        assert resolved["model"]["path"].endswith(raw["model"]["path"])  # bundled assets resolve to absolute paths
        assert resolved["trainer"]["steps"] == raw["trainer"]["steps"]
        assert resolved["launcher"]["type"] == raw.get("launcher", {}).get("type", "local")
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


@pytest.fixture(scope="module")
def smoke_assets(tmp_path_factory):
    """Two tiny random Qwen2 models (one per chat template) and the local data files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    root = tmp_path_factory.mktemp("smoke")
    # the shipped byte-level BPE encodes any text, LaTeX and the R1 template's full-width bars included
    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets" / "models" / "tiny-math")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    for family, template in (("qwen", CHATML), ("r1", R1_TEMPLATE)):
        tokenizer.chat_template = template
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    for file, rows in (("gsm8k_train.jsonl", GSM8K), ("gsm8k_test.jsonl", GSM8K[:4]), ("math_train.jsonl", MATH),
                       ("math_test.jsonl", MATH[:4]), ("math500_test.jsonl", MATH500)):
        (root / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "deepscaler.json").write_text(json.dumps(DEEPSCALER))  # one JSON array, as the hub file is
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_real_model_recipe_trains_two_steps_on_cpu(name, smoke_assets, tmp_path):
    family, train_file, test_file = SMOKE[name]
    run_dir = tmp_path / "run"
    overrides = [f"model.path={smoke_assets / family}", f"data.train_path={smoke_assets / train_file}",
                 f"data.test_path={smoke_assets / test_file}", *SMALL, f"run.run_dir={run_dir}"]

    # The prompts take the recipe's chat-template path and fit its max_prompt_tokens.
    recipe = build(Recipe, name, overrides)
    assert recipe.data.use_chat_template and recipe.rollout.group_size == _recipe_yaml(name)["rollout"]["group_size"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    text, _ = encode_prompt(load_rows(recipe.data, "train")[0], 0, recipe.data, tokenizer)
    opening = {"qwen": "<|im_start|>system\n", "r1": "<bos><｜User｜>"}[family]
    closing = {"qwen": "<|im_end|>\n<|im_start|>assistant\n", "r1": "<｜Assistant｜><think>\n"}[family]
    assert text.startswith(opening) and text.endswith(closing) and "\\boxed{}" in text

    out = subprocess.run([sys.executable, "-m", "areal.train", f"recipe={name}", *overrides], cwd=tmp_path,
                         env=OFFLINE_ENV, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["mode"] == "async" and summary["reward_failures"]["error"] == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the initial evaluation, then one row per training step
    exported = {p.name for p in (run_dir / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported
    assert json.loads((run_dir / "model" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["prompt_template"] == _recipe_yaml(name)["data"]["prompt_template"]
