"""Built-in math reward (answer extraction, numeric and math-verify equality), the reward fn
loader and RewardConfig. The worker pool is tested in test_reward_pool.py."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal.rewards import RewardConfig, load_reward_fn, math_reward
from areal.rewards.loader import is_async_reward_fn, resolve_spec
from areal.rewards.math import answer_region, as_plain_number, extract_answer, extract_boxed, extract_reference

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"
BAD = FIXTURES / "bad_rewards.py"


# --- answer extraction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"\boxed{1} first, then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{5} and a truncated \boxed{6", "5"),  # an unclosed last box is skipped
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not nest
        (r"\boxed{ 72. }", "72"),  # spaces and a final period dropped
        (r"\boxed{\$18}", "18"),
        (r"\fbox{7}", "7"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K gold
        ("blah 3 apples\n#### $1,234.", "1,234"),
        ("#### 72 dollars", "72"),
        (r"\boxed{9} wins over #### 8", "9"),  # boxed has priority over ####
        ("####", None),  # nothing after #### and no number
        ("The answer is 12, not 13.", "13"),  # last number, final period not part of it
        ("x is -5.", "-5"),
        ("10-5", "5"),  # a minus between digits is subtraction, not a sign
        ("pi is about 3.14159", "3.14159"),
        ("it costs .5 dollars", ".5"),
        ("total: 1,234,567 apples", "1,234,567"),
        ("the lists 1,2,3", "3"),  # commas not in groups of three are separators
        ("half is 3/4 of it", "3/4"),
        ("there is no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_with_space_form():
    assert extract_boxed(r"so $\boxed 7$") == "7"
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    "answer, value",
    [("72", Fraction(72)), ("-1,234.5", Fraction(-2469, 2)), ("3/4", Fraction(3, 4)), (".5", Fraction(1, 2)),
     ("1/0", None), ("x+1", None), (r"\frac{1}{2}", None), ("1,23", None)],
)
def test_as_plain_number(answer, value):
    assert as_plain_number(answer) == value


@given(st.integers(min_value=-10**12, max_value=10**12))
@settings(max_examples=200, deadline=None)
def test_last_number_round_trips_with_thousands_separators(n):
    assert as_plain_number(extract_answer(f"so in total we get {n:,} items.")) == n


# --- math_reward ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("48 + 24 = 72\n#### 72", "Natalia sold ... #### 72", 1.0),
        ("so she has 72 clips", "#### 72", 1.0),
        ("so she has 73 clips", "#### 72", 0.0),
        ("the total is $1,234", "1234", 1.0),
        ("the result is -3.0", "#### -3", 1.0),
        ("that is 0.5 of the cake", "1/2", 1.0),  # both plain numbers: exact rational compare
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),  # latex vs number: math-verify
        (r"\boxed{\dfrac{3}{4}}", r"\boxed{0.75}", 1.0),
        (r"\boxed{x^2 + 2x + 1}", r"\boxed{(x+1)^2}", 1.0),
        (r"\boxed{\sqrt{2}/2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
        (r"\boxed{\frac{1}{3}}", r"\boxed{0.5}", 0.0),
        ("1000001", "1000000", 0.0),  # large integers are compared exactly, no tolerance
        ("I do not know", "#### 72", 0.0),  # no answer in the completion
        ("72", "no number in the gold", 0.0),
    ],
)
def test_math_reward(completion, answer, reward):
    assert math_reward("prompt", completion, answer=answer) == reward


def test_math_reward_ground_truth_sources():
    assert math_reward("p", "it is 5", answer=5) == 1.0  # non-string answers are stringified
    assert math_reward("p", "it is 5", ground_truth="5") == 1.0
    assert math_reward("p", r"it is \boxed{5}", solution=r"... so \boxed{5}.") == 1.0
    assert math_reward("p", "it is 5") == 0.0  # no ground truth at all
    assert math_reward("p", "it is 5", answer="5", unrelated_field=[1, 2]) == 1.0


@pytest.mark.parametrize(
    "reference, expected",
    [
        (r"\frac{1}{2}", r"\frac{1}{2}"),  # a bare LaTeX answer is taken whole, not its last number
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),  # words inside \text{} are the answer, not prose
        ("x^2+1", "x^2+1"),
        ("$18", "18"),
        ("72 dollars", "72"),  # prose: its last number, as for a completion
        ("The answer is 12", "12"),
        ("no number in the gold", None),
        (r"so \boxed{5}.", "5"),  # a MATH solution: its box
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K
    ],
)
def test_extract_reference(reference, expected):
    assert extract_reference(reference) == expected


@pytest.mark.parametrize(
    "prompt, completion, region",
    [
        ("Q", "so 5", "so 5"),  # no reasoning block: all of it
        ("Q", "<think>maybe 4</think> so \\boxed{5}", " so \\boxed{5}"),
        ("<｜User｜>Q<｜Assistant｜><think>\n", "maybe 4, or 5\n</think>\n\\boxed{5}", "\n\\boxed{5}"),
        ("<｜User｜>Q<｜Assistant｜><think>\n", "maybe 4, or 5", None),  # cut while thinking
        ("Q", "<think>maybe 4, or 5", None),
        ("<think>a</think> Q", "5", "5"),  # a closed block in the prompt opens nothing
    ],
)
def test_answer_region(prompt, completion, region):
    assert answer_region(prompt, completion) == region


def test_math_reward_on_math_and_r1_style_data():
    # MATH: the reference is a solution whose last box holds the answer
    solution = r"The roots sum to $-\frac{b}{a} = 3$, so the answer is $\boxed{\frac{3}{2}}$."
    assert math_reward("p", r"... thus \boxed{1.5}", answer=solution) == 1.0
    assert math_reward("p", r"... thus \boxed{3}", answer=solution) == 0.0
    # DeepScaleR / MATH-500: a bare LaTeX answer column
    assert math_reward("p", r"so \boxed{\dfrac{1}{2}}", answer=r"\frac{1}{2}") == 1.0
    assert math_reward("p", r"so \boxed{2}", answer=r"\frac{1}{2}") == 0.0
    # R1 style: the number met while thinking does not count, the answer after </think> does
    r1_prompt = "<｜User｜>What is 2+3?<｜Assistant｜><think>\n"
    assert math_reward(r1_prompt, "2+3 is 5, let me check... yes 5.\n</think>\n\nThe answer is \\boxed{5}.",
                       answer="5") == 1.0
    assert math_reward(r1_prompt, "2+3 is 5, let me check... 2 plus 3", answer="5") == 0.0  # truncated thinking
    assert math_reward(r1_prompt, "so 5?\n</think>\n\nThe answer is \\boxed{6}.", answer="5") == 0.0


def test_math_reward_latex_path_works_off_the_main_thread():
    # math-verify's default signal.alarm timeout raises outside the main thread.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(math_reward("p", r"\boxed{\frac{2}{4}}", answer=r"\boxed{\frac{1}{2}}"))
    )
    thread.start()
    thread.join()
    assert results == [1.0]


# --- loader ---------------------------------------------------------------------------------


def test_load_module_spec():
    assert load_reward_fn("areal.rewards.math:math_reward") is math_reward


def test_load_file_spec_relative_and_absolute(monkeypatch):
    fn = load_reward_fn(f"{BAD}:length_reward")
    assert fn("p", "abcd") == 4.0
    monkeypatch.chdir(FIXTURES.parent)  # relative paths resolve against the current directory
    assert load_reward_fn("rewards/bad_rewards.py:length_reward") is fn
    assert resolve_spec("rewards/bad_rewards.py:length_reward") == f"{BAD.resolve()}:length_reward"
    assert resolve_spec("areal.rewards.math:math_reward") == "areal.rewards.math:math_reward"


def test_load_async_fn():
    fn = load_reward_fn(f"{BAD}:async_length_reward")
    assert is_async_reward_fn(fn)
    assert not is_async_reward_fn(load_reward_fn(f"{BAD}:length_reward"))
    assert asyncio.run(fn("p", "abc")) == 3.0


def test_load_errors_name_the_spec(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'areal\.rewards\.math' is missing ':'"):
        load_reward_fn("areal.rewards.math")

    with pytest.raises(ValueError, match=r"no_such_pkg_q9\.mod:fn.*ModuleNotFoundError: No module named 'no_such_pkg_q9'"):
        load_reward_fn("no_such_pkg_q9.mod:fn")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        load_reward_fn("nowhere/rewards.py:fn")
    assert str(tmp_path / "nowhere" / "rewards.py") in str(missing.value)
    assert "nowhere/rewards.py:fn" in str(missing.value)

    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_q9\n")
    with pytest.raises(ValueError, match=r"broken\.py:fn.*No module named 'no_such_dependency_q9'"):
        load_reward_fn("broken.py:fn")

    with pytest.raises(ValueError) as no_attr:
        load_reward_fn(f"{BAD}:lenght_reward")
    message = str(no_attr.value)
    assert f"{BAD}:lenght_reward" in message and "length_reward" in message and "mixed_reward" in message

    with pytest.raises(ValueError, match=r"NOT_CALLABLE' is a int, not callable"):
        load_reward_fn(f"{BAD}:NOT_CALLABLE")


# --- config ---------------------------------------------------------------------------------


def test_reward_config_defaults_and_help():
    config = RewardConfig()
    assert (config.fn, config.num_workers, config.timeout_s, config.max_logged_failures) == (
        "areal.rewards.math:math_reward", 2, 10.0, 5,
    )
    assert load_reward_fn(config.fn) is math_reward
    for f in dataclasses.fields(RewardConfig):
        assert f.metadata["help"], f.name
    assert "fn(prompt: str, completion: str, **fields) -> float" in dataclasses.fields(RewardConfig)[0].metadata["help"]
    with pytest.raises(ValueError, match="num_workers"):
        RewardConfig(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)
