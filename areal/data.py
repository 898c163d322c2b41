"""Prompt datasets: json/jsonl/parquet files or a hub name, loaded through `datasets`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal.options import option

class DataError(ValueError):
    """A dataset that cannot be used as configured; the message names the file, column or row."""


_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataConfig:
    train_path: str = option(
        "assets/data/arith/train.jsonl",
        "Training prompts: a .json/.jsonl/.parquet/.csv file, or a hub dataset name (e.g. openai/gsm8k).",
    )
    test_path: str = option("assets/data/arith/test.jsonl", "Held-out prompts for evaluation; same forms as train_path.")
    hub_config: str = option("", "Hub dataset config name (e.g. 'main' for openai/gsm8k).")
    train_split: str = option("train", "Split of train_path to use when it is a hub dataset.")
    test_split: str = option("test", "Split of test_path to use when it is a hub dataset.")
    prompt_key: str = option("question", "Column holding the question.")
    answer_key: str = option("answer", "Column holding the reference answer (passed to the reward as `answer`).")
    prompt_template: str = option(
        "Q: {question}\nA: ",
        "Python format string over the row's columns, giving the user message. With a chat "
        "template the message is wrapped by it; without one it is the raw prompt.",
    )
    use_chat_template: bool = option(True, "Wrap prompts with the tokenizer's chat template when it has one.")
    max_prompt_tokens: int = option(256, "Longest prompt accepted; a longer one is an error naming the row.")
    eval_size: int = option(500, "Held-out rows used for evaluation (0 = all).")
    shuffle_seed: int = option(0, "Seed of the training order (each epoch reshuffles from it).")


def _load_split(path: str, split: str, hub_config: str, key: str):
    import datasets

    p = Path(path)
    if p.suffix in _FILE_TYPES:
        if not p.is_file():
            raise FileNotFoundError(f"data.{key}: file not found: {p.resolve()}")
        return datasets.load_dataset(_FILE_TYPES[p.suffix], data_files=str(p), split="train")
    if p.exists():
        raise DataError(f"data.{key}: {p} is not a .json/.jsonl/.parquet/.csv file")
    if path.count("/") != 1:
        raise FileNotFoundError(f"data.{key}: file not found: {p.resolve()}")
    return datasets.load_dataset(path, hub_config or None, split=split)


def load_rows(cfg: DataConfig, which: str) -> list[dict[str, Any]]:
    """The rows of the train or test split, as plain dicts."""
    path, split = (cfg.train_path, cfg.train_split) if which == "train" else (cfg.test_path, cfg.test_split)
    ds = _load_split(path, split, cfg.hub_config, f"{which}_path")
    for col in (cfg.prompt_key, cfg.answer_key):
        if col not in ds.column_names:
            raise DataError(f"data: column '{col}' not in {path} (columns: {ds.column_names})")
    rows = ds.to_list()
    if which == "test" and cfg.eval_size:
        rows = rows[: cfg.eval_size]
    return rows


def format_prompt(row: dict[str, Any], cfg: DataConfig, tokenizer) -> str:
    try:
        message = cfg.prompt_template.format(**row)
    except KeyError as e:
        raise DataError(f"data.prompt_template uses column {e} that the row lacks (columns: {list(row)})") from None
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message


def encode_prompt(row: dict[str, Any], index: int, cfg: DataConfig, tokenizer) -> tuple[str, list[int]]:
    text = format_prompt(row, cfg, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) > cfg.max_prompt_tokens:
        raise DataError(
            f"prompt of row {index} has {len(ids)} tokens, over data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens}: {text[:120]!r}"
        )
    return text, ids


class PromptSampler:
    """Endless, reproducible, resumable walk over the training rows, reshuffled each epoch."""

    def __init__(self, rows: list[dict[str, Any]], seed: int):
        if not rows:
            raise DataError("data: the training split is empty")
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> tuple[int, dict[str, Any]]:
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._shuffled(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index, self.rows[index]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
