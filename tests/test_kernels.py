"""Triton kernels against their PyTorch references and lowmem_vt.grpo, on CPU under the Triton interpreter.

Every run draws fresh inputs; the seed is printed and named in every assertion message. Reproduce a failure
with ``LOWMEM_TEST_SEED=<seed> pytest tests/test_kernels.py``.

Error measure: ``rel_err(x, ref) = max|x - ref| / max|ref|``. Bounds in fp32: 1e-5 for log-probs and the
loss, 1e-4 for gradients (the kernels sum in another order, and dh gathers atomic partial sums). The
interpreter reads bf16 tensors wrongly with CPU torch, so bf16 is tested only on CUDA.
"""

from dataclasses import replace


import pytest  # noqa: E402
import torch  # noqa: E402

from lowmem_vt.grpo import LOSS_TYPES, LossCounts, LossVariant, SamplerCorrection, grpo_loss  # noqa: E402
from lowmem_vt.kernels.chunked_logprobs import Tiles, chunked_logprobs, chunked_logprobs_reference  # noqa: E402
from lowmem_vt.kernels.fused_linear import RowTiles  # noqa: E402
from lowmem_vt.kernels.head import TRITON_HEAD, fused_grpo_loss, resolve_backend, token_logprobs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# small tiles so that the interpreter stays fast and the shapes below leave ragged tiles
SMALL = Tiles(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=1)
SMALL_ROWS = RowTiles(block_v=32, num_warps=4)
HEADS = ("triton_fused_linear", "triton_streaming")
LOGP_TOL = 1e-5
GRAD_TOL = 1e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


def make_head(N: int, H: int, V: int, dtype=torch.float32):
    """hidden, weight (logits of std ~3, so the softmax is neither flat nor one-hot), targets."""
    hidden = torch.randn(N, H, device=DEVICE, dtype=dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 3.0 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    return hidden, weight, targets


def head_kwargs(head: str, v_splits: int | None = 2) -> dict:
    """Small launch shapes for a head: ragged tiles for the streaming one, several row chunks (of 16) for the
    fused-linear one."""
    if head == "triton_streaming":
        tiles = replace(SMALL, v_splits=v_splits)
        return dict(forward_tiles=tiles, backward_tiles=tiles)
    if head == "triton_fused_linear":
        return dict(row_tiles=SMALL_ROWS, chunk_rows=16)
    return {}


def ragged_mask(B: int, T: int) -> torch.Tensor:
    """Each completion keeps a random prefix of at least half its length; the first is empty (all padding)."""
    lengths = torch.randint(T // 2, T + 1, (B,), device=DEVICE)
    lengths[0] = 0
    return (torch.arange(T, device=DEVICE)[None, :] < lengths[:, None]).float()


# ----------------------------------------------------------------------------------------------------
# backend resolution
# ----------------------------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == "triton"
    for name in ("torch", "triton", *HEADS):
        assert resolve_backend(name, cuda) == name
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in ("triton", *HEADS):
        assert resolve_backend(name, cpu) == name
    monkeypatch.delenv("TRITON_INTERPRET")
    for name in ("triton", *HEADS):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_backend(name, cpu)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda", cpu)
    assert TRITON_HEAD in HEADS


def test_rejects_hidden_size_not_multiple_of_16():
    hidden, weight, targets = make_head(8, 24, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        chunked_logprobs(hidden, weight, targets, forward_tiles=SMALL, backward_tiles=SMALL)


# ----------------------------------------------------------------------------------------------------
# chunked_logprobs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N, H, V, temperature, v_splits, weight_grad",
    [
        (64, 32, 256, 1.0, 1, False),  # every dimension a multiple of its tile
        (70, 32, 300, 0.7, 3, False),  # ragged rows and vocabulary, 3 vocabulary splits
        (37, 16, 97, 1.3, None, True),  # ragged everywhere, dW requested
        (5, 32, 33, 1.0, 2, True),  # fewer rows than a tile; last split holds one column
    ],
)
def test_chunked_logprobs_matches_reference(seed, N, H, V, temperature, v_splits, weight_grad):
    hidden, weight, targets = make_head(N, H, V)
    tiles = replace(SMALL, v_splits=v_splits)
    grad_out = torch.randn(N, device=DEVICE)
    grad_out[16:32] = 0.0  # a row block (or part of one) with zero gradient: the backward skips whole ones
    results = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_grad)
        logp = chunked_logprobs(h, w, targets, temperature, backend, forward_tiles=tiles, backward_tiles=tiles)
        logp.backward(grad_out)
        results[backend] = (logp.detach(), h.grad, w.grad)
    (logp, dh, dw), (logp_ref, dh_ref, dw_ref) = results["triton"], results["torch"]
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert rel_err(logp, logp_ref) < LOGP_TOL, f"seed={seed} logp rel err {rel_err(logp, logp_ref):.2e}"
    assert rel_err(dh, dh_ref) < GRAD_TOL, f"seed={seed} dh rel err {rel_err(dh, dh_ref):.2e}"
    if weight_grad:
        assert rel_err(dw, dw_ref) < GRAD_TOL, f"seed={seed} dW rel err {rel_err(dw, dw_ref):.2e}"
    else:
        assert dw is None


@pytest.mark.parametrize("head", HEADS)
def test_token_logprobs_matches_reference(seed, head):
    B, T, H, V = 3, 11, 32, 150
    hidden, weight, targets = make_head(B * T, H, V)
    hidden = hidden.view(B, T, H).requires_grad_(True)
    kwargs = head_kwargs(head)
    kwargs.pop("backward_tiles", None)
    logp = token_logprobs(hidden, weight, targets.view(B, T), 0.9, head, **kwargs)
    logp_ref = token_logprobs(hidden, weight, targets.view(B, T), 0.9, "torch")
    assert logp.shape == (B, T) and logp.dtype == torch.float32 and not logp.requires_grad
    assert rel_err(logp, logp_ref) < LOGP_TOL, f"seed={seed} rel err {rel_err(logp, logp_ref):.2e}"


# ----------------------------------------------------------------------------------------------------
# fused_grpo_loss
# ----------------------------------------------------------------------------------------------------


def grpo_inputs(B: int, T: int, H: int, V: int, with_old: bool, with_ref: bool, temperature: float = 1.0):
    hidden, weight, targets = make_head(B * T, H, V)
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden, weight, targets, temperature).view(B, T)
    # perturbations of 0.5 nat push about a third of the ratios past the clip bound on their advantage's side
    old_logp = logp + 0.5 * torch.randn(B, T, device=DEVICE) if with_old else None
    ref_logp = logp + 0.3 * torch.randn(B, T, device=DEVICE) if with_ref else None
    return dict(
        hidden=hidden.view(B, T, H),
        weight=weight,
        targets=targets.view(B, T),
        mask=ragged_mask(B, T),
        advantages=torch.randn(B, device=DEVICE),
        old_logp=old_logp,
        ref_logp=ref_logp,
    )


def run_loss(inputs, backend, weight_grad, **kwargs):
    h = inputs["hidden"].clone().requires_grad_(True)
    w = inputs["weight"].clone().requires_grad_(weight_grad)
    args = {**inputs, "hidden": h, "weight": w}
    loss, stats, logp = fused_grpo_loss(**args, backend=backend, **head_kwargs(backend), **kwargs)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), stats, logp, h.grad, w.grad


def check_against_reference(msg, inputs, result, reference, weight_grad, with_old=False, loss_tol=LOGP_TOL, grad_tol=GRAD_TOL):
    """Assert a Triton head's (loss, stats, logp, dh, dW) match the torch backend's within the fp32 bounds.
    logp is compared on real tokens only (the fused-linear head skips padding and leaves it 0)."""
    loss, stats, logp, dh, dw = result
    loss_ref, stats_ref, logp_ref, dh_ref, dw_ref = reference
    active = inputs["mask"] != 0
    B, T = active.shape
    assert loss.shape == () and loss.dtype == torch.float32
    assert logp.shape == (B, T) and logp.dtype == torch.float32 and not logp.requires_grad
    if active.any():
        assert rel_err(logp[active], logp_ref[active]) < LOGP_TOL, f"{msg}: logp rel err {rel_err(logp[active], logp_ref[active]):.2e}"
    assert abs(float(loss) - float(loss_ref)) <= loss_tol * max(1.0, abs(float(loss_ref))), f"{msg}: loss {float(loss)} vs {float(loss_ref)}"
    assert stats.keys() == stats_ref.keys(), msg
    assert float(stats["tokens"]) == float(stats_ref["tokens"]), msg
    assert abs(float(stats["kl_sum"]) - float(stats_ref["kl_sum"])) <= 1e-4 * max(1.0, abs(float(stats_ref["kl_sum"]))), f"{msg}: {stats} vs {stats_ref}"
    # a ratio within rounding of a clip bound may fall on either side
    assert abs(float(stats["clipped_tokens"]) - float(stats_ref["clipped_tokens"])) <= 1.0, f"{msg}: {stats} vs {stats_ref}"
    if with_old:
        assert float(stats_ref["clipped_tokens"]) > 0, f"{msg}: test inputs should exercise the clip"
    assert torch.isfinite(dh).all(), msg
    if float(dh_ref.abs().max()) == 0.0:
        assert float(dh.abs().max()) == 0.0, msg
    else:
        assert rel_err(dh, dh_ref) < grad_tol, f"{msg}: dh rel err {rel_err(dh, dh_ref):.2e}"
    if weight_grad:
        assert rel_err(dw, dw_ref) < GRAD_TOL, f"{msg}: dW rel err {rel_err(dw, dw_ref):.2e}"
    else:
        assert dw is None


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(
    "loss_type, with_old, with_ref, beta, temperature, weight_grad",
    [
        ("grpo", False, True, 0.04, 1.0, False),
        ("grpo", True, True, 0.1, 0.7, True),
        ("dr_grpo", True, True, 0.04, 1.3, False),
        ("dr_grpo", False, False, 0.0, 1.0, False),
        ("bnpo", True, False, 0.04, 0.7, False),  # beta set but no reference: no KL term
        ("bnpo", False, True, 0.1, 1.0, True),
    ],
)
def test_fused_grpo_loss_matches_reference(seed, head, loss_type, with_old, with_ref, beta, temperature, weight_grad):
    B, T, H, V = 5, 13, 32, 300  # 65 rows: ragged row tiles / chunks; 300 columns: ragged vocabulary tile
    inputs = grpo_inputs(B, T, H, V, with_old, with_ref, temperature)
    mask = inputs["mask"]
    counts = LossCounts(num_sequences=2 * B, num_tokens=float(mask.sum()) + 7.0, max_completion_length=T + 3)
    kwargs = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, counts=counts, temperature=temperature)
    result = run_loss(inputs, head, weight_grad, **kwargs)
    reference = run_loss(inputs, "torch", weight_grad, **kwargs)

    # the torch backend is exactly lowmem_vt.grpo.grpo_loss on the reference log-probs
    _, stats_ref, logp_ref, _, _ = reference
    direct, direct_stats = grpo_loss(
        logp_ref, mask, inputs["advantages"], inputs["old_logp"], inputs["ref_logp"],
        **{k: v for k, v in kwargs.items() if k != "temperature"},
    )
    assert float(direct) == float(reference[0]) and direct_stats == stats_ref, f"seed={seed}"
    check_against_reference(f"seed={seed} {head} {loss_type} old={with_old} ref={with_ref}", inputs, result, reference,
                            weight_grad, with_old)


def odd_case(name: str):
    """Inputs of one edge case from issue 15's review list: (inputs, counts)."""
    shapes = {"B1": (1, 9, 32, 77), "T1": (6, 1, 16, 50), "ragged": (3, 21, 48, 129), "all_masked": (3, 8, 16, 40),
              "targets_0_and_V-1": (2, 12, 16, 64), "large_logits": (2, 12, 16, 64), "more_splits_than_tiles": (2, 10, 16, 40),
              "strided": (3, 10, 32, 70), "mostly_clipped": (4, 10, 16, 60)}
    B, T, H, V = shapes[name]
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True)
    if name == "all_masked":
        inputs["mask"].zero_()
    if name == "targets_0_and_V-1":
        inputs["targets"][:, ::2] = 0
        inputs["targets"][:, 1::2] = V - 1
    if name == "large_logits":  # logits of order 1e3: the online log-sum-exp must not overflow
        inputs["weight"] = inputs["weight"] * 300.0
    if name == "strided":  # hidden a non-contiguous view: every other column of a wider tensor
        inputs["hidden"] = torch.randn(B, T, 2 * H, device=DEVICE)
    if name in ("large_logits", "mostly_clipped", "targets_0_and_V-1"):
        with torch.no_grad():  # old / ref near the (new) policy
            B_, T_, H_ = inputs["hidden"].shape
            logp = chunked_logprobs_reference(inputs["hidden"].reshape(-1, H_), inputs["weight"], inputs["targets"].reshape(-1)).view(B_, T_)
        inputs["ref_logp"] = logp + 0.3 * torch.randn_like(logp)
        inputs["old_logp"] = logp + 0.5 * torch.randn_like(logp)
        if name == "mostly_clipped":  # ratios e^{+-2} on the side of each advantage's sign: every token clips
            inputs["old_logp"] = logp - 2.0 * torch.sign(inputs["advantages"])[:, None]
    counts = LossCounts(num_sequences=B, num_tokens=max(float(inputs["mask"].sum()), 1.0), max_completion_length=T)
    return inputs, counts


ODD_CASES = ["B1", "T1", "ragged", "all_masked", "targets_0_and_V-1", "large_logits", "more_splits_than_tiles",
             "strided", "mostly_clipped"]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy warns of any inf / NaN, even transient
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", ODD_CASES)
def test_fused_grpo_loss_odd_shapes(seed, head, case):
    inputs, counts = odd_case(case)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts)
    extra = head_kwargs(head, v_splits=8 if case == "more_splits_than_tiles" else 2)
    result = []
    for backend, kw in ((head, extra), ("torch", {})):
        leaf = inputs["hidden"].detach().clone().requires_grad_(True)
        hidden = leaf[..., ::2] if case == "strided" else leaf
        loss, stats, logp = fused_grpo_loss(**{**inputs, "hidden": hidden}, backend=backend, **kw, **kwargs)
        loss.backward()
        result.append((loss.detach(), stats, logp, leaf.grad, None))
    # logits ~1e3 carry absolute rounding ~1e-4 into every log-prob (fp32 ulp), whatever the summation order
    tol = dict(loss_tol=1e-3, grad_tol=1e-3) if case == "large_logits" else {}
    check_against_reference(f"seed={seed} {head} {case}", {**inputs, "hidden": hidden}, result[0], result[1], False,
                            case == "mostly_clipped", **tol)
    if case == "mostly_clipped":
        assert float(result[1][1]["clipped_tokens"]) == float(inputs["mask"].sum()), "the case should clip every token"


def test_fused_grpo_loss_rejects_unknown_loss_type():
    inputs = grpo_inputs(2, 3, 16, 20, with_old=False, with_ref=False)
    counts = LossCounts(num_sequences=2, num_tokens=6.0, max_completion_length=3)
    with pytest.raises(ValueError, match="loss_type"):
        fused_grpo_loss(**inputs, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="sum", counts=counts)


def test_loss_types_are_all_covered():
    covered = {"grpo", "dr_grpo", "bnpo"} | {case[0] for case in MENU_CASES}
    assert covered == set(LOSS_TYPES), "add the new loss type to test_fused_grpo_loss_matches_reference / MENU_CASES"


# issue 27: the rest of the menu through both heads (the heads as log-prob heads, the loss terms in torch on
# [B, T]); each loss type at both levels, the correction modes and the masks spread over the cases
_MASKS = LossVariant(delta=1.6, top_entropy_quantile=0.6, off_policy_mask_threshold=0.1, bias_corrected_kl=True)
MENU_CASES = [
    # loss_type, level, correction, masks, weight_grad
    ("dapo", "token", "none", False, False),
    ("dapo", "sequence", "token_truncate", True, True),
    ("cispo", "token", "token_mask", False, False),
    ("cispo", "sequence", "sequence_truncate", True, False),
    ("sapo", "token", "sequence_mask", True, False),
    ("sapo", "sequence", "none", False, True),
    ("luspo", "token", "token_truncate", False, False),
    ("luspo", "sequence", "sequence_mask", True, False),
    ("vespo", "token", "token_mask", True, True),
    ("vespo", "sequence", "none", False, False),
    ("grpo", "sequence", "sequence_truncate", False, False),
    ("grpo", "token", "token_mask", True, False),
    ("dr_grpo", "sequence", "token_truncate", True, False),
    ("bnpo", "token", "sequence_mask", False, False),
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("loss_type, level, correction, masks, weight_grad", MENU_CASES)
def test_menu_through_the_heads_matches_reference(seed, head, loss_type, level, correction, masks, weight_grad):
    B, T, H, V = 4, 11, 32, 150
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True, temperature=0.9)
    inputs["sampling_logp"] = inputs["old_logp"] + 0.3 * torch.randn(B, T, device=DEVICE)
    variant = replace(_MASKS, importance_sampling_level=level) if masks else LossVariant(importance_sampling_level=level)
    counts = LossCounts(num_sequences=B, num_tokens=float(inputs["mask"].sum()), max_completion_length=T)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28, loss_type=loss_type,
                  counts=counts, temperature=0.9, variant=variant,
                  correction=SamplerCorrection(correction, clip_min=0.5 if "mask" in correction else None, clip_max=2.0))
    result = run_loss(inputs, head, weight_grad, **kwargs)
    reference = run_loss(inputs, "torch", weight_grad, **kwargs)
    for key in reference[1]:  # TRL's metrics' sums: the same from the head's log-probs
        assert abs(float(result[1][key]) - float(reference[1][key])) <= 1e-4 * max(1.0, abs(float(reference[1][key]))) + 1.0 * (
            key in ("clip_low", "clip_high", "clip_region", "cispo_clipped", "clipped_tokens", "is_masked")), (key, seed)
    # VESPO's weight exp(lambda + k log w - lambda w) of the *summed* log-ratio multiplies the head's ~1e-6 log-prob
    # rounding by up to |k - lambda w| x T: the loss alone gets 1e-4 there (the terms themselves: test_fused_menu.py)
    check_against_reference(f"seed={seed} {head} {loss_type} {level} {correction} masks={masks}", inputs, result, reference,
                            weight_grad, loss_tol=1e-4 if loss_type == "vespo" else LOGP_TOL)


@pytest.mark.parametrize("vocab", [151_936, 248_320, 262_144])  # Qwen2-VL; the newest Qwen and Gemma vocabularies
def test_fused_linear_scratch_within_budget(vocab):
    from lowmem_vt.kernels.fused_linear import SCRATCH_BYTES, rows_per_chunk

    assert SCRATCH_BYTES <= 2**28 and rows_per_chunk(vocab) * vocab * 4 <= SCRATCH_BYTES


def test_the_paper_loss_runs_fused_and_the_menu_through_the_log_prob_heads(monkeypatch):
    """The split of kernels/head.py is explicit: the paper's loss (and dapo, its aggregation alone) in the fused
    kernels, everything else through ``head_logprobs``; never a silent switch."""
    import lowmem_vt.kernels.head as head_module

    calls = []
    real = head_module.head_logprobs
    monkeypatch.setattr(head_module, "head_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    inputs = grpo_inputs(2, 5, 16, 40, with_old=True, with_ref=True)
    counts = LossCounts(num_sequences=2, num_tokens=float(inputs["mask"].sum()), max_completion_length=5)
    base = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, counts=counts, backend="triton_fused_linear",
                **head_kwargs("triton_fused_linear"))
    for loss_type in ("grpo", "dr_grpo", "bnpo", "dapo"):
        fused_grpo_loss(**inputs, loss_type=loss_type, **base)
    assert calls == []
    fused_grpo_loss(**inputs, loss_type="cispo", **base)
    fused_grpo_loss(**inputs, loss_type="grpo", variant=LossVariant(importance_sampling_level="sequence"), **base)
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------------
# the references themselves, by finite differences in float64
# ----------------------------------------------------------------------------------------------------


def test_reference_logprobs_gradcheck(seed):
    N, H, V = 6, 4, 9
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    fn = lambda h, w: chunked_logprobs_reference(h, w, targets, temperature=0.8, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight)), f"seed={seed}"


def test_reference_grpo_loss_gradcheck(seed):
    B, T, H, V = 3, 4, 4, 7
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden.view(-1, H), weight, targets.view(-1)).view(B, T)
    # ratios e^{+-0.5} sit far from the clip bounds 0.8 / 1.28, where the loss is not differentiable
    old_logp = logp + 0.5 * torch.sign(torch.randn(B, T, dtype=torch.float64))
    ref_logp = logp + 0.2 * torch.randn(B, T, dtype=torch.float64)
    mask = ragged_mask(B, T).double().cpu()
    counts = LossCounts(num_sequences=B, num_tokens=float(mask.sum()), max_completion_length=T)

    def fn(h, w):
        loss, _, _ = fused_grpo_loss(
            h, w, targets, mask, torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
            old_logp, ref_logp, beta=0.1, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts,
            temperature=1.1, backend="torch",
        )
        return loss

    assert torch.autograd.gradcheck(fn, (hidden, weight)), f"seed={seed}"


# ----------------------------------------------------------------------------------------------------
# bf16 on the GPU (the interpreter cannot read bf16 with CPU torch)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit Triton kernels at real sizes need CUDA (the interpreter misreads bf16)")
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_half_on_cuda(seed, head, dtype, loss_type):
    B, T, H, V = 4, 250, 256, 5003  # the launch table's tiles, ragged rows and vocabulary
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True, temperature=0.9)
    inputs["hidden"] = inputs["hidden"].to(dtype)
    inputs["weight"] = inputs["weight"].to(dtype)
    counts = LossCounts(num_sequences=B, num_tokens=float(inputs["mask"].sum()), max_completion_length=T)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, counts=counts, temperature=0.9)
    results = {}
    for backend in (head, "torch"):
        h = inputs["hidden"].clone().requires_grad_(True)
        loss, stats, logp = fused_grpo_loss(**{**inputs, "hidden": h}, backend=backend, **kwargs)
        loss.backward()
        results[backend] = (loss.detach(), logp, h.grad)
    (loss, logp, dh), (loss_ref, logp_ref, dh_ref) = results[head], results["torch"]
    active = inputs["mask"] != 0
    assert dh.dtype == dtype
    # products of 16-bit values are exact in fp32, so the log-probs differ only by summation order
    assert rel_err(logp[active], logp_ref[active]) < 1e-4, f"seed={seed} logp rel err {rel_err(logp[active], logp_ref[active]):.2e}"
    assert abs(float(loss) - float(loss_ref)) <= 1e-3 * max(1.0, abs(float(loss_ref))), f"seed={seed}"
    # dlogits are rounded to 16 bits before the second matmul
    assert rel_err(dh, dh_ref) < 2e-2, f"seed={seed} dh rel err {rel_err(dh, dh_ref):.2e}"

    if head == "triton_streaming":
        logp_only = chunked_logprobs(inputs["hidden"].view(B * T, H), inputs["weight"], inputs["targets"].view(-1), 0.9)
        assert rel_err(logp_only, logp_ref.view(-1)) < 1e-4, f"seed={seed}"
    ref_pass = token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], 0.9, head)
    assert rel_err(ref_pass, logp_ref) < 1e-4, f"seed={seed}"


# ----------------------------------------------------------------------------------------------------
# custom ops: fake tensors, torch.compile, opcheck; targets and padding
# ----------------------------------------------------------------------------------------------------


def _forbid_launches(monkeypatch):
    """Make every Triton kernel of the package raise if launched."""
    import lowmem_vt.kernels.chunked_logprobs as cl
    import lowmem_vt.kernels.fused_linear as fl
    import lowmem_vt.kernels.grpo_loss as gl

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a Triton kernel was launched under FakeTensorMode")

    for module in (cl, fl, gl):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_loss_head_under_fake_tensor_mode(monkeypatch, head, weight_grad):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _forbid_launches(monkeypatch)
    B, T, H, V = 8, 1024, 1536, 151_936  # the real head: fake tensors cost no memory
    with FakeTensorMode():
        hidden = torch.empty(B, T, H, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(V, H, dtype=torch.bfloat16, requires_grad=weight_grad)
        targets = torch.zeros(B, T, dtype=torch.long)
        mask = torch.ones(B, T)
        old_logp, ref_logp = torch.zeros(B, T), torch.zeros(B, T)
        counts = LossCounts(num_sequences=B, num_tokens=float(B * T), max_completion_length=T)
        loss, stats, logp = fused_grpo_loss(
            hidden, weight, targets, mask, torch.zeros(B), old_logp, ref_logp,
            beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts, backend=head,
        )
        loss.backward()
        ref = token_logprobs(hidden.detach(), weight.detach(), targets, backend=head)
        only = chunked_logprobs(hidden.detach().view(B * T, H), weight.detach(), targets.view(-1), backend="triton")
    assert loss.shape == () and loss.dtype == torch.float32
    assert logp.shape == (B, T) and ref.shape == (B, T) and only.shape == (B * T,)
    assert set(stats) == {"kl_sum", "clipped_tokens", "tokens"} and all(v.shape == () for v in stats.values())
    assert hidden.grad.shape == (B, T, H) and hidden.grad.dtype == torch.bfloat16
    if weight_grad:
        assert weight.grad.shape == (V, H) and weight.grad.dtype == torch.bfloat16
    else:
        assert weight.grad is None


@pytest.mark.parametrize("head", HEADS)
def test_loss_head_under_torch_compile(seed, head):
    """The ops trace into one graph (fullgraph) through their fake implementations and give eager's results."""
    torch._dynamo.reset()
    B, T, H, V = 3, 7, 32, 90
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True)
    counts = LossCounts(num_sequences=B, num_tokens=float(inputs["mask"].sum()), max_completion_length=T)

    def step(hidden):
        loss, stats, logp = fused_grpo_loss(
            **{**inputs, "hidden": hidden}, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo",
            counts=counts, backend=head, **head_kwargs(head),
        )
        return loss, stats["kl_sum"], logp

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        h = inputs["hidden"].clone().requires_grad_(True)
        loss, kl_sum, logp = fn(h)
        loss.backward()
        results.append((loss.detach(), kl_sum, logp, h.grad))
    for eager, traced in zip(*results):
        assert torch.allclose(eager, traced, rtol=1e-6, atol=0), f"seed={seed}"


def test_custom_ops_opcheck(seed):
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration."""
    N, H, V = 20, 16, 40
    hidden, weight, targets = make_head(N, H, V)
    tiles = replace(SMALL, v_splits=2).as_list()
    h = hidden.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.lowmem_vt.streaming_logprobs, (h, weight, targets, 0.9, tiles, tiles))
    lse = chunked_logprobs_reference(hidden, weight, targets) * 0  # any [N] fp32 will do for the shape checks
    torch.library.opcheck(
        torch.ops.lowmem_vt.streaming_logprobs_backward,
        (hidden, weight, targets, lse, torch.randn(N), 1.0, tiles, True, False),
    )
    adv, w = torch.randn(4), torch.rand(N)
    torch.library.opcheck(
        torch.ops.lowmem_vt.streaming_grpo_loss,
        (h, weight, targets, adv, torch.randn(N), None, w, 5, 0.04, 0.8, 1.28, 1.0, tiles, tiles),
    )
    w[3:7] = 0.0  # skipped rows
    rows = SMALL_ROWS.as_list()
    torch.library.opcheck(torch.ops.lowmem_vt.fused_linear_logprobs, (hidden, weight, targets, 0.9, 8, rows))
    for compute_dw in (False, True):
        torch.library.opcheck(
            torch.ops.lowmem_vt.fused_linear_grpo_loss,
            (h, weight.clone().requires_grad_(compute_dw), targets, adv, None, torch.randn(N), w, 5, 0.04, 0.8, 1.28, 0.7,
             8, rows, True, compute_dw),
        )


@pytest.mark.parametrize("backend", [*HEADS, "torch"])
@pytest.mark.parametrize("bad", [-1, 40])
def test_targets_out_of_range_raise(backend, bad):
    B, T, H, V = 2, 5, 16, 40
    inputs = grpo_inputs(B, T, H, V, with_old=False, with_ref=True)
    inputs["targets"][1, 3] = bad
    counts = LossCounts(num_sequences=B, num_tokens=float(B * T), max_completion_length=T)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 40\).*\[" + str(bad)):
        fused_grpo_loss(**inputs, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", counts=counts,
                        backend=backend, **head_kwargs(backend))
    with pytest.raises(ValueError, match="targets must be token ids"):
        token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend=backend)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("backend", [*HEADS, "torch"])
def test_padding_never_inf_or_nan(seed, backend):
    """Padded tokens with absurd old / ref log-probs (exp would overflow) leave loss and gradients finite."""
    B, T, H, V = 4, 9, 16, 50
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True)
    pad = inputs["mask"] == 0
    assert pad.any()
    inputs["old_logp"][pad] = -1e4  # ratio exp(logp + 1e4) = inf
    inputs["ref_logp"][pad] = 1e4  # k3 = exp(1e4 - logp) = inf
    counts = LossCounts(num_sequences=B, num_tokens=float(inputs["mask"].sum()), max_completion_length=T)
    loss, stats, _, dh, dw = run_loss(
        inputs, backend, True,
        beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts,
    )
    assert torch.isfinite(loss), f"seed={seed} loss {loss}"
    assert all(torch.isfinite(v) for v in stats.values()), f"seed={seed} {stats}"
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all(), f"seed={seed}"


# ----------------------------------------------------------------------------------------------------
# fp16 (the T4 has no bf16): the interpreter reads fp16 correctly
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_fp16_matches_reference(seed, head):
    """fp16 hidden / head against the reference on the same fp16 values (computed in fp32). The aggregation
    weights here are those of a real batch (1 / 45,000 tokens): with d logits rounded to fp16 *after*
    scaling by them, most would flush to zero; the kernels scale the fp32 matmul result instead."""
    B, T, H, V = 3, 10, 32, 3000  # most probabilities below fp16's smallest normal (6e-5)
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True)
    inputs["hidden"] = inputs["hidden"].half()
    inputs["weight"] = inputs["weight"].half()
    counts = LossCounts(num_sequences=64, num_tokens=45_000.0, max_completion_length=700)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo", counts=counts)
    results = {}
    for backend in (head, "torch"):
        h = inputs["hidden"].clone().requires_grad_(True)
        loss, stats, logp = fused_grpo_loss(**{**inputs, "hidden": h}, backend=backend, **head_kwargs(backend), **kwargs)
        (loss * 2.0**15).backward()  # the fp16 loss scale (lowmem_vt.grpo.loss_scale) keeps dh in fp16's range
        results[backend] = (loss.detach(), logp, h.grad)
    (loss, logp, dh), (loss_ref, logp_ref, dh_ref) = results[head], results["torch"]
    active = inputs["mask"] != 0
    assert dh.dtype == torch.float16 and torch.isfinite(dh).all()
    assert rel_err(logp[active], logp_ref[active]) < 1e-5, f"seed={seed} logp rel err {rel_err(logp[active], logp_ref[active]):.2e}"
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * max(1.0, abs(float(loss_ref))), f"seed={seed}"
    # d logits are rounded to fp16 (11 bits) before the second matmul
    assert rel_err(dh, dh_ref) < 5e-3, f"seed={seed} dh rel err {rel_err(dh, dh_ref):.2e}"
    ref_pass = token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], 1.0, head)
    assert rel_err(ref_pass, logp_ref) < 1e-5, f"seed={seed}"


# ----------------------------------------------------------------------------------------------------
# the trainer's loss path with each Triton head
# ----------------------------------------------------------------------------------------------------


def test_trainer_step_with_triton_heads(recipe_factory):
    """One trainer step (reference pass, two policy updates on one rollout, so old log-probs too) with
    ``kernels:`` set to each Triton head gives the torch backend's loss, KL and gradient norm."""
    from lowmem_vt.trainer import Trainer

    settings = {"data.generated_tasks": "[color]", "data.generated_samples": 32, "rewards.funcs": "[accuracy]",
                "grpo.max_completion_length": 1, "grpo.num_generations": 16, "grpo.beta": 0.04, "grpo.num_iterations": 2,
                "train.prompts_per_step": 2, "train.micro_batch_size": 16, "train.max_steps": 1, "log.save_steps": 1000,
                "log.sample_every": 0}
    metrics = {}
    for kernels in ("torch", "triton", *HEADS):
        torch.manual_seed(0)
        tr = Trainer(recipe_factory(**settings, kernels=kernels))
        assert tr.kernel_backend == (TRITON_HEAD if kernels == "triton" else kernels)  # the alias names the head
        metrics[kernels] = tr.step()
        tr.close()  # releases the run folder for the next backend's trainer
    ref = metrics["torch"]
    assert ref["grad_norm"] > 0, "the task should give a gradient"
    for kernels in ("triton", *HEADS):
        for key in ("loss", "kl", "grad_norm"):
            got, want = metrics[kernels][key], ref[key]
            assert abs(got - want) <= 1e-4 * max(abs(want), 1e-3), f"{kernels} {key}: {got} vs torch {want}"


@pytest.mark.parametrize("head", HEADS)
def test_default_tiles_match_reference(seed, head):
    """The package's default launch shapes (128 x 128 x 64 streaming tiles; 2048-column row kernel and the
    0.25 GiB chunk budget), with ragged rows (200 = 128 + 72) and vocabulary (1000 columns)."""
    B, T, H, V = 4, 50, 64, 1000
    inputs = grpo_inputs(B, T, H, V, with_old=True, with_ref=True, temperature=0.8)
    counts = LossCounts(num_sequences=B, num_tokens=float(inputs["mask"].sum()), max_completion_length=T)
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts, temperature=0.8)
    results = []
    for backend in (head, "torch"):
        h = inputs["hidden"].clone().requires_grad_(True)
        loss, stats, logp = fused_grpo_loss(**{**inputs, "hidden": h}, backend=backend, **kwargs)
        loss.backward()
        results.append((loss.detach(), stats, logp, h.grad, None))
    check_against_reference(f"seed={seed} {head} default tiles", inputs, results[0], results[1], False, True)
    logp = token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], 0.8, head)
    assert rel_err(logp, results[1][2]) < LOGP_TOL, f"seed={seed}"


def test_fused_linear_scratch_budget():
    """Rows per chunk keep the fp32 logits scratch within the budget at any N (N only changes the count of
    chunks), a multiple of 16 rows; the Qwen2-VL head gets 432 rows in 0.25 GiB."""
    from lowmem_vt.kernels.fused_linear import SCRATCH_BYTES, rows_per_chunk

    assert SCRATCH_BYTES == 2**28
    for V in (151_936, 32_000, 1000):
        rows = rows_per_chunk(V)
        assert rows % 16 == 0 and rows * V * 4 <= SCRATCH_BYTES < (rows + 16) * V * 4, V
    assert rows_per_chunk(151_936) == 432
    assert rows_per_chunk(151_936, 2**26) == 96
