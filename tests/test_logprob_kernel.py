"""Chunked log-prob/entropy kernel: parity with the naive log_softmax path, values and grads."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from areal.kernels.logprob import (
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
)

torch.set_num_threads(1)


def _inputs(n=37, h=16, v=53, seed=0, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, labels


def _naive(hidden, weight, bias, labels, temperature):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return logprobs_from_logits(logits, labels, temperature), entropy_from_logits(logits, temperature)


def _grads(fn, tensors, w_lp, w_ent):
    for t in tensors:
        t.grad = None
    lp, ent = fn()
    (lp * w_lp).sum().add((ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), [t.grad.clone() for t in tensors]


def test_hand_computed_two_token_vocab():
    # hidden = [1], W = [[0], [ln 3]] -> logits [0, ln 3] -> p = [1/4, 3/4]
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    lp, ent = logprobs_and_entropy(hidden, weight, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    # temperature 2 -> logits [0, ln 3 / 2] -> p ∝ [1, sqrt 3]
    lp2, _ = logprobs_and_entropy(hidden, weight, torch.tensor([0]), temperature=2.0)
    assert lp2.item() == pytest.approx(-math.log(1 + math.sqrt(3.0)), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_forward_backward_parity_with_naive(chunk_size, temperature, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    tensors = [hidden, weight] + ([b] if bias else [])
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(len(labels), generator=g), torch.randn(len(labels), generator=g)
    ref = _grads(lambda: _naive(hidden, weight, b, labels, temperature), tensors, w_lp, w_ent)
    got = _grads(
        lambda: logprobs_and_entropy(
            hidden, weight, labels, temperature=temperature, lm_head_bias=b, chunk_size=chunk_size
        ),
        tensors,
        w_lp,
        w_ent,
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for g_got, g_ref in zip(got[2], ref[2]):
        torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-4)


def test_logprob_only_backward_and_frozen_weight():
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    lp, _ = logprobs_and_entropy(hidden, weight, labels, chunk_size=5)
    lp.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logprobs_from_logits(hidden @ weight.t(), labels).sum().backward()
    torch.testing.assert_close(got, hidden.grad, atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_gradcheck_float64_both_outputs():
    hidden, weight, b, labels = _inputs(n=6, h=3, v=7, bias=True, dtype=torch.float64)
    # float32 inside, so a loose tolerance; gradcheck still catches a wrong formula
    fn = lambda h, w, bb: logprobs_and_entropy(h, w, labels, lm_head_bias=bb, temperature=1.3, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_ignored_labels_and_bf16_inputs():
    hidden, weight, _, labels = _inputs(n=10)
    labels[3] = -100
    lp, ent = logprobs_and_entropy(hidden, weight, labels, chunk_size=4)
    assert lp[3].item() == 0.0 and ent[3].item() > 0
    lp.sum().backward()
    # row 3 gets no log-prob gradient
    assert hidden.grad[3].abs().max().item() == 0.0
    hb, wb = hidden.detach().bfloat16(), weight.detach().bfloat16()
    lpb, _ = logprobs_and_entropy(hb, wb, labels.clamp(min=0))
    assert lpb.dtype == torch.float32
    ref = logprobs_from_logits(hb.float() @ wb.float().t(), labels.clamp(min=0))
    torch.testing.assert_close(lpb, ref, atol=1e-5, rtol=1e-5)


def test_large_logits_are_stable():
    hidden, weight, _, labels = _inputs(n=8, h=4, v=11)
    with torch.no_grad():
        weight.mul_(300.0)  # logits in the thousands: naive exp would overflow
    lp, ent = logprobs_and_entropy(hidden.detach(), weight.detach(), labels, chunk_size=3)
    ref_lp, ref_ent = _naive(hidden.detach(), weight.detach(), None, labels, 1.0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, ref_lp, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-3)


def test_cpu_auto_backend_does_not_use_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from areal.kernels import logprob as mod

    stats, grad = mod._row_ops(torch.device("cpu"), "auto")
    assert stats is mod._chunk_stats_torch and grad is mod._chunk_grad_torch


def test_imports_and_falls_back_without_triton():
    # a child where `import triton` fails, as on a CPU-only install without the extra
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from areal.kernels import logprob_triton\n"
        "assert not logprob_triton.triton_available()\n"
        "from areal.kernels.logprob import logprobs_and_entropy\n"
        "lp, _ = logprobs_and_entropy(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 3]))\n"
        "assert lp.shape == (3,) and bool((lp < 0).all())\n"
        "try:\n"
        "    logprobs_and_entropy(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 3]), backend='triton')\n"
        "except RuntimeError:\n"
        "    print('FALLBACK_OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "FALLBACK_OK" in proc.stdout, proc.stdout + proc.stderr


def _interpreted_triton_check() -> None:
    """Triton (interpreted on CPU) vs the torch path; run in a child with TRITON_INTERPRET=1."""
    from areal.kernels import logprob_triton

    assert logprob_triton.interpreting()
    for with_entropy_grad in (True, False):
        hidden, weight, b, labels = _inputs(n=9, h=8, v=37, bias=True)  # V not a power of two
        labels[2] = -100
        tensors = [hidden, weight, b]
        w_lp = torch.linspace(-1, 1, len(labels))
        w_ent = torch.linspace(0.5, -0.3, len(labels))

        def run(backend):
            for t in tensors:
                t.grad = None
            lp, ent = logprobs_and_entropy(
                hidden, weight, labels, temperature=0.9, lm_head_bias=b, chunk_size=4, backend=backend
            )
            loss = (lp * w_lp).sum() + ((ent * w_ent).sum() if with_entropy_grad else 0.0)
            loss.backward()
            return [lp.detach(), ent.detach()] + [t.grad.clone() for t in tensors]

        for got, ref in zip(run("triton"), run("torch")):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # the row kernels alone against the naive formulas, with rows spanning two tiles
    z = torch.randn(3, 5000, dtype=torch.float32) * 3
    lab = torch.tensor([0, 4999, 1234])
    lp, ent, lse = logprob_triton.chunk_stats(z, lab)
    torch.testing.assert_close(lp, logprobs_from_logits(z, lab), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(z), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), atol=1e-5, rtol=1e-6)
    print("TRITON_INTERPRETED_OK")


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton", reason="triton is not installed (optional extra 'triton')")
    # A child process: triton fixes interpreter-vs-compiler when it is first imported,
    # so TRITON_INTERPRET must be set before any import of triton in that process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "TRITON_INTERPRETED_OK" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    _interpreted_triton_check()
