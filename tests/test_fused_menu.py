"""The whole policy-loss menu through the Triton terms kernel (kernels/policy_terms.py), against lowmem_vt.grpo.

Under TRITON_INTERPRET=1 in fp32, fresh random inputs each run (the seed is printed and in every message;
``LOWMEM_TEST_SEED=<seed>`` reproduces).

Covering design (the kernel against ``grpo.grpo_loss`` on the same log-probs, ``test_terms_match_the_reference``):
every loss type x importance-sampling level (16 tests), each over the 6 rows of a strength-2 covering array of
six on / off factors (entropy mask, off-policy mask, bias-corrected KL, beta 0.04 vs 0, delta, old log-probs vs one
update per rollout): within each (loss type, level) every pair of factors takes all four on / off combinations;
the row's sampler correction is the (row + loss + level)-th of the five modes, so each (loss type, level) meets
all five modes and each mode meets every loss type. 96 configurations; padded tokens hold inf / -inf / NaN / 1e30
old, ref and sampling log-probs, one active token a NaN sampling log-prob (TRL: no mismatch).

Both heads end to end (``test_heads_match_the_torch_backend``): each loss type once, the heads and levels
alternating (each head meets both levels), corrections and masks spread, dW on some, garbage log-probs on the
padding; loss and stats against
``grpo_loss`` on the head's own log-probs (1e-5), log-probs against the reference head (1e-5), dh and dW against
the torch backend (1e-4, as tests/test_kernels.py: summation order and atomics). The heads' loss against the torch
backend's is held to 1e-4 only: VESPO's weight exp(lambda + k log w - lambda w) of the summed log-ratio multiplies
the head's 1e-6 log-prob rounding by up to |k - lambda w| x T.
"""

import dataclasses
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from lowmem_vt.grpo import LOSS_TYPES, SAMPLER_CORRECTIONS, LossCounts, LossVariant, SamplerCorrection, grpo_loss
from lowmem_vt.kernels import policy_terms
from lowmem_vt.kernels.chunked_logprobs import chunked_logprobs_reference
from lowmem_vt.kernels.head import fused_grpo_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels import DEVICE, GRAD_TOL, HEADS, LOGP_TOL, head_kwargs, make_head, ragged_mask, rel_err  # noqa: E402

TOL = 1e-5
COUNT_KEYS = ("clipped_tokens", "clip_low", "clip_high", "clip_region", "cispo_clipped", "is_masked")
FACTORS = ("entropy_mask", "off_policy_mask", "bias_kl", "beta", "delta", "old")


def covering_rows() -> list[dict[str, bool]]:
    """6 rows over the 6 factors with every pair of factors in all 4 on / off combinations: each factor's column is
    a 3-subset of rows 1..5 (any two such subsets intersect, neither contains the other, and row 0 is off in both)."""
    columns = list(itertools.combinations(range(1, 6), 3))[: len(FACTORS)]
    return [{f: r in col for f, col in zip(FACTORS, columns)} for r in range(6)]


ROWS = covering_rows()


def test_the_rows_cover_every_pair():
    for a, b in itertools.combinations(FACTORS, 2):
        assert {(r[a], r[b]) for r in ROWS} == {(False, False), (False, True), (True, False), (True, True)}, (a, b)


def settings_of(row: dict, loss_type: str, level: str, correction: str) -> tuple[dict, LossVariant, SamplerCorrection]:
    variant = LossVariant(importance_sampling_level=level, delta=1.5 if row["delta"] else None,
                          top_entropy_quantile=0.6 if row["entropy_mask"] else 1.0,
                          off_policy_mask_threshold=0.05 if row["off_policy_mask"] else None,
                          bias_corrected_kl=row["bias_kl"], sapo_temperature_pos=0.9, vespo_k_pos=1.5)
    sampler = SamplerCorrection(correction, clip_min=0.7 if correction.endswith("mask") else None, clip_max=1.6)
    # cispo's epsilon_high is its cap on the ratio (TRL: 5); 1.3 here so that the cap binds on these ratios
    loss = dict(beta=0.04 if row["beta"] else 0.0, epsilon_low=0.2, epsilon_high=1.3 if loss_type == "cispo" else 0.28)
    return loss, variant, sampler


def terms_inputs(B: int, T: int, with_old: bool) -> dict:
    """[B, T] log-probs near -2, a ragged mask, old / ref / sampling log-probs 0.5 / 0.3 / 0.3 nat away, garbage
    (inf, -inf, NaN, 1e30) on padded tokens, one active NaN sampling log-prob, per-token entropies."""
    logp = -2.0 + 0.5 * torch.randn(B, T, device=DEVICE)
    mask = ragged_mask(B, T)
    old = logp + 0.5 * torch.randn(B, T, device=DEVICE) if with_old else None
    behaviour = logp if old is None else old
    ref = logp + 0.3 * torch.randn(B, T, device=DEVICE)
    sampling = behaviour + 0.3 * torch.randn(B, T, device=DEVICE)
    sampling[1, 1] = float("nan")  # completion 0 is all padding (ragged_mask), 1 and 2 hold at least T / 2 tokens
    garbage = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30], device=DEVICE)
    pad = mask == 0
    for x in (old, ref, sampling):
        if x is not None:
            x[pad] = garbage[torch.randint(0, 4, (int(pad.sum()),))]
    advantages = torch.randn(B, device=DEVICE)
    advantages[1], advantages[2] = -abs(advantages[1]), abs(advantages[2])  # both signs (sapo's tau, the off-policy mask)
    return dict(logp=logp, mask=mask, advantages=advantages, old_logp=old, ref_logp=ref, sampling_logp=sampling,
                entropy=torch.rand(B, T, device=DEVICE))


def run_terms(loss_fn, x: dict, **kwargs):
    """(loss, stats, d (3 loss) / d logp) of ``loss_fn`` (grpo_loss or policy_loss) on x's log-probs."""
    logp = x["logp"].clone().requires_grad_(True)
    loss, stats = loss_fn(logp, x["mask"], x["advantages"], x["old_logp"], x["ref_logp"], sampling_logp=x["sampling_logp"],
                          entropy=x["entropy"], **kwargs)
    (grad,) = torch.autograd.grad(3.0 * loss, logp)
    return loss.detach(), stats, grad


def assert_same_terms(msg: str, got, want, loss_tol: float = TOL, stats_tol: float = TOL) -> None:
    """loss and d loss / d logp within ``loss_tol`` (relative), every stat within ``stats_tol`` (a count may differ by
    one token whose ratio lies within rounding of a bound), all finite."""
    loss, stats, grad = got
    loss_ref, stats_ref, grad_ref = want
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{msg}: non-finite"
    assert abs(float(loss) - float(loss_ref)) <= loss_tol * max(1.0, abs(float(loss_ref))), f"{msg}: loss {float(loss)} vs {float(loss_ref)}"
    if float(grad_ref.abs().max()) == 0:
        assert float(grad.abs().max()) == 0, msg
    else:
        assert rel_err(grad, grad_ref) < loss_tol, f"{msg}: d loss / d logp rel err {rel_err(grad, grad_ref):.2e}"
    assert stats.keys() == stats_ref.keys(), f"{msg}: {sorted(stats)} vs {sorted(stats_ref)}"
    for key in stats_ref:
        a, b = float(stats[key]), float(stats_ref[key])
        slack = 1.0 if key in COUNT_KEYS else 0.0
        assert abs(a - b) <= stats_tol * max(1.0, abs(b)) + slack, f"{msg}: stat {key} {a} vs {b}"


def check_terms(loss_fn, loss_type: str, level: str, row_index: int, correction: str, B: int = 3, T: int = 7):
    row = ROWS[row_index]
    loss_kw, variant, sampler = settings_of(row, loss_type, level, correction)
    x = terms_inputs(B, T, row["old"])
    counts = LossCounts(num_sequences=2 * B, num_tokens=float(x["mask"].sum()) + 5.0, max_completion_length=T + 2)
    kwargs = dict(**loss_kw, loss_type=loss_type, counts=counts, variant=variant, correction=sampler)
    msg = f"{loss_type} {level} {correction} {row}"
    assert_same_terms(msg, run_terms(loss_fn, x, **kwargs), run_terms(grpo_loss, x, **kwargs))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy warns of any inf / NaN it makes
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_terms_match_the_reference(seed, loss_type, level):
    li, lv = LOSS_TYPES.index(loss_type), ("token", "sequence").index(level)
    for r in range(len(ROWS)):
        correction = SAMPLER_CORRECTIONS[(r + li + lv) % len(SAMPLER_CORRECTIONS)]
        check_terms(policy_terms.policy_loss, loss_type, level, r, correction)


def test_every_correction_meets_every_loss_type_and_level():
    seen = {(lt, lv, SAMPLER_CORRECTIONS[(r + i + j) % 5]) for i, lt in enumerate(LOSS_TYPES)
            for j, lv in enumerate(("token", "sequence")) for r in range(len(ROWS))}
    assert len(seen) == len(LOSS_TYPES) * 2 * len(SAMPLER_CORRECTIONS)


# ----------------------------------------------------------------------------------------------------
# the heads end to end
# ----------------------------------------------------------------------------------------------------

HEAD_CASES = [
    # loss_type, head, level, correction, row of ROWS, weight_grad
    (lt, HEADS[i % 2], ("token", "sequence")[(i // 2) % 2], SAMPLER_CORRECTIONS[i % 5], i % len(ROWS), i % 3 == 0)
    for i, lt in enumerate(LOSS_TYPES)
]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy warns of any inf / NaN it makes
@pytest.mark.parametrize("loss_type, head, level, correction, row_index, weight_grad", HEAD_CASES)
def test_heads_match_the_torch_backend(seed, loss_type, head, level, correction, row_index, weight_grad):
    B, T, H, V = 3, 9, 16, 72
    row = ROWS[row_index]
    loss_kw, variant, sampler = settings_of(row, loss_type, level, correction)
    hidden, weight, targets = make_head(B * T, H, V)
    mask = ragged_mask(B, T)
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden, weight, targets).view(B, T)
    old = logp + 0.5 * torch.randn(B, T, device=DEVICE) if row["old"] else None
    sampling = (logp if old is None else old) + 0.3 * torch.randn(B, T, device=DEVICE)
    inputs = dict(hidden=hidden.view(B, T, H), weight=weight, targets=targets.view(B, T), mask=mask,
                  advantages=torch.randn(B, device=DEVICE), old_logp=old, ref_logp=logp + 0.3 * torch.randn(B, T, device=DEVICE))
    pad = mask == 0
    garbage = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30], device=DEVICE)
    for x in (old, inputs["ref_logp"], sampling):  # padding's log-probs may be anything
        if x is not None:
            x[pad] = garbage[torch.randint(0, 4, (int(pad.sum()),))]
    counts = LossCounts(num_sequences=B, num_tokens=float(mask.sum()), max_completion_length=T)
    kwargs = dict(**loss_kw, loss_type=loss_type, counts=counts, variant=variant, correction=sampler, sampling_logp=sampling)
    runs = {}
    for backend in (head, "torch"):
        h = inputs["hidden"].clone().requires_grad_(True)
        w = inputs["weight"].clone().requires_grad_(weight_grad)
        loss, stats, lp = fused_grpo_loss(**{**inputs, "hidden": h, "weight": w}, backend=backend, **head_kwargs(backend), **kwargs)
        (3.0 * loss).backward()
        runs[backend] = (loss.detach(), stats, lp, h.grad, w.grad)
    msg = f"seed={seed} {head} {loss_type} {level} {correction} {row}"
    loss, stats, lp, dh, dw = runs[head]
    loss_ref, stats_ref, lp_ref, dh_ref, dw_ref = runs["torch"]
    active = mask != 0
    assert rel_err(lp[active], lp_ref[active]) < LOGP_TOL, f"{msg}: logp"
    # the kernel's loss and stats equal the reference's on the head's own log-probs
    entropy = None
    if variant.needs_entropy:
        from lowmem_vt.kernels.chunked_logprobs import chunked_entropy

        entropy = chunked_entropy(hidden, weight).view(B, T).float()
    direct, direct_stats = grpo_loss(lp, mask, inputs["advantages"], old, inputs["ref_logp"], entropy=entropy,
                                     **kwargs)
    assert abs(float(loss) - float(direct)) <= TOL * max(1.0, abs(float(direct))), f"{msg}: loss {float(loss)} vs {float(direct)}"
    assert stats.keys() == direct_stats.keys() == stats_ref.keys(), msg
    for key in direct_stats:
        slack = 1.0 if key in COUNT_KEYS else 0.0
        assert abs(float(stats[key]) - float(direct_stats[key])) <= TOL * max(1.0, abs(float(direct_stats[key]))) + slack, (msg, key)
        assert abs(float(stats[key]) - float(stats_ref[key])) <= 1e-4 * max(1.0, abs(float(stats_ref[key]))) + slack, (msg, key)
    assert abs(float(loss) - float(loss_ref)) <= 1e-4 * max(1.0, abs(float(loss_ref))), f"{msg}: loss vs torch backend"
    assert torch.isfinite(dh).all() and rel_err(dh, dh_ref) < GRAD_TOL, f"{msg}: dh rel err {rel_err(dh, dh_ref):.2e}"
    if weight_grad:
        assert rel_err(dw, dw_ref) < GRAD_TOL, f"{msg}: dW rel err {rel_err(dw, dw_ref):.2e}"


@pytest.mark.parametrize("head", HEADS)
def test_no_autograd_graph_over_the_token_terms(head):
    """Beyond the paper's loss the loss's graph is the terms op over the head's op: no exp / minimum / clamp / sigmoid /
    where / sum node of a [B, T] loss in torch autograd (the torch backend has them, which shows the walk sees them)."""
    B, T, H, V = 2, 5, 16, 40
    hidden, weight, targets = make_head(B * T, H, V)
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden, weight, targets).view(B, T)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="sapo",
                  counts=LossCounts(B, float(B * T), T), variant=LossVariant(importance_sampling_level="sequence", delta=1.5),
                  correction=SamplerCorrection("token_truncate"), sampling_logp=logp + 0.1)

    def nodes(backend):
        h = hidden.view(B, T, H).clone().requires_grad_(True)
        loss, _, _ = fused_grpo_loss(h, weight, targets.view(B, T), ragged_mask(B, T), torch.randn(B), logp + 0.2, logp - 0.1,
                                     backend=backend, **head_kwargs(backend), **kwargs)
        names, visited, todo = [], set(), [loss.grad_fn]
        while todo:
            fn = todo.pop(0)
            if fn is not None and fn not in visited:
                visited.add(fn)
                names.append(fn.name())
                todo += [nxt for nxt, _ in fn.next_functions]
        return names

    loss_math = ("Exp", "Minimum", "Clamp", "Sigmoid", "Where", "Sum", "Mul", "Div")
    torch_nodes = nodes("torch")
    assert any(m in n for n in torch_nodes for m in loss_math), torch_nodes
    head_nodes = nodes(head)
    assert "policy_terms" in head_nodes[0], head_nodes
    assert not [n for n in head_nodes if any(m in n for m in loss_math)], head_nodes
    # the whole graph: the terms op, reshapes, the head's op, the leaf
    allowed = ("policy_terms", "ViewBackward", "_FusedLinearLogprobsBackward", "streaming_logprobs", "AccumulateGrad")
    assert all(any(a in n for a in allowed) for n in head_nodes), head_nodes


# ----------------------------------------------------------------------------------------------------
# faults: a realistic wrong kernel (its source edited) must fail the same comparison
# ----------------------------------------------------------------------------------------------------

FAULTS = {
    # name: (source edit, the case that exercises it: loss_type, level, row of ROWS, correction); rows: 0 all off
    # (no old log-probs: every ratio 1, a tie of the min), 1 all on, 3 entropy mask + beta + delta, 4 off-policy
    # mask + beta + old, 5 bias KL + delta + old
    "cispo's cap 1 % off": (("cap = tl.minimum(rho, eps_high)", "cap = tl.minimum(rho, eps_high * 1.01)"),
                            ("cispo", "token", 5, "none")),
    "GSPO's mean log-ratio summed": (("tl.exp(log_ratio_sum / count)", "tl.exp(log_ratio_sum)"), ("grpo", "sequence", 4, "none")),
    "the KL's gradient dropped": (("d_direct += beta * dk3", "d_direct += 0.0 * dk3"), ("dapo", "token", 3, "none")),
    "the tie of the clipped surrogate's min": (("tl.where(unclipped == clipped_side, 0.5, 0.0))\n            share_clipped",
                                               "tl.where(unclipped == clipped_side, 1.0, 0.0))\n            share_clipped"),
                                              ("bnpo", "token", 0, "none")),
    "the sequence's share of d loss / d rho dropped": (("dlogp + share * m", "dlogp"), ("sapo", "sequence", 0, "none")),
    "VESPO without the token correction": (("vespo_sum += tl.sum(tl.where(in_seq, log_c, 0.0), axis=0)", "pass"),
                                           ("vespo", "token", 0, "token_truncate")),
    "the bias-corrected KL's ratio held constant": (("d_rho += beta * k3", "d_rho += 0.0 * k3"), ("grpo", "sequence", 1, "none")),
    "the off-policy mask's test reversed": (("behaviour_kl_sum / count <= opm_threshold", "behaviour_kl_sum / count > opm_threshold"),
                                            ("dapo", "token", 4, "sequence_truncate")),
}


def faulty_policy_loss(tmp_path: Path, name: str, edit: tuple[str, str]):
    """policy_loss of a copy of kernels/policy_terms.py with one edit (its custom op under another name)."""
    source = Path(policy_terms.__file__).read_text()
    old, new = edit
    assert source.count(old) == 1, f"the fault {name!r} no longer matches the kernel's source"
    source = source.replace(old, new).replace("from .interpreter import", "from lowmem_vt.kernels.interpreter import")
    tag = f"fault{abs(hash(name)) % 10**8}"
    source = source.replace('"lowmem_vt::policy_terms"', f'"lowmem_vt_{tag}::policy_terms"')
    path = tmp_path / f"policy_terms_{tag}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"policy_terms_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.policy_loss


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_wrong_kernel_fails_the_comparison(seed, tmp_path, name):
    edit, (loss_type, level, row_index, correction) = FAULTS[name]
    check_terms(policy_terms.policy_loss, loss_type, level, row_index, correction, B=4, T=12)  # the case passes as built
    with pytest.raises(AssertionError):
        check_terms(faulty_policy_loss(tmp_path, name, edit), loss_type, level, row_index, correction, B=4, T=12)


def test_the_kernel_is_the_heads_path_beyond_the_paper_loss(monkeypatch):
    """fused_grpo_loss runs policy_loss for a Triton head beyond the paper's loss, never grpo_loss; the torch backend
    runs grpo_loss; the paper's loss neither (its own fused kernels)."""
    import lowmem_vt.kernels.head as head_module

    calls = []
    real_terms, real_ref = head_module.policy_loss, head_module.grpo_loss
    monkeypatch.setattr(head_module, "policy_loss", lambda *a, **k: calls.append("kernel") or real_terms(*a, **k))
    monkeypatch.setattr(head_module, "grpo_loss", lambda *a, **k: calls.append("torch") or real_ref(*a, **k))
    B, T, H, V = 2, 4, 16, 32
    hidden, weight, targets = make_head(B * T, H, V)
    args = (hidden.view(B, T, H), weight, targets.view(B, T), ragged_mask(B, T), torch.randn(B), None, None)
    kw = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, counts=LossCounts(B, float(B * T), T))
    for head in HEADS:
        fused_grpo_loss(*args, loss_type="cispo", backend=head, **head_kwargs(head), **kw)
        fused_grpo_loss(*args, loss_type="dapo", backend=head, **head_kwargs(head), **kw)
    fused_grpo_loss(*args, loss_type="cispo", backend="torch", **kw)
    assert calls == ["kernel", "kernel", "torch"]


@pytest.mark.parametrize("head", HEADS)
def test_the_menu_runs_on_fake_tensors(head):
    """The memory simulation runs the loss head on fake tensors: the terms op's fake implementation gives the
    shapes, forward and backward, through either head."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        B, T, H, V = 2, 6, 16, 64
        hidden = torch.randn(B, T, H).requires_grad_(True)
        loss, stats, logp = fused_grpo_loss(
            hidden, torch.randn(V, H), torch.randint(0, V, (B, T)), torch.ones(B, T), torch.randn(B), None, torch.randn(B, T),
            beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="vespo", counts=LossCounts(B, 12.0, T), backend=head,
            variant=LossVariant(importance_sampling_level="sequence"), correction=SamplerCorrection("token_mask", 0.5, 2.0),
            sampling_logp=torch.randn(B, T))
        loss.backward()
        assert loss.shape == () and hidden.grad.shape == (B, T, H) and logp.shape == (B, T) and "phi_sum" in stats


# ----------------------------------------------------------------------------------------------------
# the self-check judges the recipe's own loss, through the terms kernel
# ----------------------------------------------------------------------------------------------------

RECIPE_FAULTS = {"recipes/sat_gspo.yaml": ("triton_streaming", "the sequence's share of d loss / d rho dropped"),
                 "recipes/sat_dapo.yaml": ("triton_fused_linear", "the KL's gradient dropped")}


@pytest.mark.parametrize("recipe", list(RECIPE_FAULTS))
def test_the_selfcheck_judges_the_recipes_loss_through_the_terms_kernel(monkeypatch, tmp_path, recipe):
    """The head check with a recipe's settings (sat_gspo: sequence level + sequence_mask; sat_dapo: dapo +
    token_truncate) runs the terms kernel and passes; the same head with a wrong kernel fails it."""
    import lowmem_vt.kernels.head as head_module
    from lowmem_vt.config import load_config
    from lowmem_vt.grpo import is_paper_loss
    from lowmem_vt.selfcheck import head as selfcheck_head

    root = Path(__file__).resolve().parents[1]
    settings = selfcheck_head.HeadSettings.from_recipe(load_config(root / recipe))
    assert not is_paper_loss(settings.loss_type, settings.variant, settings.correction) and settings.correction.on
    name, fault = RECIPE_FAULTS[recipe]
    weight = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    calls = []
    real = head_module.policy_loss
    monkeypatch.setattr(head_module, "policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch_ref, good = selfcheck_head.check_heads(weight, [name], settings, rows=16, repeats=1, interpreted=False)
    assert torch_ref.ok and good.ok, good.reason
    assert calls, "the head check never reached the terms kernel"
    if recipe.endswith("sat_gspo.yaml"):  # once (time): the in-training re-check on a micro-batch, no sampler log-probs
        x = selfcheck_head.make_inputs(weight, 16, settings, seed=1)  # passed: it draws its own around the policy's
        again = selfcheck_head.recheck(x["hidden"], weight, x["targets"], x["mask"], x["advantages"], x["old_logp"],
                                       x["ref_logp"], x["counts"], settings, name)
        assert again["ok"], again["problems"]

    monkeypatch.setattr(head_module, "policy_loss", faulty_policy_loss(tmp_path, fault, FAULTS[fault][0]))
    _, bad = selfcheck_head.check_heads(weight, [name], settings, rows=16, repeats=1, interpreted=False)
    assert bad.ok is False and "error" in bad.reason, bad.reason



def test_with_rollout_auto_the_selfcheck_also_judges_the_loss_of_an_hf_fallback(monkeypatch):
    """sat_lora: rollout auto, correction auto. The engine's runs take the correction (terms kernel), an hf
    fallback none (the paper loss fused in the heads): the head check judges both graphs, so a fault in the paper
    path alone (loss and gradient 1 % off) fails it; the in-training re-check judges the backend in use only."""
    import lowmem_vt.kernels.head as head_module
    from lowmem_vt.config import load_config
    from lowmem_vt.selfcheck import head as selfcheck_head

    root = Path(__file__).resolve().parents[1]
    settings = selfcheck_head.HeadSettings.from_recipe(load_config(root / "recipes/sat_lora.yaml"))
    assert settings.correction.on and settings.also_uncorrected
    assert selfcheck_head.UNCORRECTED in selfcheck_head.case_names(settings)
    weight = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    torch_ref, good = selfcheck_head.check_heads(weight, ["triton_streaming"], settings, rows=16, repeats=1, interpreted=False)
    assert torch_ref.ok and good.ok, good.reason

    real = head_module.streaming_grpo_loss_op

    def paper_path_off(*args):
        loss, *rest = real(*args)
        return (loss * 1.01, *rest)

    monkeypatch.setattr(head_module, "streaming_grpo_loss_op", paper_path_off)
    _, bad = selfcheck_head.check_heads(weight, ["triton_streaming"], settings, rows=16, repeats=1, interpreted=False)
    assert bad.ok is False and selfcheck_head.UNCORRECTED in bad.reason, bad.reason
    # without the extra case the fault goes unseen: every other case runs the terms kernel
    engine_only = dataclasses.replace(settings, also_uncorrected=False)
    _, unseen = selfcheck_head.check_heads(weight, ["triton_streaming"], engine_only, rows=16, repeats=1, interpreted=False)
    assert unseen.ok, unseen.reason
