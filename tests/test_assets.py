"""The shipped default assets (assets/) load through the standard HF entry points and
have the promised properties: size, format, disjoint splits, and PARTIAL skill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from asset_helpers import load_model, read_rows

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL_DIR = ASSETS / "models" / "tiny-math"
DATA_DIR = ASSETS / "data" / "arith"
PROMPT = "Q: {question}\nA: "
ROW_QUESTION = re.compile(r"^What is (\d{2}) \+ (\d{2})\?$")


def _rows(split: str) -> list[dict]:
    return read_rows(DATA_DIR, split)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR)


def test_model_folder_has_the_expected_files():
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "BUILD_INFO.json"]:
        assert (MODEL_DIR / name).is_file(), name


def test_weights_are_small_and_fp32():
    path = MODEL_DIR / "model.safetensors"
    assert path.stat().st_size < 10 * 2**20
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}


def test_model_loads_with_param_count_in_range_and_special_ids(model, tokenizer):
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 1_000_000
    assert model.config.model_type == "qwen2"
    assert next(model.parameters()).dtype == torch.float32
    info = json.loads((MODEL_DIR / "BUILD_INFO.json").read_text())
    assert info["params"] == n
    gen = GenerationConfig.from_pretrained(MODEL_DIR)
    for cfg in (model.config, gen):
        assert cfg.eos_token_id == tokenizer.eos_token_id
        assert cfg.pad_token_id == tokenizer.pad_token_id
        assert cfg.bos_token_id == tokenizer.bos_token_id
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}) == 3
    assert model.config.vocab_size >= len(tokenizer)


def test_tokenizer_is_character_level_and_round_trips(tokenizer):
    text = PROMPT.format(question="What is 37 + 48?") + "85"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == text
    assert tokenizer.chat_template is None


def test_data_splits_parse_have_gsm8k_format_and_do_not_overlap():
    pairs = {}
    for split, size in (("train", 4000), ("test", 500)):
        rows = _rows(split)
        assert len(rows) == size
        pairs[split] = set()
        for row in rows:
            m = ROW_QUESTION.match(row["question"])
            assert m, row
            a, b = int(m.group(1)), int(m.group(2))
            assert row["answer"] == f"{a} + {b} = {a + b}\n#### {a + b}"
            pairs[split].add((a, b))
        assert len(pairs[split]) == size  # no duplicates inside a split
    assert not pairs["train"] & pairs["test"]


def test_data_loads_with_datasets_json():
    from datasets import load_dataset

    ds = load_dataset("json", data_files={s: str(DATA_DIR / f"{s}.jsonl") for s in ("train", "test")})
    assert ds["train"].num_rows == 4000 and ds["test"].num_rows == 500
    assert ds["test"][0]["answer"].split("####")[-1].strip() == str(eval(ds["test"][0]["question"][8:-1]))


def _answer_before_eos(new_ids: list[int], tokenizer) -> int | None:
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return int(text) if text.isdigit() else None


def test_shipped_model_has_partial_greedy_skill(model, tokenizer):
    rows = _rows("test")[:200]
    tokenizer.padding_side = "left"
    batch = tokenizer([PROMPT.format(question=r["question"]) for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=6)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    correct = sum(
        _answer_before_eos(ids, tokenizer) == int(r["answer"].split("####")[-1]) for ids, r in zip(new, rows)
    )
    acc = correct / len(rows)
    assert 0.2 <= acc <= 0.55, acc


def test_left_padded_generation_matches_unpadded(model, tokenizer):
    """A prompt generated alongside a longer one (so it is left padded) gets the same
    greedy answer as alone: pad id and attention mask are wired through generate()."""
    short = PROMPT.format(question="What is 37 + 48?")
    longer = PROMPT.format(question="What is 37 + 48? Think.")
    tokenizer.padding_side = "left"
    with torch.no_grad():
        alone = tokenizer([short], return_tensors="pt")
        ref = model.generate(**alone, do_sample=False, max_new_tokens=6)[0, alone["input_ids"].shape[1]:]
        both = tokenizer([short, longer], return_tensors="pt", padding=True)
        assert both["attention_mask"][0, 0] == 0  # the short prompt really is padded
        out = model.generate(**both, do_sample=False, max_new_tokens=6)[0, both["input_ids"].shape[1]:]
    assert out.tolist()[: len(ref)] == ref.tolist()
