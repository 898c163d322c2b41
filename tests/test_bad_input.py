"""Bad input, fuzzed: every recipe override and every data row either runs or fails before any work
with one line naming its key, file or row (exit code 2 from the CLI), never a traceback.

Most examples go through the in-process paths (`areal.train.parse_args`, `areal.data.load_rows` and
`areal.setup.prepare_prompts`); a few run the real `python -m areal.train` / `python -m areal.plan`.
A recipe that passes validation must also build the parts that consume it: the sampling parameters,
admission control, buffer and reward settings, the optimizer and its schedule, the loss and the
advantages (which must carry a signal), the micro-batch packer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from areal.config import ConfigError, all_keys, leaf_type
from areal.data import DataConfig, DataError, load_rows
from areal.recipe import Recipe, get_key
from areal.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
KEYS = all_keys(Recipe)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------ recipe overrides

def typed_values(tp) -> st.SearchStrategy:
    """Values of the key's own type, edges included (what a user means to type)."""
    if tp is int:
        return st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from([2**63 - 1, 2**63, -2**63]))
    if tp is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.just(10**400))
    if tp is bool:
        return st.booleans()
    return st.text(max_size=12)


def as_override_text(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")  # YAML's spellings
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# Anything at all typed after `=`: YAML scalars, lists, mappings, broken YAML, odd characters.
ANY_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "null", "~", "[1, 2", "{a: 1}", "[a, b]", "Q: {problem}", "x: y: z", "${nope}", "0x10",
                     "!!python/object:os.system", "1e999", "-", "'quoted'", "\"a\\nb\"", "yes", "0", "-1", "\x00"]),
)


@st.composite
def overrides(draw) -> list[str]:
    """1-3 overrides: a real key with a value of its type or any text, now and then a misspelt key."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.integers(0, 9)) == 0:  # misspelt: a letter dropped or doubled, a section alone
            i = draw(st.integers(0, len(key) - 1))
            key = draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + key[i] + key[i:], key.split(".")[0]]))
        value = draw(st.one_of(typed_values(leaf_type(Recipe, key)).map(as_override_text), ANY_TEXT))
        out.append(f"{key}={value}")
    return out


def parts_accept(r: Recipe) -> None:
    """The parts a run builds from its recipe, built from this one: each raises on a value it cannot use."""
    from areal.buffer.config import BufferConfig
    from areal.buffer.staleness import StalenessController
    from areal.data import PromptSampler
    from areal.rewards.config import RewardConfig
    from areal.setup import sampling_params
    from areal.trainer.advantages import GROUP_METHODS, group_advantages, overlong_penalty
    from areal.trainer.backends import make_optimizer
    from areal.trainer.loss import decoupled_ppo_loss
    from areal.trainer.packing import balanced_partition

    ro, tr = r.rollout, r.trainer
    sampling_params(r)
    StalenessController(tr.batch_size, ro.max_staleness, ro.max_concurrent)
    BufferConfig(**dataclasses.asdict(r.buffer))
    RewardConfig(**dataclasses.asdict(r.reward))
    PromptSampler([{"question": "q"}], r.data.shuffle_seed).next()
    torch.Generator().manual_seed(r.run.seed)

    weight = torch.zeros(2, requires_grad=True)
    optimizer, schedule = make_optimizer([weight], tr)
    for _ in range(3):
        assert all(math.isfinite(g["lr"]) and g["lr"] > 0 for g in optimizer.param_groups)
        optimizer.step()
        schedule.step()

    if tr.advantage in GROUP_METHODS:  # a group whose rewards differ must carry a learning signal
        n = min(ro.group_size, 64)  # sizes past memory are not checked (see the README)
        advantages = group_advantages(torch.arange(float(n)).reshape(1, -1), tr.advantage)
        assert advantages.abs().sum() > 0, f"{tr.advantage} with group_size {ro.group_size} gives no signal"
    if tr.overlong_buffer:
        lengths = torch.tensor([1, ro.max_new_tokens])
        overlong_penalty(lengths, ro.max_new_tokens, tr.overlong_buffer, tr.overlong_penalty)
    logprobs = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    loss, _ = decoupled_ppo_loss(
        logprobs, logprobs.detach() + 0.1, logprobs.detach() - 0.1, torch.tensor([[1.0, -1.0, 0.5]]),
        torch.ones(1, 3, dtype=torch.bool), eps_clip_low=tr.eps_clip_low, eps_clip_high=tr.eps_clip_high,
        behaviour_weight_cap=tr.behaviour_weight_cap or None, behaviour_weight_mode=tr.behaviour_weight_mode,
        dual_clip=tr.dual_clip or None, aggregation=tr.aggregation, max_tokens_norm=ro.max_new_tokens)
    assert torch.isfinite(loss)
    assert sorted(i for b in balanced_partition([3, 5, 8], tr.max_tokens_per_microbatch) for i in b) == [0, 1, 2]


@FUZZ
@given(overrides())
def test_any_override_is_accepted_and_usable_or_one_line_naming_its_key(args):
    try:
        recipe, _, _ = parse_args(["recipe=math", *args])
    except ConfigError as e:
        msg = one_line(e)
        keys = [a.split("=", 1)[0].strip() for a in args]
        assert any(k and k in msg for k in keys), f"{args}: {msg}"
        return
    parts_accept(recipe)


# key=value -> the start of the error (each check the recipe makes, and the new user's cases)
REJECTED = {
    "rollout.max_staleness=-1": "rollout.max_staleness: must be >= 0",
    "rollout.group_size=1": "rollout.group_size: 1 sample per prompt gives trainer.advantage=grpo no signal",
    "trainer.minibatches=32": "trainer.minibatches: 32 minibatches of trainer.batch_size=16",
    "trainer.minibatches=3": "trainer.minibatches: 3 must divide trainer.batch_size=16",
    "trainer.batch_size=0": "trainer.batch_size: must be >= 1",
    "trainer.lr=0": "trainer.lr: must be > 0",
    "trainer.lr=-1e-5": "trainer.lr: must be > 0",
    "trainer.lr=.nan": "trainer.lr: must be a finite number",
    "trainer.lr=1e999": "trainer.lr: must be a finite number",
    "trainer.weight_decay=-0.1": "trainer.weight_decay: must be >= 0",
    "trainer.betas=[0.9]": "trainer.betas: must be two numbers in [0, 1)",
    "trainer.betas=[0.9, 1.0]": "trainer.betas: must be two numbers in [0, 1)",
    "trainer.eps_clip_low=1": "trainer.eps_clip_low: must be < 1",
    "trainer.dual_clip=0.5": "trainer.dual_clip: must be 0 (off) or > 1",
    "trainer.behaviour_weight_cap=0.5": "trainer.behaviour_weight_cap: must be 0 (no cap) or >= 1",
    "trainer.overlong_buffer=7": "trainer.overlong_buffer: 7 tokens is longer than rollout.max_new_tokens=6",
    "trainer.gae_lambda=1.5": "trainer.gae_lambda: must be <= 1",
    "trainer.max_tokens_per_microbatch=0": "trainer.max_tokens_per_microbatch: must be >= 1",
    "trainer.steps=-1": "trainer.steps: must be >= 0",
    "trainer.steps=99999999999999999999": "trainer.steps: 99999999999999999999 does not fit a 64-bit integer",
    "rollout.temperature=0": "rollout.temperature: must be > 0",
    "rollout.top_p=1.5": "rollout.top_p: must be <= 1",
    "rollout.top_k=-1": "rollout.top_k: must be >= 0",
    "rollout.max_new_tokens=0": "rollout.max_new_tokens: must be >= 1",
    "rollout.max_concurrent=0": "rollout.max_concurrent: must be >= 1",
    "rollout.num_workers=0": "rollout.num_workers: must be >= 1",
    "rollout.kv_blocks=0": "rollout.kv_blocks: must be >= 1",
    "rollout.max_new_tokens=40000": "rollout.kv_blocks: 2048 blocks x rollout.kv_block_size=16 tokens cannot hold one "
                                    "prompt and a completion of rollout.max_new_tokens=40000 tokens",
    "rollout.stop=['']": "rollout.stop[0]: an empty stop string",
    "reward.num_workers=0": "reward.num_workers: must be >= 1",
    "reward.timeout_s=0": "reward.timeout_s: must be > 0",
    "reward.fn=": "reward.fn: must not be empty",
    "buffer.capacity_groups=8": "buffer.capacity_groups: 8 cannot hold one step's trainer.batch_size=16 groups",
    "checkpoint.keep_last=0": "checkpoint.keep_last: must be >= 1",
    "checkpoint.every_seconds=-1": "checkpoint.every_seconds: must be >= 0",
    "run.eval_every=0": "run.eval_every: must be >= 1",
    "run.role_timeout_s=0": "run.role_timeout_s: must be > 0",
    "run.seed=-1": "run.seed: must be >= 0",
    "model.path=": "model.path: must not be empty",
    "data.max_prompt_tokens=0": "data.max_prompt_tokens: must be >= 1",
    "data.prompt_key= ": "data.prompt_key: must not be empty",
    "data.prompt_template=Q: {": "data.prompt_template: Single '{' encountered",
    "data.prompt_template=Q: {}": "data.prompt_template: {} in 'Q: {}' is positional",
    "data.prompt_template=no column": "data.prompt_template: 'no column' names no column",
    "launcher.slurm.nodes=0": "launcher.slurm.nodes: must be >= 1",
    "launcher.trainer.cpus=0": "launcher.trainer.cpus: must be >= 1",
    "trainer.world_size=2": "trainer.world_size: several trainer ranks need run.mode=async",  # with run.mode=sync
}


@pytest.mark.parametrize("override", sorted(REJECTED))
def test_each_range_and_conflict_check_names_its_key(override):
    extra = ["run.mode=sync"] if override.startswith("trainer.world_size") else []
    with pytest.raises(ConfigError) as e:
        parse_args(["recipe=math", override, *extra])
    assert one_line(e.value).startswith(REJECTED[override])


def test_group_size_1_is_fine_where_advantages_are_not_group_relative():
    for advantage in ("reinforce_pp", "ppo_gae"):
        recipe, _, _ = parse_args(["recipe=math", "rollout.group_size=1", f"trainer.advantage={advantage}"])
        parts_accept(recipe)


@FUZZ
@given(st.sampled_from([k for k in KEYS if leaf_type(Recipe, k) is str]), ANY_TEXT)
def test_text_keys_take_the_text_as_typed(key, text):
    """A text key never fails for YAML's sake: `Q: {problem}` is the template, not a mapping."""
    try:
        recipe, _, _ = parse_args(["recipe=math", f"{key}={text}"])
    except ConfigError as e:  # a check on the value itself (choices, empty, template), naming the key
        assert one_line(e).startswith(f"{key}: "), str(e)
        return
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        parsed = text
    assert get_key(recipe, key) == (parsed if isinstance(parsed, str) else text)


def test_the_new_users_template_is_taken_as_written():
    recipe, _, _ = parse_args(["recipe=math", "data.prompt_template=Q: {problem}", "data.prompt_key=problem"])
    assert recipe.data.prompt_template == "Q: {problem}"


yaml_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(), st.text(max_size=8),
                      st.lists(st.integers(), max_size=3))
yaml_doc = st.recursive(yaml_leaf, lambda inner: st.dictionaries(
    st.one_of(st.sampled_from(sorted({k.split(".")[0] for k in KEYS} | {k.rsplit(".", 1)[-1] for k in KEYS})),
              st.text(max_size=6)), inner, max_size=4), max_leaves=12)


@FUZZ
@given(yaml_doc)
def test_any_recipe_file_is_accepted_or_one_line(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        parse_args([f"recipe={path}"])
    except ConfigError as e:
        one_line(e)


# ------------------------------------------------------------------ data rows

@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    """The shipped tokenizer, the default recipe, and datasets' cache (parquet) in a temporary folder."""
    import datasets
    from transformers import AutoTokenizer

    cache, saved = tmp_path_factory.mktemp("ds-cache"), datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    yield AutoTokenizer.from_pretrained(ROOT / "assets" / "models" / "tiny-math"), parse_args(["recipe=math"])[0]
    datasets.config.HF_DATASETS_CACHE = saved


GOOD, LONG = "What is 2 + 3?", "ab c" * 1500  # LONG: thousands of tokens, over max_prompt_tokens=256
prompts = st.one_of(st.just(GOOD), st.just(LONG), st.none(), st.just(""), st.just("   "), st.integers(),
                    st.lists(st.text(max_size=3), max_size=2), st.text(min_size=1, max_size=30).filter(str.strip))
answers = st.one_of(st.just("#### 5"), st.none(), st.integers(), st.just("9" * 1_000_000), st.text(max_size=10))


@st.composite
def data_files(draw):
    """Rows (a column may be missing from a row), written as .jsonl, maybe with bytes that are not UTF-8 or a
    line that is not JSON: (the lines as bytes, the rows, how a line is broken or None, which line)."""
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        row = {}
        if draw(st.integers(0, 7)):
            row["question"] = draw(prompts)
        if draw(st.integers(0, 7)):
            row["answer"] = draw(answers)
        rows.append(row)
    lines = [json.dumps(r).encode() for r in rows]
    broken = draw(st.sampled_from([None, None, "utf8", "json"]))
    at = draw(st.integers(0, len(lines) - 1))
    if broken == "utf8":
        lines[at] = lines[at][:1] + b'"x\xff\xfe": 1, ' + lines[at][1:]
    elif broken == "json":
        lines[at] = lines[at][:-1]  # the closing brace gone
    return lines, rows, broken, at


def expected_bad_row(rows, tokenizer) -> int | None:
    """The first row a run cannot use, by this test's own reading of the rules: rows are read whole first
    (a prompt that is not text, or no answer), then encoded (a prompt over 256 tokens)."""
    for i, row in enumerate(rows):
        q = row.get("question")
        if not isinstance(q, str) or not q.strip() or row.get("answer") is None:
            return i
    for i, row in enumerate(rows):
        if len(tokenizer(f"Q: {row['question']}\nA: ", verbose=False)["input_ids"]) > 256:
            return i
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_files())
def test_any_data_file_loads_or_names_file_and_row(data_env, tmp_path_factory, drawn):
    from areal.setup import prepare_prompts

    tokenizer, base = data_env
    lines, rows, broken, at = drawn
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    recipe = dataclasses.replace(base, data=dataclasses.replace(base.data, train_path=str(path)))
    try:
        prompts_ = prepare_prompts(load_rows(recipe.data, "train"), recipe, tokenizer, 256, "train")
    except DataError as e:
        msg = one_line(e)
        assert str(path) in msg, msg
        if broken:
            assert f"line {at + 1}: not {'UTF-8' if broken == 'utf8' else 'JSON'}" in msg, msg
            return
        missing = re.match(r"data.(prompt|answer)_key: column '(\w+)' not in ", msg)
        if missing:  # a column no row has
            assert not any(missing[2] in r for r in rows), msg
            return
        bad = expected_bad_row(rows, tokenizer)
        assert bad is not None and f"train row {bad} " in msg and f"line {bad + 1}" in msg, (msg, rows)
        return
    assert not broken and expected_bad_row(rows, tokenizer) is None
    assert [p.index for p in prompts_] == list(range(len(rows)))


def test_rows_of_parquet_and_json_files_are_named(tmp_path, data_env):
    import datasets

    rows = [{"question": GOOD, "answer": "1"}, {"question": GOOD, "answer": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "bad.json").write_bytes(b'[{"question": "a",\n "answer": "\xff"}]')
    for name in ("d.parquet", "d.json"):
        with pytest.raises(DataError, match=rf"^train row 1 \(data.train_path .*{name}\): no 'answer' value"):
            load_rows(DataConfig(train_path=str(tmp_path / name)), "train")
    with pytest.raises(DataError, match=r"^data.test_path: .*bad.json line 2: not UTF-8 text \(byte 0xff\)$"):
        load_rows(DataConfig(test_path=str(tmp_path / "bad.json")), "test")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"^data.test_path: .*empty.jsonl has no rows$"):
        load_rows(DataConfig(test_path=str(tmp_path / "empty.jsonl")), "test")


def test_check_inputs_takes_every_row_before_the_weights(tmp_path):
    """The whole chain a run starts with (tokenizer, model config, both splits): a bad row names itself."""
    from areal.setup import check_inputs

    rows = [{"question": GOOD, "answer": "5", "topic": "sums"}, {"question": GOOD, "answer": "5"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = parse_args(["recipe=math", f"data.train_path={tmp_path / 't.jsonl'}",
                         "data.prompt_template={topic}: {question}"])[0]
    with pytest.raises(DataError, match=r"^train row 1 \(data.train_path .*t.jsonl, line 2\): data.prompt_template "
                                        r"uses column 'topic' that the row lacks"):
        check_inputs(recipe)
    with pytest.raises(ConfigError, match=r"^rollout.max_new_tokens: 300 leaves no room for a prompt in the model's "
                                          r"context of 256 positions$"):
        check_inputs(parse_args(["recipe=math", "rollout.max_new_tokens=300", "rollout.eval_max_new_tokens=300"])[0])


# ------------------------------------------------------------------ the real command line

def run_cli(module: str, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=240)  # a guard against a hang, not a timing check


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("rollout.max_staleness=-1", "error: rollout.max_staleness: must be >= 0, got -1"),
    ("rollout.group_size=1", "error: rollout.group_size: 1 sample per prompt"),
])
def test_cli_dry_run_rejects_in_one_line(override, expected, tmp_path):
    assert_one_line_exit_2(run_cli("areal.train", ["recipe=math.yaml", override, "--dry-run"], tmp_path), expected)


def test_cli_dry_run_takes_the_template_as_typed(tmp_path):
    proc = run_cli("areal.train", ["recipe=math", "data.prompt_template=Q: {problem}", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["data"]["prompt_template"] == "Q: {problem}"


@pytest.mark.parametrize("override, offline", [("model.path=Qwen/Qwen2.5-0.5B-Instruct", "1"),
                                               ("data.train_path=openai/gsm8k", None)])
def test_cli_hub_name_without_the_hub_is_one_line(override, offline, tmp_path):
    """No route to huggingface.co here: with HF_HUB_OFFLINE=1, and without it (the hub is asked, briefly)."""
    key, name = override.split("=")
    proc = run_cli("areal.train", ["recipe=math", override, f"run.run_dir={tmp_path / 'run'}"], tmp_path,
                   HF_HUB_OFFLINE=offline, HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE=None,
                   HF_DATASETS_OFFLINE=None)
    assert_one_line_exit_2(proc, f"error: {key}: '{name}' is not a local path and not in the local Hugging Face cache",
                           "HF_HUB_OFFLINE=1" if offline else "cannot be reached", f"hf download {name}")
    assert not (tmp_path / "run").exists()


def test_cli_bad_row_fails_before_any_role_starts(tmp_path):
    """An over-long prompt in an async run: named by row and line from the controller's process, before any role
    (the tokenizer's own warning about it would be a second line)."""
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": LONG, "answer": "3"}]
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    proc = run_cli("areal.train", ["recipe=math", f"data.train_path={tmp_path / 'rows.jsonl'}",
                                   f"run.run_dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line_exit_2(proc, f"error: train row 1 (data.train_path {tmp_path / 'rows.jsonl'}, line 3): prompt of "
                                 "row 1 has", "tokens, over data.max_prompt_tokens=256")
    assert "areal async" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()


def test_plan_cli_shows_the_same_one_line_errors(tmp_path, capsys):
    from areal.plan.__main__ import main as plan_main

    assert_one_line_exit_2(run_cli("areal.plan", ["recipe=math", "rollout.max_staleness=-1"], tmp_path),
                           "error: rollout.max_staleness: must be >= 0, got -1")
    for arg, expected in [("cluster.sigma=.inf", "error: cluster.sigma: expected a positive finite float, got inf"),
                          ("cluster.gpus=2.5", "error: cluster.gpus: expected int, got 2.5 (float)"),
                          ("trainer.minibatches=32", "error: trainer.minibatches: 32 minibatches of trainer.")]:
        assert plan_main(["recipe=math", arg]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, err


def test_hub_name_in_the_local_cache_runs_offline_when_the_hub_cannot_be_reached(tmp_path):
    """A model the cache holds (laid out as huggingface_hub does), the hub refusing connections: the inputs check
    out and the weights load, from the cache alone, in a real process."""
    snapshot = tmp_path / "hf" / "hub" / "models--areal-test--tiny-math" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for file in (ROOT / "assets" / "models" / "tiny-math").iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    script = ("import os, torch; from areal.train import parse_args; from areal.setup import check_inputs; "
              "from areal.model import load_model; "
              "r = parse_args(['recipe=math', 'model.path=areal-test/tiny-math'])[0]; "
              "inputs = check_inputs(r); load_model(r.model, torch.device('cpu')); "
              "print(len(inputs.train_prompts), os.environ['HF_HUB_OFFLINE'])")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
                               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_rows = load_rows(DataConfig(train_path=str(ROOT / DataConfig.train_path)), "train")
    assert proc.stdout.split() == [str(len(train_rows)), "1"], proc.stdout
    assert "the Hugging Face hub cannot be reached" in proc.stderr, proc.stderr
    assert "areal-test/tiny-math from the local cache" in proc.stderr, proc.stderr
