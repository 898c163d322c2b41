"""Build the assets of recipes/chain.yaml, offline and reproducibly: a harder, generation-heavy
companion to the default 2-digit addition task.

    python scripts/build_chain_assets.py            # a few minutes on one CPU thread

Writes
  assets/data/chain/{train,test}.jsonl  sums of three 2-digit numbers, GSM8K format, with the
                                        worked chain as the answer; disjoint operand triples
  assets/models/tiny-chain/             the tiny-math character tokenizer + a Qwen2 causal LM
                                        of the same kind, SFT-warmed to PARTIAL skill on the
                                        chain (~40% greedy accuracy), + BUILD_INFO.json

The model must write the chain, e.g. for "What is 37 + 48 + 16?" the completion
``37+48=85, 85+16=101<eos>`` (18-21 characters, so 19-22 tokens with eos). The reward is the
project's `areal.rewards.math:math_reward`, which reads the LAST number of a completion (no
``\\boxed`` and no ``####`` here), so only the final sum decides, and a model that stops after
the first step or gets either addition wrong scores 0. ", " separates the steps so that no
two numbers can be read as one "85,850" thousands-separated number.

The warm-up stops on a validation slice (triples in neither train nor test), never on the
test split; the test accuracy is measured afterwards and recorded. Accuracy here is always
the reward's verdict on the decoded completion, exactly as the RL run's evaluation scores it.
Same script + same machine + same thread count + same torch and transformers => same weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arith_data import PROMPT_TEMPLATE, final_answer, write_jsonl  # noqa: E402
from build_default_assets import (  # noqa: E402
    build_model,
    build_tokenizer,
    encode_prompts,
    load_tokenizer_checked,
    save_tokenizer,
    WarmUp,
    seed_everything,
    warm_up,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from areal.rewards.math import math_reward  # noqa: E402

SEED = 4321
LOW, HIGH = 10, 99  # every operand is a 2-digit number
N_OPERANDS = 3
N_TRAIN, N_TEST, N_VALID = 4000, 500, 1000
# Stopping at ~0.30 instead left GRPO (recipes/chain.yaml) too few successes per group to
# climb steadily (0.28 -> 0.38 in 300 steps, with a dip first); at ~0.40 it climbs to ~0.77.
WARM_UP = WarmUp(seed=SEED, batch=64, lr=3e-3, warmup_steps=50, max_steps=3000, eval_every=25, fine_from=0.12,
                 fine_lr_scale=0.5, fine_eval_every=5, stop_at=0.40, target=0.41, band=(0.20, 0.45),
                 trim_pad_columns=True)  # chains differ in length
MAX_NEW_TOKENS = 32  # the longest chain, "99+99=198, 198+99=297", is 21 characters + eos


# ---------------------------------------------------------------- data
def make_chain_row(operands: tuple[int, ...]) -> dict:
    """One GSM8K-style row: the answer is the worked chain, then ``#### <total>``."""
    question = "What is " + " + ".join(str(x) for x in operands) + "?"
    return {"question": question, "answer": f"{chain_text(operands)}\n#### {sum(operands)}"}


def chain_text(operands: tuple[int, ...]) -> str:
    """The completion the model is taught: running sums, e.g. ``37+48=85, 85+16=101``."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ", ".join(steps)


def reference_chain(answer: str) -> str:
    """The worked chain of a row's answer (the text before ``####``)."""
    return answer.split("####")[0].strip()


def split_tuples(n_train: int, n_test: int, n_valid: int, seed: int, n_operands: int = N_OPERANDS,
                 low: int = LOW, high: int = HIGH) -> tuple[list[tuple[int, ...]], ...]:
    """Disjoint (train, test, valid) lists of distinct operand tuples, each operand in [low, high]."""
    span = high - low + 1
    space = span ** n_operands
    n = n_train + n_test + n_valid
    if n > space:
        raise ValueError(f"only {space} distinct tuples exist")
    picked = random.Random(seed).sample(range(space), n)

    def decode(i: int) -> tuple[int, ...]:
        digits = []
        for _ in range(n_operands):
            i, r = divmod(i, span)
            digits.append(low + r)
        return tuple(reversed(digits))

    tuples = [decode(i) for i in picked]
    return tuples[:n_train], tuples[n_train : n_train + n_test], tuples[n_train + n_test :]


# ---------------------------------------------------------------- data -> tensors
def encode_chain_sft(rows: list[dict], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids of ``prompt + chain + eos`` right-padded, and labels that are -100 everywhere
    except on the chain tokens and eos (loss on the completion only)."""
    seqs, labels = [], []
    for row in rows:
        p = tok(PROMPT_TEMPLATE.format(question=row["question"]))["input_ids"]
        c = tok(reference_chain(row["answer"]))["input_ids"] + [tok.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def complete(model, tok, prompts: torch.Tensor, temperature: float = 0.0,
             generator: torch.Generator | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Decoded completions (up to eos) of equal-length prompts, with a KV cache.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / T).
    """
    model.eval()
    eos = tok.eos_token_id
    # transformers 5 names the cache argument `cache`, 4.x `past_key_values`; it is filled in place
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {cache_kw: DynamicCache(), "use_cache": True}
    logits = model(input_ids=prompts, **kv).logits[:, -1, :]
    new = torch.empty((prompts.shape[0], 0), dtype=torch.long)
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        new = torch.cat([new, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
        logits = model(input_ids=nxt[:, None], **kv).logits[:, -1, :]
    model.train()
    texts = []
    for toks in new.tolist():
        if eos in toks:
            toks = toks[: toks.index(eos)]
        texts.append(tok.decode(toks, skip_special_tokens=True))
    return texts


def chain_correct(model, tok, prompts: torch.Tensor, rows: list[dict], temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> tuple[list[bool], list[str]]:
    """Per prompt: does math_reward (the RL reward) score the completion 1? And the completions."""
    texts = complete(model, tok, prompts, temperature, generator)
    ok = [math_reward("", t, answer=r["answer"]) > 0.5 for t, r in zip(texts, rows)]
    return ok, texts


def chain_accuracy(model, tok, prompts, rows, temperature: float = 0.0, generator=None) -> float:
    ok, _ = chain_correct(model, tok, prompts, rows, temperature, generator)
    return sum(ok) / len(ok)


def held_out_figures(model, tok, rows: list[dict]) -> dict:
    """Greedy accuracy, chain exact match and length on `rows`; T=1 sampled accuracy and pass@8."""
    prompts = encode_prompts(rows, tok)
    ok, texts = chain_correct(model, tok, prompts, rows)
    info = {
        "test_greedy_accuracy": round(sum(ok) / len(ok), 4),
        "test_greedy_chain_exact_match": round(
            sum(t.strip() == reference_chain(r["answer"]) for t, r in zip(texts, rows)) / len(rows), 4),
        "test_greedy_mean_completion_tokens": round(
            sum(len(tok(t)["input_ids"]) + 1 for t in texts) / len(texts), 2),  # + eos
        "test_reference_mean_completion_tokens": round(
            sum(len(reference_chain(r["answer"])) + 1 for r in rows) / len(rows), 2),
    }
    gen = torch.Generator().manual_seed(SEED)
    # 8 samples per test prompt at T=1: mean accuracy, and the share of prompts with at least
    # one success (a GRPO group of 8 then has a non-zero advantage signal).
    samples = [chain_correct(model, tok, prompts, rows, 1.0, gen)[0] for _ in range(8)]
    per_prompt = [sum(col) for col in zip(*samples)]
    info["test_sampled_accuracy_t1"] = round(sum(per_prompt) / (8 * len(per_prompt)), 4)
    info["test_pass_at_8_t1"] = round(sum(k > 0 for k in per_prompt) / len(per_prompt), 4)
    info["test_groups_of_8_with_mixed_rewards_t1"] = round(sum(0 < k < 8 for k in per_prompt) / len(per_prompt), 4)
    info["example_greedy_completion"] = {"prompt": PROMPT_TEMPLATE.format(question=rows[0]["question"]),
                                         "completion": texts[0], "reference": reference_chain(rows[0]["answer"])}
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "assets", help="assets root folder")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (weights depend on it); 1 is robust on a busy 2-core box")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(SEED)
    t_build = time.time()

    # 1. dataset
    train_t, test_t, valid_t = split_tuples(N_TRAIN, N_TEST, N_VALID, seed=SEED)
    train_rows = [make_chain_row(t) for t in train_t]
    test_rows = [make_chain_row(t) for t in test_t]
    valid_rows = [make_chain_row(t) for t in valid_t]
    for row in train_rows[:50] + test_rows[:50]:  # the reward reads the chain's final sum
        assert math_reward("", reference_chain(row["answer"]), answer=row["answer"]) == 1.0, row
        assert final_answer(row["answer"]) == reference_chain(row["answer"]).rsplit("=", 1)[1], row
    data_dir = args.out / "data" / "chain"
    write_jsonl(train_rows, data_dir / "train.jsonl")
    write_jsonl(test_rows, data_dir / "test.jsonl")
    print(f"wrote {len(train_rows)} train / {len(test_rows)} test rows to {data_dir}")

    # 2-3. tokenizer and model: exactly tiny-math's recipe, generating up to MAX_NEW_TOKENS
    model_dir = args.out / "models" / "tiny-chain"
    tok = build_tokenizer()
    model = build_model(tok)
    model.generation_config.max_new_tokens = MAX_NEW_TOKENS
    save_tokenizer(tok, model_dir)
    model.config.save_pretrained(model_dir)  # AutoTokenizer picks its class from config.json
    tok = load_tokenizer_checked(model_dir)  # train with exactly what users will load
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tok)}")

    # 4. partial-skill warm-up, then the held-out figures
    ids, labels = encode_chain_sft(train_rows, tok)
    v_prompts = encode_prompts(valid_rows, tok)
    info = warm_up(model, ids, labels, lambda m, n: chain_accuracy(m, tok, v_prompts[:n], valid_rows[:n]),
                   len(valid_rows), WARM_UP, log=print)
    info.update(held_out_figures(model, tok, test_rows))

    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    build_info = {
        "params": n_params,
        **info,
        "build_seconds": round(time.time() - t_build, 1),
        "prompt_template": PROMPT_TEMPLATE,
        "completion_format": "37+48=85, 85+16=101<eos> (the reward reads the last number)",
        "max_new_tokens": MAX_NEW_TOKENS,
        "seed": SEED,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "split_sizes": {"train": N_TRAIN, "test": N_TEST, "valid_internal": N_VALID},
        "operands": {"count": N_OPERANDS, "low": LOW, "high": HIGH},
        "sft": {"batch": WARM_UP.batch, "lr": WARM_UP.lr, "warmup_steps": WARM_UP.warmup_steps,
                "eval_every": WARM_UP.eval_every, "fine_from": WARM_UP.fine_from,
                "fine_lr_scale": WARM_UP.fine_lr_scale, "fine_eval_every": WARM_UP.fine_eval_every,
                "stop_at_valid_acc": WARM_UP.stop_at, "target": WARM_UP.target},
        "rebuild": "python scripts/build_chain_assets.py",
    }
    (model_dir / "BUILD_INFO.json").write_text(json.dumps(build_info, indent=2) + "\n")
    print(json.dumps(build_info, indent=2))


if __name__ == "__main__":
    main()
