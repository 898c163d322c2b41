"""Build the embedded default assets of recipes/math.yaml, offline and reproducibly.

    python scripts/build_default_assets.py            # a few minutes on 2 CPU cores

Writes
  assets/data/arith/{train,test}.jsonl  2-digit addition, GSM8K format, disjoint (a, b) pairs
  assets/models/tiny-math/              character tokenizer + ~0.48M-param Qwen2 causal LM,
                                        SFT-warmed to PARTIAL skill (~35-40% greedy accuracy)
                                        so that RL has room to improve it, + BUILD_INFO.json

The warm-up stops on a validation slice (pairs in neither train nor test), never on the
test split; the test accuracy is measured afterwards and recorded.
Same script + same machine + same thread count + same torch and transformers => same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arith_data import PROMPT_TEMPLATE, final_answer, make_row, split_pairs, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, then the 256 byte-level symbols
# Same split regex as transformers' Qwen2Tokenizer: transformers 5 rebuilds a qwen2 model's
# tokenizer with this pipeline from tokenizer.json's vocab, so ours must match it exactly.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SEED = 1234
N_TRAIN, N_TEST, N_VALID = 4000, 500, 1000
MAX_NEW_TOKENS = 6


# ---------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer in byte-level form: BPE over the 256 byte symbols with NO
    merges, so every ASCII character (space and newline included) is exactly one token.

    The pipeline (NFC, Qwen2 split regex, ByteLevel pre-tokenizer and decoder) is the one
    transformers 5 forces on any qwen2 checkpoint, so the tokenizer behaves identically
    in memory, after AutoTokenizer.from_pretrained, and under transformers 4.x (which
    reads tokenizer.json as is). There is no post-processor: nothing is added to a prompt.
    """
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + byte_symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.add_special_tokens(SPECIALS)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def _byte_of_symbol(symbol: str) -> int:
    """Byte value that the GPT-2 byte-level alphabet maps to ``symbol`` (vocab in byte order)."""
    return _BYTE_OF_SYMBOL[symbol]


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """The standard GPT-2 byte -> printable-unicode-symbol table used by ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_OF_SYMBOL = {sym: b for b, sym in _gpt2_bytes_to_unicode().items()}


def load_tokenizer_checked(model_dir: Path):
    """Reload the saved tokenizer the way users will (AutoTokenizer next to a qwen2
    config.json) and check it is still character level and round-trips exactly."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = PROMPT_TEMPLATE.format(question="What is 37 + 48?") + "85"
    ids = tok(probe)["input_ids"]
    assert len(ids) == len(probe), (len(ids), len(probe))
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == probe
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    tok.save_pretrained(out)
    # Keep the folder loadable by transformers 4.x as well: name the generic fast class
    # (5.x writes its own "TokenizersBackend") and write the special-token map 4.x reads.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# ---------------------------------------------------------------- model
def build_model(tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


# ---------------------------------------------------------------- data -> tensors
def encode_sft(rows: list[dict], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids of ``prompt + completion + eos`` right-padded, and labels that are -100
    everywhere except on the completion tokens and eos (loss on the answer only)."""
    seqs, labels = [], []
    for row in rows:
        p = tok(PROMPT_TEMPLATE.format(question=row["question"]))["input_ids"]
        c = tok(final_answer(row["answer"]))["input_ids"] + [tok.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


def encode_prompts(rows: list[dict], tok) -> torch.Tensor:
    """Prompts of 2-digit problems all have the same length, so no padding is needed."""
    ids = [tok(PROMPT_TEMPLATE.format(question=r["question"]))["input_ids"] for r in rows]
    assert len({len(x) for x in ids}) == 1, "prompts differ in length"
    return torch.tensor(ids)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_correct(model, tok, prompts: torch.Tensor, targets: list[str], temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> list[bool]:
    """Per prompt: does the completion (up to eos, MAX_NEW_TOKENS tokens) equal the target?

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / T).
    A plain full-recompute loop: prompts are ~25 tokens, so a KV cache buys nothing here.
    """
    model.eval()
    seq = prompts
    for _ in range(MAX_NEW_TOKENS):
        logits = model(input_ids=seq).logits[:, -1, :]
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    new = seq[:, prompts.shape[1]:].tolist()
    correct = []
    for toks, target in zip(new, targets):
        if tok.eos_token_id in toks:
            toks = toks[: toks.index(tok.eos_token_id)]
        correct.append(tok.decode(toks, skip_special_tokens=True).strip() == target)
    model.train()
    return correct


def answer_accuracy(model, tok, prompts: torch.Tensor, targets: list[str], temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> float:
    """Fraction of prompts answered correctly (see answer_correct)."""
    correct = answer_correct(model, tok, prompts, targets, temperature, generator)
    return sum(correct) / len(correct)


# ---------------------------------------------------------------- SFT warm-up
@dataclass(frozen=True)
class WarmUp:
    """The SFT warm-up's settings (see `warm_up`); each asset script has its own."""

    seed: int
    batch: int
    lr: float
    warmup_steps: int  # linear LR warm-up
    max_steps: int
    eval_every: int  # coarse phase: half the validation rows every this many steps
    fine_from: float  # validation accuracy that starts the fine phase ...
    fine_lr_scale: float  # ... which scales the LR by this ...
    fine_eval_every: int  # ... and scores every validation row this often
    stop_at: float  # the first fine-phase score >= this ends the warm-up ...
    target: float  # ... and the scored state closest to this (preferring `band`) is kept
    band: tuple[float, float]
    trim_pad_columns: bool = False  # drop a batch's all-padding columns (variable-length answers)


WARM_UP = WarmUp(seed=SEED, batch=128, lr=2e-3, warmup_steps=50, max_steps=6000, eval_every=25, fine_from=0.2,
                 fine_lr_scale=0.5, fine_eval_every=5, stop_at=0.37, target=0.38, band=(0.30, 0.45))


def warm_up(model, ids: torch.Tensor, labels: torch.Tensor, valid_accuracy, num_valid: int, cfg: WarmUp,
            log) -> dict:
    """AdamW SFT on (ids, labels) with linear LR warm-up, stopped at partial skill.

    Coarse phase: greedy accuracy on half the validation rows every `eval_every` steps. Once it
    passes `fine_from`, skill rises fast (carries click in within ~100 steps), so the LR is scaled
    by `fine_lr_scale` and every validation row is scored every `fine_eval_every` steps; the first
    score >= `stop_at` ends the run, and the scored state closest to `target` (preferring `band`)
    is kept. `valid_accuracy(model, n)` scores the first n validation rows.
    """
    half = num_valid // 2
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    lr_scale = 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_scale * min(1.0, (s + 1) / cfg.warmup_steps))
    order_gen = torch.Generator().manual_seed(cfg.seed)  # deterministic data order
    snapshots: list[tuple[float, int, dict]] = []
    perm, pos, t0, fine = torch.randperm(len(ids), generator=order_gen), 0, time.time(), False
    cpu0 = time.process_time()  # CPU seconds: unlike wall time, not inflated by a busy machine
    model.train()
    for step in range(1, cfg.max_steps + 1):
        if pos + cfg.batch > len(perm):
            perm, pos = torch.randperm(len(ids), generator=order_gen), 0
        idx = perm[pos : pos + cfg.batch]
        pos += cfg.batch
        batch_ids, batch_labels = ids[idx], labels[idx]
        if cfg.trim_pad_columns:
            width = int((batch_labels != -100).nonzero()[:, 1].max()) + 1
            batch_ids, batch_labels = batch_ids[:, :width], batch_labels[:, :width]
        loss = model(input_ids=batch_ids, labels=batch_labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if not fine and step % cfg.eval_every == 0:
            acc = valid_accuracy(model, half)
            log(f"step {step:5d}  loss {loss.item():.4f}  valid[:{half}] greedy acc {acc:.3f}  ({time.time() - t0:.0f}s)")
            if acc >= cfg.fine_from:
                fine, lr_scale = True, cfg.fine_lr_scale
                log(f"fine phase: lr x{cfg.fine_lr_scale}, full validation every {cfg.fine_eval_every} steps")
        elif fine and step % cfg.fine_eval_every == 0:
            acc = valid_accuracy(model, num_valid)
            log(f"step {step:5d}  loss {loss.item():.4f}  valid greedy acc {acc:.3f}  ({time.time() - t0:.0f}s)")
            snapshots.append((acc, step, {k: v.clone() for k, v in model.state_dict().items()}))
            snapshots = snapshots[-4:]  # the last few are enough to pick from
            if acc >= cfg.stop_at:
                break
    if not snapshots:
        raise RuntimeError(f"validation accuracy never reached {cfg.fine_from} in {cfg.max_steps} steps")
    low, high = cfg.band
    in_band = [s for s in snapshots if low <= s[0] <= high] or snapshots
    acc, step, state = min(in_band, key=lambda s: abs(s[0] - cfg.target))
    model.load_state_dict(state)
    if not low <= acc <= high:  # e.g. another torch version learns faster: retune stop_at / lr
        log(f"WARNING: kept validation accuracy {acc:.3f} is outside the intended {list(cfg.band)}")
    return {"sft_steps": step, "sft_seconds": round(time.time() - t0, 1),
            "sft_cpu_seconds": round(time.process_time() - cpu0, 1), "valid_greedy_accuracy": acc}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "assets", help="assets root folder")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (weights depend on it); 1 is robust on a busy 2-core box")
    args = ap.parse_args()
    # Measured on the shared 2-core box under load: 0.18 s/step with 1 thread, 1.08 s/step
    # with 2 (OpenMP threads stall when the cores are oversubscribed); idle, 2 is ~1.5x faster.
    torch.set_num_threads(args.threads)
    seed_everything(SEED)

    # 1. dataset
    train_p, test_p, valid_p = split_pairs(N_TRAIN, N_TEST, N_VALID, seed=SEED)
    train_rows = [make_row(a, b) for a, b in train_p]
    test_rows = [make_row(a, b) for a, b in test_p]
    valid_rows = [make_row(a, b) for a, b in valid_p]
    data_dir = args.out / "data" / "arith"
    write_jsonl(train_rows, data_dir / "train.jsonl")
    write_jsonl(test_rows, data_dir / "test.jsonl")
    print(f"wrote {len(train_rows)} train / {len(test_rows)} test rows to {data_dir}")

    # 2-3. tokenizer and model
    model_dir = args.out / "models" / "tiny-math"
    tok = build_tokenizer()
    model = build_model(tok)
    save_tokenizer(tok, model_dir)
    model.config.save_pretrained(model_dir)  # AutoTokenizer picks its class from config.json
    tok = load_tokenizer_checked(model_dir)  # train with exactly what users will load
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tok)}")

    # 4. partial-skill warm-up, then the held-out figures
    ids, labels = encode_sft(train_rows, tok)
    v_prompts, v_targets = encode_prompts(valid_rows, tok), [final_answer(r["answer"]) for r in valid_rows]
    info = warm_up(model, ids, labels, lambda m, n: answer_accuracy(m, tok, v_prompts[:n], v_targets[:n]),
                   len(valid_rows), WARM_UP, log=print)
    t_prompts = encode_prompts(test_rows, tok)
    t_targets = [final_answer(r["answer"]) for r in test_rows]
    info["test_greedy_accuracy"] = answer_accuracy(model, tok, t_prompts, t_targets)
    gen = torch.Generator().manual_seed(SEED)
    # 8 samples per test prompt at T=1: mean accuracy, and the share of prompts with at least
    # one success (a GRPO group of 8 then has a non-zero advantage signal).
    samples = [answer_correct(model, tok, t_prompts, t_targets, 1.0, gen) for _ in range(8)]
    per_prompt = [sum(col) for col in zip(*samples)]
    info["test_sampled_accuracy_t1"] = round(sum(per_prompt) / (8 * len(per_prompt)), 4)
    info["test_pass_at_8_t1"] = round(sum(k > 0 for k in per_prompt) / len(per_prompt), 4)
    info["test_groups_of_8_with_mixed_rewards_t1"] = round(sum(0 < k < 8 for k in per_prompt) / len(per_prompt), 4)

    model.save_pretrained(model_dir, safe_serialization=True)
    build_info = {
        "params": n_params,
        **info,
        "prompt_template": PROMPT_TEMPLATE,
        "max_new_tokens": MAX_NEW_TOKENS,
        "seed": SEED,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "split_sizes": {"train": N_TRAIN, "test": N_TEST, "valid_internal": N_VALID},
        "sft": {"batch": WARM_UP.batch, "lr": WARM_UP.lr, "warmup_steps": WARM_UP.warmup_steps,
                "eval_every": WARM_UP.eval_every, "fine_from": WARM_UP.fine_from,
                "fine_lr_scale": WARM_UP.fine_lr_scale, "fine_eval_every": WARM_UP.fine_eval_every,
                "stop_at_valid_acc": WARM_UP.stop_at, "target": WARM_UP.target},
        "rebuild": "python scripts/build_default_assets.py",
    }
    (model_dir / "BUILD_INFO.json").write_text(json.dumps(build_info, indent=2) + "\n")
    print(json.dumps(build_info, indent=2))


if __name__ == "__main__":
    main()
