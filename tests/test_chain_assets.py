"""The shipped chain-task assets (assets/data/chain, assets/models/tiny-chain, recipes/chain.yaml,
built by scripts/build_chain_assets.py): rows parse, splits are disjoint, the project's reward
scores the worked chain, and the model loads and writes a chain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from asset_helpers import load_model, read_rows

from areal.rewards.math import extract_answer, math_reward

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "models" / "tiny-chain"
DATA_DIR = ROOT / "assets" / "data" / "chain"
PROMPT = "Q: {question}\nA: "
ROW_QUESTION = re.compile(r"^What is (\d{2}) \+ (\d{2}) \+ (\d{2})\?$")
CHAIN = re.compile(r"^(\d+)\+(\d+)=(\d+), (\d+)\+(\d+)=(\d+)$")
MAX_NEW_TOKENS = 32


def _rows(split: str) -> list[dict]:
    return read_rows(DATA_DIR, split)


def _chain(row: dict) -> str:
    return row["answer"].split("####")[0].strip()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR)


def test_data_rows_parse_as_worked_chains_and_splits_are_disjoint():
    operands = {}
    for split, size in (("train", 4000), ("test", 500)):
        rows = _rows(split)
        assert len(rows) == size
        operands[split] = set()
        for row in rows:
            m = ROW_QUESTION.match(row["question"])
            assert m, row
            a, b, c = (int(x) for x in m.groups())
            assert row["answer"] == f"{a}+{b}={a + b}, {a + b}+{c}={a + b + c}\n#### {a + b + c}", row
            operands[split].add((a, b, c))
        assert len(operands[split]) == size  # no duplicate tuple inside a split
    assert not operands["train"] & operands["test"]


def test_reference_chains_are_15_to_30_tokens(tokenizer):
    lengths = [len(tokenizer(_chain(r))["input_ids"]) + 1 for r in _rows("test")]  # + eos
    assert 15 <= min(lengths) and max(lengths) <= 30, (min(lengths), max(lengths))
    assert max(lengths) <= MAX_NEW_TOKENS


def test_reward_scores_the_reference_chain_and_only_its_final_sum():
    for row in _rows("test")[:50] + _rows("train")[:50]:
        chain, total = _chain(row), int(row["answer"].split("####")[1])
        prompt = PROMPT.format(question=row["question"])
        assert extract_answer(chain) == str(total)  # the last number, not a "85, 85" thousands number
        assert math_reward(prompt, chain, answer=row["answer"]) == 1.0
        wrong = chain[: chain.rindex("=") + 1] + str(total + 1)
        assert math_reward(prompt, wrong, answer=row["answer"]) == 0.0
        first_step_only = chain.split(", ")[0]
        assert math_reward(prompt, first_step_only, answer=row["answer"]) == 0.0


def test_model_folder_weights_and_build_info(model, tokenizer):
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "BUILD_INFO.json"]:
        assert (MODEL_DIR / name).is_file(), name
    path = MODEL_DIR / "model.safetensors"
    assert path.stat().st_size < 4 * 2**20
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert model.config.model_type == "qwen2"
    info = json.loads((MODEL_DIR / "BUILD_INFO.json").read_text())
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert 0.2 <= info["test_greedy_accuracy"] <= 0.45  # partial skill: room for RL
    gen = GenerationConfig.from_pretrained(MODEL_DIR)
    for cfg in (model.config, gen):
        assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (1, 0, 2)
    assert gen.max_new_tokens >= MAX_NEW_TOKENS


def test_tokenizer_is_tiny_maths_character_tokenizer(tokenizer):
    math_tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "models" / "tiny-math")
    assert tokenizer.get_vocab() == math_tok.get_vocab()
    text = PROMPT.format(question="What is 37 + 48 + 16?") + "37+48=85, 85+16=101"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and ids == math_tok(text)["input_ids"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_greedy_completion_is_a_chain_and_some_are_right(model, tokenizer):
    rows = _rows("test")[:64]
    batch = tokenizer([PROMPT.format(question=r["question"]) for r in rows], return_tensors="pt")
    with torch.no_grad():  # prompts of three 2-digit operands all have the same length: no padding
        out = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    texts = [tokenizer.decode(ids[: ids.index(1)] if 1 in ids else ids, skip_special_tokens=True) for ids in new]
    assert CHAIN.match(texts[0]), texts[0]
    assert sum(bool(CHAIN.match(t)) for t in texts) >= 0.9 * len(texts), texts
    correct = sum(math_reward("", t, answer=r["answer"]) for t, r in zip(texts, rows))
    assert 0.1 * len(rows) <= correct <= 0.7 * len(rows), correct


def test_recipe_points_at_the_chain_assets():
    recipe = yaml.safe_load((ROOT / "recipes" / "chain.yaml").read_text())
    assert recipe["model"]["path"] == "assets/models/tiny-chain"
    for key in ("train_path", "test_path"):
        assert (ROOT / recipe["data"][key]).is_file()
    assert recipe["reward"]["fn"] == "areal.rewards.math:math_reward"
    assert recipe["rollout"]["max_new_tokens"] >= MAX_NEW_TOKENS
    assert recipe["rollout"]["eval_max_new_tokens"] >= MAX_NEW_TOKENS
