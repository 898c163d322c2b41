"""Prompt datasets: .jsonl/.json files (read with the json module), .parquet/.csv files and hub
names (read through `datasets`).

Every row is checked when the data is loaded, before any work: a file that cannot be parsed (a line
that is not JSON, bytes that are not UTF-8, a broken parquet) or a row without a usable prompt (the
prompt column missing, empty or not text; no answer) is one DataError naming the key, the file and the
row, and the line for .jsonl files. Rows count from 0, as `datasets` indexes them; blank lines of a
.jsonl file are skipped. A prompt over data.max_prompt_tokens or the model's context is an error naming
its row too (as verl's default, truncation='error'): nothing is dropped or cut silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal.hub import is_hub_name
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


def template_problem(template: str) -> str | None:
    """What is wrong with a prompt template before any row meets it, or None."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:  # a lone { or }
        return f"{e} in {template!r} (write {{{{ and }}}} for literal braces)"
    if not fields:
        return (f"{template!r} names no column, so every prompt would be the same; put the question's column in "
                "braces, e.g. 'Q: {question}'")
    for field in fields:
        if not field or field.split(".")[0].split("[")[0].isdigit():
            return f"{{{field}}} in {template!r} is positional; name a column, e.g. {{question}}"
    return None


@contextlib.contextmanager
def _quiet_datasets(progress: bool):
    """datasets logs a parse failure before raising it: the error we raise says it once, in one line. Reading
    a local file takes a second at most: no progress bars either (a hub download keeps them)."""
    from datasets.utils import logging as ds_logging

    logger, bars_were_on = logging.getLogger("datasets"), ds_logging.is_progress_bar_enabled()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    if not progress:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            ds_logging.enable_progress_bar()


def _jsonl_lines(p: Path):
    """(line number, raw bytes) of each non-blank line of a .jsonl file: one row each, in order."""
    with p.open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def _not_utf8(e: UnicodeDecodeError, data: bytes, line: int) -> str:
    return f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})"


def _read_json_rows(p: Path, key: str) -> list[dict[str, Any]]:
    """A .jsonl file (one object per line) or a .json file (one array of objects), read with the json module
    rather than datasets: each row as written (datasets fills a key a row lacks with None and casts mixed
    types), and a bad record named by its line."""
    def bad(detail: str) -> DataError:
        return DataError(f"data.{key}: {p} {detail}")

    if p.suffix == ".jsonl":
        rows = []
        for number, line in _jsonl_lines(p):
            try:
                record = json.loads(line.decode("utf-8-sig"))  # -sig: a byte-order mark opening the file
            except UnicodeDecodeError as e:
                raise bad(_not_utf8(e, line, number)) from None
            except json.JSONDecodeError as e:
                raise bad(f"line {number}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise bad(f"line {number}: a JSON {type(record).__name__}, not an object of columns")
            rows.append(record)
        return rows
    data = p.read_bytes()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise bad(_not_utf8(e, data, data[: e.start].count(b"\n") + 1)) from None
    except json.JSONDecodeError as e:
        raise bad(f"line {e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise bad("must hold one JSON array of objects (one per row)")
    return records


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost error (datasets wraps pyarrow's and pandas', which name the row)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load_file(p: Path, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    if p.suffix in (".json", ".jsonl"):
        rows = _read_json_rows(p, key)
        return list(dict.fromkeys(k for row in rows for k in row)), rows
    import datasets

    try:
        with _quiet_datasets(progress=False):
            ds = datasets.load_dataset(_FILE_TYPES[p.suffix], data_files=str(p), split="train")
            return ds.column_names, ds.to_list()
    except Exception as e:  # noqa: BLE001 - whatever stops datasets parsing the file is the file's fault
        raise DataError(f"data.{key}: {p} could not be read: {_root_cause(e)}") from None


def _load_hub(path: str, split: str, hub_config: str, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    import datasets

    try:
        with _quiet_datasets(progress=True):
            ds = datasets.load_dataset(path, hub_config or None, split=split)
            return ds.column_names, ds.to_list()
    except (OSError, ValueError) as e:  # unreachable and not cached, no such dataset, config or split
        raise DataError(f"data.{key}: hub dataset '{path}' (data.hub_config={hub_config!r}, split {split!r}) could "
                        f"not be loaded: {_root_cause(e)}") from None


def check_data_path(path: str, key: str) -> None:
    """A data file that exists, or a hub name; else one error naming data.<key>."""
    p = Path(path)
    if p.suffix in _FILE_TYPES:
        if not p.is_file():
            raise FileNotFoundError(f"data.{key}: file not found: {p.resolve()}")
        return
    if p.exists():
        raise DataError(f"data.{key}: {p} is not a .json/.jsonl/.parquet/.csv file")
    if not is_hub_name(path):
        raise FileNotFoundError(f"data.{key}: file not found: {p.resolve()}")


def _load_split(path: str, split: str, hub_config: str, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a file or a hub dataset's split."""
    check_data_path(path, key)
    if Path(path).suffix in _FILE_TYPES:
        return _load_file(Path(path), key)
    return _load_hub(path, split, hub_config, key)


def row_source(cfg: DataConfig, which: str, index: int) -> str:
    """Where row `index` of the train or test data comes from: 'data.train_path FILE, line 4' (the line for .jsonl)."""
    path = cfg.train_path if which == "train" else cfg.test_path
    line = ""
    if Path(path).suffix == ".jsonl" and Path(path).is_file():
        for i, (number, _) in enumerate(_jsonl_lines(Path(path))):
            if i == index:
                line = f", line {number}"
                break
    return f"data.{which}_path {path}{line}"


def row_problem(row: dict[str, Any], cfg: DataConfig) -> str | None:
    """What makes a row unusable as a prompt, or None."""
    prompt = row.get(cfg.prompt_key)
    if prompt is None:
        return f"no '{cfg.prompt_key}' value (data.prompt_key)"
    if not isinstance(prompt, str):
        return f"'{cfg.prompt_key}' is {repr(prompt)[:60]} ({type(prompt).__name__}), not text"
    if not prompt.strip():
        return f"'{cfg.prompt_key}' is empty"
    if row.get(cfg.answer_key) is None:
        return f"no '{cfg.answer_key}' value (data.answer_key)"
    return None


def load_rows(cfg: DataConfig, which: str) -> list[dict[str, Any]]:
    """The rows of the train or test split, as plain dicts; every row checked (module docstring)."""
    path, split = (cfg.train_path, cfg.train_split) if which == "train" else (cfg.test_path, cfg.test_split)
    columns, rows = _load_split(path, split, cfg.hub_config, f"{which}_path")
    if not rows:
        raise DataError(f"data.{which}_path: {path} has no rows")
    for col in (cfg.prompt_key, cfg.answer_key):
        if col not in columns:
            key = "prompt_key" if col == cfg.prompt_key else "answer_key"
            raise DataError(f"data.{key}: column '{col}' not in {path} (columns: {columns})")
    if which == "test" and cfg.eval_size:
        rows = rows[: cfg.eval_size]
    for i, row in enumerate(rows):
        if (problem := row_problem(row, cfg)) is not None:
            raise DataError(f"{which} row {i} ({row_source(cfg, which, i)}): {problem}")
    return rows


def format_prompt(row: dict[str, Any], cfg: DataConfig, tokenizer) -> str:
    try:
        message = cfg.prompt_template.format(**row)
    except KeyError as e:
        raise DataError(f"data.prompt_template uses column {e} that the row lacks (columns: {list(row)})") from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:  # e.g. a format spec the value cannot take
        raise DataError(f"data.prompt_template {cfg.prompt_template!r} cannot format the row: {e}") from None
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message


def encode_prompt(row: dict[str, Any], index: int, cfg: DataConfig, tokenizer) -> tuple[str, list[int]]:
    text = format_prompt(row, cfg, tokenizer)
    # verbose=False: an over-long prompt is our error below, not also the tokenizer's warning
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
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
