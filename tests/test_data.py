"""Data loading through `datasets`, prompt formatting, and the resumable prompt order."""

import json

import pytest
from transformers import AutoTokenizer

from areal.data import DataConfig, DataError, PromptSampler, encode_prompt, format_prompt, load_rows

MODEL = "assets/models/tiny-math"


def test_jsonl_and_parquet_load_the_same_rows(tmp_path):
    import datasets

    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}", "level": i % 3} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.parquet"):
        cfg = DataConfig(train_path=str(tmp_path / name))
        assert load_rows(cfg, "train") == rows


def test_eval_size_limits_the_test_split():
    assert len(load_rows(DataConfig(eval_size=7), "test")) == 7


def test_unsupported_file_and_missing_column_are_named(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"data.train_path: .*d.txt is not a .json"):
        load_rows(DataConfig(train_path=str(tmp_path / "d.txt")), "train")
    with pytest.raises(DataError, match=r"column 'problem' not in .*columns: \['question', 'answer'\]"):
        load_rows(DataConfig(prompt_key="problem"), "train")


def test_raw_template_without_chat_template():
    tok = AutoTokenizer.from_pretrained(MODEL)
    row = {"question": "What is 2 + 3?", "answer": "#### 5"}
    text, ids = encode_prompt(row, 0, DataConfig(), tok)
    assert text == "Q: What is 2 + 3?\nA: "
    assert tok.decode(ids) == text


def test_chat_template_wraps_the_message_when_the_tokenizer_has_one():
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    row = {"question": "What is 2 + 3?"}
    assert format_prompt(row, DataConfig(), tok) == "<user>Q: What is 2 + 3?\nA: <assistant>"
    assert format_prompt(row, DataConfig(use_chat_template=False), tok) == "Q: What is 2 + 3?\nA: "


def test_template_with_unknown_column_names_it():
    with pytest.raises(DataError, match=r"prompt_template uses column 'topic'"):
        format_prompt({"question": "q"}, DataConfig(prompt_template="{topic}: {question}"), None)


def test_sampler_is_reproducible_reshuffles_each_epoch_and_resumes():
    rows = [{"i": i} for i in range(5)]
    a = PromptSampler(rows, seed=3)
    first = [a.next()[0] for _ in range(5)]
    second = [a.next()[0] for _ in range(5)]
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    b = PromptSampler(rows, seed=3)
    assert [b.next()[0] for _ in range(5)] == first
    state = b.state()
    c = PromptSampler(rows, seed=3)
    c.load_state(state)
    assert [c.next()[0] for _ in range(5)] == second
