"""Built-in math reward: extract the final answer, compare it with the ground truth.

`math_reward(prompt, completion, answer=...)` returns 1.0 when the completion's final
answer equals the ground truth and 0.0 otherwise (also when either answer is missing).

Answer extraction (same rules for the completion and for the ground truth):
  1. the content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``);
  2. else the first line after the last ``####`` (GSM8K style: ``#### 72``);
  3. else the last number in the text: ints, decimals, negatives, thousands
     separators (``1,234``) and simple fractions (``3/4``).

The ground truth gets one more rule (``extract_reference``): a reference with no box and no
``####`` that reads as a bare answer rather than prose (``\\frac{1}{2}``, ``(3, \\pi)``,
``\\text{Evelyn}``: no word of three or more letters once LaTeX commands and ``\\text{}``
groups are removed) is the answer as written, as in the ``answer`` columns of MATH-500 and
DeepScaleR; prose (``"72 dollars"``) still gives its last number.

Reasoning models (DeepSeek-R1 and its distills) think inside ``<think> ... </think>``, and
their chat template often opens the ``<think>`` in the prompt. Only the text after the last
``</think>`` is graded (``answer_region``); a completion whose reasoning never closed (cut at
``rollout.max_new_tokens``) has no answer and scores 0.0, so a number met while thinking is
never rewarded.

Comparison: when both answers are plain numbers they are compared exactly as rationals
(``0.5 == 1/2 == 0.50``, ``72 == 72.0``), with no sympy: this path runs thousands of times
per training step. Anything else (LaTeX, expressions, sets, ...) goes to math-verify with
its signal-based timeouts switched off, so this function is safe in any thread; the
reward pool enforces the time limit from outside.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from fractions import Fraction
from typing import Any

# A number inside free text. The look-behind stops "x2" or "1.5.3" tails from counting and
# keeps the "-" of "10-5" from being read as a sign. Alternatives are tried in order:
# fraction, number with thousands separators, plain int/decimal, bare ".5".
_NUMBER = (
    r"(?<![\w.])[-+]?(?:\d+/\d+(?![\d.])"
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"
    r"|\d+(?:\.\d+)?"
    r"|\.\d+)"
)
_NUMBER_RE = re.compile(_NUMBER)
_PLAIN_NUMBER_RE = re.compile(
    r"[-+]?(?:\d+/\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
# "72 dollars", "72 %": a leading number followed only by unit-like words.
_NUMBER_WITH_UNITS_RE = re.compile(r"(" + _NUMBER + r")\s*[A-Za-z%][A-Za-z%\s]*")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Content of the brace group starting at text[open_pos] == "{", or None if unclosed.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX and do not nest.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``; ``\\boxed 5`` is accepted too.

    A truncated last box (no closing brace) is skipped in favour of an earlier complete one.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced_group(text, pos)
            if content is not None:
                return content.strip()
        elif match.end() < len(text) and text[match.end()] == " ":
            token = re.match(r"[^\s$]+", text[pos:])
            if token:
                return token.group(0)
    return None


def _clean(answer: str) -> str:
    """Drop decoration that is not part of the value: spaces, "$", "\\$", a final period."""
    answer = answer.strip().replace("\\$", "").replace("$", "").strip()
    answer = answer.replace("\u2212", "-")  # unicode minus
    while answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer of `text` as a string (see module docstring), or None if there is none."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        boxed = _clean(boxed)
        return boxed or None
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        after = _clean(after.splitlines()[0]) if after else ""
        if after:
            with_units = _NUMBER_WITH_UNITS_RE.fullmatch(after)
            return with_units.group(1) if with_units else after
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


# LaTeX that never carries words of the answer's prose: commands (\frac, \pi) and text groups.
_LATEX_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_PROSE_WORD_RE = re.compile(r"[A-Za-z]{3,}")


def extract_reference(text: str) -> str | None:
    """The final answer of a ground-truth text: `extract_answer`, except that a bare answer
    (one line, no box, no ``####``, no word of 3+ letters outside LaTeX commands and text
    groups) is taken whole: ``\\frac{1}{2}`` is one half, not its last number 2."""
    if not text:
        return None
    cleaned = _clean(text)
    if cleaned and "\n" not in cleaned and "####" not in cleaned and extract_boxed(cleaned) is None:
        latex_free = _LATEX_COMMAND_RE.sub(" ", _LATEX_TEXT_GROUP_RE.sub(" ", cleaned))
        if not _PROSE_WORD_RE.search(latex_free) and as_plain_number(cleaned) is None:
            return cleaned
    return extract_answer(text)


def answer_region(prompt: str, completion: str) -> str | None:
    """The part of `completion` that holds its answer: after the last ``</think>``, or all of it
    when there is no reasoning block. None when reasoning was opened (``<think>`` in the
    completion, or left open at the end of the prompt) and never closed."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    thinking_opened_in_prompt = prompt.rfind("<think>") > prompt.rfind("</think>")
    if "<think>" in completion or thinking_opened_in_prompt:
        return None
    return completion


def as_plain_number(answer: str) -> Fraction | None:
    """`answer` as an exact rational if it is a plain number ("-1,234.5", "3/4"), else None."""
    if not _PLAIN_NUMBER_RE.fullmatch(answer):
        return None
    try:
        return Fraction(answer.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


# --- math-verify, imported lazily: it pulls in sympy (~0.4 s) that the numeric path never needs.


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.lru_cache(maxsize=1)
def _math_verify() -> tuple[Any, Any, dict, dict]:
    """(parse, verify, parse kwargs, verify kwargs) with the signal.alarm timeouts disabled.

    The timeout keyword names are read from the installed version's signatures, so an
    older or newer math-verify is still called correctly.
    """
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    parse_params = inspect.signature(parse).parameters
    verify_params = inspect.signature(verify).parameters
    parse_kwargs = {k: None for k in ("parsing_timeout", "timeout_seconds") if k in parse_params}
    verify_kwargs = {k: None for k in ("timeout_seconds", "parsing_timeout") if k in verify_params}
    return parse, verify, parse_kwargs, verify_kwargs


@functools.lru_cache(maxsize=4096)
def _parse_latex(answer: str) -> tuple:
    """math-verify's parse of an extracted answer; cached since a GRPO group shares its gold."""
    parse, _, parse_kwargs, _ = _math_verify()
    return tuple(parse("\\boxed{" + answer + "}", **parse_kwargs))


def answers_match(predicted: str, gold: str) -> bool:
    """True if two extracted answers denote the same value."""
    pred_num, gold_num = as_plain_number(predicted), as_plain_number(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    if predicted == gold:
        return True
    gold_parsed, pred_parsed = _parse_latex(gold), _parse_latex(predicted)
    if not gold_parsed or not pred_parsed:
        return False
    _, verify, _, verify_kwargs = _math_verify()
    return bool(verify(list(gold_parsed), list(pred_parsed), **verify_kwargs))


def math_reward(prompt: str, completion: str, *, answer: Any = None, **fields: Any) -> float:
    """1.0 if the completion's final answer equals the ground truth, else 0.0.

    The ground truth is `answer` (a GSM8K "... #### 72" answer, a MATH solution with a
    ``\\boxed{}``, or a bare answer such as ``72`` or ``\\frac{1}{2}``); if absent, a
    `ground_truth` or `solution` field is used instead. Only the completion's text after its
    reasoning block is graded (`answer_region`).
    """
    if answer is None:
        answer = fields.get("ground_truth", fields.get("solution"))
    if answer is None:
        return 0.0
    region = answer_region(prompt, completion)
    if region is None:
        return 0.0
    gold = extract_reference(str(answer))
    predicted = extract_answer(region)
    if gold is None or predicted is None:
        return 0.0
    return 1.0 if answers_match(predicted, gold) else 0.0
