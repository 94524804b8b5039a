"""The loss-head checks can fail where it matters (issue 26, item 2): in fp16 and bf16, a head whose gradient is
1 % off, whose dW is 1 % off, that drops the KL term or ignores the temperature fails the self-check
(``check_heads``) and the in-training re-check (``recheck``); a correct 16-bit head (the fused-linear head's
rounding, emulated in torch: tests/helpers/head_emulation.py) passes both with margin. The real Triton heads, in
Triton's interpreter, pass in fp32 and fp16 (bf16: the interpreter cannot read it). The bounds come from the
torch reference's own error against float64 (``lowmem_vt.selfcheck.compare``), not from constants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lowmem_vt.grpo import LossCounts
from lowmem_vt.selfcheck import compare, head

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from head_emulation import FAULTS, install  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16)
NAME = "triton_fused_linear"  # the backend name the emulated head stands in for


def _weight(dtype, V=512, H=64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(V, H, generator=g) / H**0.5).to(dtype)


def _check(dtype, fault, settings=None):
    results = head.check_heads(_weight(dtype), [NAME], settings or head.HeadSettings(), interpreted=False, repeats=1)
    return {p.name: p for p in results}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_correct_16bit_head_passes_with_margin(monkeypatch, dtype):
    install(monkeypatch, head, {NAME: None})
    p = _check(dtype, None)[NAME]
    assert p.ok, p.reason
    # every case and quantity: bound / error >= 1.5 (measured: docs/selfcheck.md, fault table)
    assert p.figures["worst_margin"] >= 1.5, p.figures["errors"]
    assert set(p.figures["errors"]) == {"recipe", "KL only", "advantage only", "temperature 0.7", "dW"}
    assert {"loss", "kl", "logp", "ref_pass", "dh"} <= set(p.figures["errors"]["recipe"])
    assert "dw" in p.figures["errors"]["dW"] and "dw" not in p.figures["errors"]["recipe"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fault, case, quantity", [
    ("grad", "recipe", "dh"), ("dw", "dW", "dw"), ("kl", "KL only", "loss"), ("temperature", "temperature 0.7", "logp"),
])
def test_each_fault_fails_the_selfcheck(monkeypatch, dtype, fault, case, quantity):
    install(monkeypatch, head, {NAME: fault})
    p = _check(dtype, fault)[NAME]
    assert p.ok is False
    assert f"{case}: {quantity} error" in p.reason, p.reason
    judged = p.figures["errors"][case][quantity]
    assert judged["error"] > judged["bound"]


def _micro_batch(dtype, B=4, T=8, V=512, H=64):
    g = torch.Generator().manual_seed(1)
    weight = _weight(dtype, V, H)
    hidden = (torch.randn(B, T, H, generator=g) * 3.0).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    logp = head.exact(dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=torch.zeros(B),
                           old_logp=None, ref_logp=None, counts=LossCounts(B, float(mask.sum()), T)),
                      head.HeadSettings(beta=0.0), None)["logp"].float()
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, torch.randn(B, generator=g), None, ref, LossCounts(B, float(mask.sum()), T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fault", (None,) + FAULTS)
def test_the_in_training_recheck_catches_each_fault(monkeypatch, dtype, fault):
    install(monkeypatch, head, {NAME: fault})
    result = head.recheck(*_micro_batch(dtype), head.HeadSettings(), NAME)
    if fault is None:
        assert result["ok"], result["problems"]
        assert result["worst_margin"] >= 1.5
    else:
        assert not result["ok"] and result["problems"], result


def test_the_bound_is_a_multiple_of_the_torch_paths_own_error():
    """The primitive: error <= MULTIPLE x max(floor, minimum); a 1 % relative error against a 2e-3 floor (bf16's
    rounding of dh) fails, 1.5x the floor passes."""
    exact = torch.randn(1000, dtype=torch.float64)
    floor = 2e-3
    ok = compare.judge({"dh": 1.5 * floor}, {"dh": floor}, {"dh": 1e-6})[0]
    bad = compare.judge({"dh": compare.rel_err(exact * 1.01, exact)}, {"dh": floor}, {"dh": 1e-6})[0]
    assert ok.ok and ok.margin == pytest.approx(compare.MULTIPLE / 1.5)
    assert not bad.ok and "3x the torch path's" in bad.describe()
    assert compare.rel_err(exact * 1.01, exact) == pytest.approx(1e-2)


def test_exact_head_matches_autograd_in_float64():
    """The streamed float64 head equals autograd through the torch reference on float64 inputs."""
    from lowmem_vt.grpo import grpo_loss
    from lowmem_vt.kernels.chunked_logprobs import chunked_logprobs_reference

    B, T, H, V = 2, 5, 16, 300
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) - 6
    counts = LossCounts(B, float(mask.sum()), T)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = chunked_logprobs_reference(h.view(-1, H), w, targets.view(-1), 0.7).view(B, T)
    loss, stats = grpo_loss(logp, mask, adv, None, ref, **kw)
    loss.backward()
    rows = torch.tensor([0, 7, 299])
    out = compare.exact_head(hidden, weight, targets, mask, adv, None, ref, temperature=0.7, rows=rows, block_v=64,
                             loss_fn=lambda lp, m, a, o, r, e: grpo_loss(lp, m, a, o, r, **kw))
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["logp"], logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["dh"], h.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["dw"], w.grad[rows], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["kl"], stats["kl_sum"].double(), rtol=1e-12, atol=1e-14)
    probs = torch.softmax(hidden.view(-1, H) @ weight.T / 0.7, dim=-1)
    entropy = -(probs * torch.log(probs)).sum(-1).view(B, T)
    torch.testing.assert_close(out["entropy"], entropy, rtol=1e-12, atol=1e-12)
