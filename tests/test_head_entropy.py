"""Each token's entropy from both Triton heads' forward passes (issue 27, item 4), against the torch reference.

The streaming head carries the entropy beside the online log-sum-exp of each vocabulary split and merges the splits
with the lse (``chunked_logprobs._online_entropy_step``); the fused-linear head's row kernel computes it in its
log-sum-exp loop over the chunk's logits. Here, in fp32 under the Triton interpreter, on fresh random inputs (the
seed is printed; ``LOWMEM_TEST_SEED=<seed>`` reproduces): both equal ``chunked_entropy`` in float64, itself equal to
TRL 1.16's ``entropy_from_logits``, at a temperature other than 1, with padded rows, a vocabulary that is not a
multiple of any tile, several vocabulary splits and row chunks, -inf logits and logits of magnitude ~6000; the
comparison fails for the entropy at T = 1 when 0.7 was asked and for a split whose own entropy is dropped; and no
further logits pass happens (no ``chunked_entropy``, the same matmuls and kernel launches as without the entropy).

Error measure: ``max|x - ref| / max|ref|`` over the active tokens, bound 1e-5 (fp32 logits of H-term dot products).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowmem_vt.kernels.chunked_logprobs as chunked_module
import lowmem_vt.kernels.fused_linear as fused_module
import lowmem_vt.kernels.head as head_module
from lowmem_vt.kernels.chunked_logprobs import Tiles, chunked_entropy
from lowmem_vt.kernels.fused_linear import RowTiles
from lowmem_vt.kernels.head import head_logprobs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the Triton heads run under the interpreter (tests/conftest.py sets it) or on a GPU")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS = ("triton_fused_linear", "triton_streaming")
TOL = 1e-5


def _kwargs(head: str, v_splits: int = 3, block_v: int = 32) -> dict:
    """Small launch shapes: the streaming head in 16-row blocks, ``block_v``-column tiles and ``v_splits`` splits;
    the fused-linear head in 16-row chunks and ``block_v``-column steps of its row kernel."""
    if head == "triton_streaming":
        tiles = Tiles(block_n=16, block_v=block_v, block_h=16, num_warps=4, num_stages=1, v_splits=v_splits)
        return dict(forward_tiles=tiles, backward_tiles=tiles)
    return dict(chunk_rows=16, row_tiles=RowTiles(block_v=block_v, num_warps=4))


def _inputs(B: int, T: int, H: int, V: int, scale: float = 3.0):
    """hidden [B, T, H], weight [V, H] (logits of std ~scale), targets, a mask whose completions end early (the
    second one at half its length), so some rows are padding."""
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * scale / H**0.5
    targets = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, T // 2:] = 0.0
    mask[-1, -1] = 0.0
    return hidden, weight, targets, mask


def _reference(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 entropy of softmax(hidden @ weight.T / temperature), [B, T]."""
    B, T, H = hidden.shape
    return chunked_entropy(hidden.reshape(-1, H).double(), weight.double(), temperature).view(B, T)


def _error(entropy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    active = mask != 0
    x, ref = entropy[active].double(), reference[active].double()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _entropy(head, hidden, weight, targets, mask, temperature, grad=True, **kwargs):
    """(logp, entropy) [B, T] from ``head``; with ``grad`` the hidden states require a gradient, so the forward runs
    as in training (the fused-linear head's row kernel writes dlogits too). The backward is the count test's."""
    h = hidden.clone().requires_grad_(grad)
    logp, entropy = head_logprobs(h, weight, targets, mask, temperature, head, with_entropy=True, **kwargs)
    assert entropy.shape == targets.shape and entropy.dtype == torch.float32 and not entropy.requires_grad
    assert logp.requires_grad == grad
    return logp.detach(), entropy


def test_the_reference_is_trls_entropy(seed):
    """``chunked_entropy`` (float64, in chunks) equals TRL 1.16's ``entropy_from_logits`` on the same logits / T."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    hidden, weight, _, _ = _inputs(3, 5, 16, 301)
    logits = (hidden.reshape(-1, 16).double() @ weight.double().T) / 0.7
    ours = chunked_entropy(hidden.reshape(-1, 16).double(), weight.double(), 0.7, chunk_rows=4)
    torch.testing.assert_close(ours, trl_utils.entropy_from_logits(logits), rtol=1e-12, atol=0)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("B, T, H, V, temperature, v_splits, block_v", [
    (3, 11, 32, 300, 0.7, 3, 32),  # 33 rows: three 16-row blocks / chunks, the last ragged; V = 9.4 tiles, 3 splits
    (2, 5, 16, 97, 1.3, 2, 32),  # fewer rows than a block; the last split holds one ragged tile
    (4, 9, 16, 515, 0.7, 5, 64),  # five splits of 2 tiles; the row kernel's last step holds 3 columns
    (2, 7, 32, 256, 1.0, 1, 32),  # every dimension a multiple of its tile, one split
])
def test_entropy_from_each_head_equals_the_reference(seed, head, B, T, H, V, temperature, v_splits, block_v):
    hidden, weight, targets, mask = _inputs(B, T, H, V)
    logp, entropy = _entropy(head, hidden, weight, targets, mask, temperature, **_kwargs(head, v_splits, block_v))
    reference = _reference(hidden, weight, temperature)
    assert _error(entropy, reference, mask) < TOL, f"seed={seed} {head} entropy error {_error(entropy, reference, mask):.2e}"
    assert torch.isfinite(entropy).all()
    assert (entropy[mask != 0] > 0).all() and (entropy[mask != 0] <= torch.log(torch.tensor(float(V))) + 1e-5).all()
    if head == "triton_fused_linear":  # padded rows are skipped: logp and entropy 0 there
        assert (entropy[mask == 0] == 0).all() and (logp[mask == 0] == 0).all()


@pytest.mark.parametrize("head", HEADS)
def test_entropy_without_gradient(seed, head):
    """The reference-model style call (no gradient wanted): the fused-linear head's row kernel runs without dlogits."""
    hidden, weight, targets, mask = _inputs(2, 9, 16, 200)
    with torch.no_grad():
        _, entropy = _entropy(head, hidden, weight, targets, mask, 0.7, grad=False, **_kwargs(head))
    assert _error(entropy, _reference(hidden, weight, 0.7), mask) < TOL, f"seed={seed}"


@pytest.mark.parametrize("head", HEADS)
def test_entropy_with_minus_inf_logits(seed, head):
    """Tokens whose logit is -inf (probability 0) add nothing: no 0 * -inf NaN in the running sums. Forward only
    (a -inf weight has no finite gradient)."""
    B, T, H, V = 2, 9, 16, 150
    hidden, weight, targets, mask = _inputs(B, T, H, V)
    hidden[..., 0] = 1.0
    dead = torch.tensor([0, 1, 31, 32, 77, V - 1], device=DEVICE)  # tile edges and the vocabulary's ends
    weight[dead, 0] = float("-inf")
    targets[targets.unsqueeze(-1).eq(dead).any(-1)] = 5
    with torch.no_grad():
        logp, entropy = _entropy(head, hidden, weight, targets, mask, 0.7, grad=False, **_kwargs(head))
    reference = _reference(hidden, weight, 0.7)
    assert torch.isfinite(reference).all() and torch.isfinite(entropy[mask != 0]).all()
    assert torch.isfinite(logp[mask != 0]).all()
    assert _error(entropy, reference, mask) < TOL, f"seed={seed} {head} {_error(entropy, reference, mask):.2e}"


@pytest.mark.parametrize("head", HEADS)
def test_entropy_at_large_logits(seed, head):
    """Logits ~ 3000 / 0.5 = 6000 that fp32 holds exactly (integer weights and hiddens, T a power of two), so any
    error is the entropy's arithmetic: centred on the running max, the heads keep 1e-5; ``lse - sum(p * z)`` in fp32
    subtracts two numbers of ~6000 (ulp 5e-4) and does not, which the test shows on the same logits."""
    B, T, H, V = 2, 9, 16, 300
    hidden = torch.randint(-2, 3, (B, T, H), device=DEVICE).float()
    hidden[..., 0] = 1.0
    weight = torch.randint(-1, 2, (V, H), device=DEVICE).float()
    weight[:, 0] = 3000.0
    targets = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    reference = _reference(hidden, weight, 0.5)
    _, entropy = _entropy(head, hidden, weight, targets, mask, 0.5, **_kwargs(head))
    assert _error(entropy, reference, mask) < TOL, f"seed={seed} {head} {_error(entropy, reference, mask):.2e}"
    z = (hidden.reshape(-1, H) @ weight.T) / 0.5  # exact in fp32
    naive = (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).view(B, T)
    assert _error(naive, reference, mask) > 10 * TOL


@pytest.mark.parametrize("head", HEADS)
def test_the_comparison_fails_on_a_wrong_entropy(seed, head, monkeypatch):
    """Realistic faults fail the same comparison: the entropy at T = 1 when 0.7 was asked; in the streaming head,
    one vocabulary split's own entropy dropped before the merge (the chain rule's sum_s w_s h_s loses a term)."""
    hidden, weight, targets, mask = _inputs(3, 11, 32, 300)
    reference = _reference(hidden, weight, 0.7)
    _, at_one = _entropy(head, hidden, weight, targets, mask, 1.0, **_kwargs(head))
    assert _error(at_one, reference, mask) > 100 * TOL
    if head == "triton_streaming":
        real = chunked_module.lse_and_target_logits

        def drop_split(*args, **kwargs):
            part_lse, target_logit, splits, part_entropy = real(*args, **kwargs)
            part_entropy[1] = 0.0
            return part_lse, target_logit, splits, part_entropy

        monkeypatch.setattr(chunked_module, "lse_and_target_logits", drop_split)
        _, dropped = _entropy(head, hidden, weight, targets, mask, 0.7, **_kwargs(head, v_splits=3))
        assert _error(dropped, reference, mask) > 100 * TOL


class _CountOps(TorchDispatchMode):
    """Counts matrix products (aten.mm / addmm / bmm) dispatched inside it, outside custom ops (whose insides run
    below the mode)."""

    def __init__(self):
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


class _CountLaunches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("head", HEADS)
def test_no_further_logits_pass_for_the_entropy(seed, head, monkeypatch):
    """With the entropy on, the same matmuls (fused-linear head: inside its op, ``_mm_fp32``; none outside the ops)
    and the same kernel launches (streaming head) run as without it, forward and backward, and ``chunked_entropy``
    (the torch reference's extra pass) never runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("chunked_entropy called by a Triton head")

    monkeypatch.setattr(head_module, "chunked_entropy", refuse)
    monkeypatch.setattr(chunked_module, "chunked_entropy", refuse)
    launchers = {name: _CountLaunches(getattr(chunked_module, name))
                 for name in ("_lse_partial_kernel", "_logprobs_finish_kernel", "_logprobs_backward_kernel")}
    for name, counter in launchers.items():
        monkeypatch.setattr(chunked_module, name, counter)
    op_matmuls = []
    real_mm = fused_module._mm_fp32
    monkeypatch.setattr(fused_module, "_mm_fp32", lambda *a, **k: op_matmuls.append(1) or real_mm(*a, **k))
    hidden, weight, targets, mask = _inputs(3, 11, 32, 300)
    counts = {}
    for with_entropy in (False, True):
        for counter in launchers.values():
            counter.launches = 0
        op_matmuls.clear()
        h = hidden.clone().requires_grad_(True)
        with _CountOps() as ops:
            logp, entropy = head_logprobs(h, weight, targets, mask, 0.7, head, with_entropy=with_entropy, **_kwargs(head))
            (logp * mask).sum().backward()
        assert (entropy is not None) == with_entropy
        counts[with_entropy] = (ops.matmuls, len(op_matmuls), {name: c.launches for name, c in launchers.items()})
    assert counts[True] == counts[False], counts
    outside, inside, launches = counts[True]
    assert outside == 0, counts
    if head == "triton_fused_linear":  # 26 active rows of 33 in 2 chunks of 16: logits and dh each
        assert inside == 4 and sum(launches.values()) == 0, counts
    else:
        assert inside == 0 and launches == {"_lse_partial_kernel": 1, "_logprobs_finish_kernel": 1,
                                             "_logprobs_backward_kernel": 1}, counts


def test_entropy_ops_opcheck(seed):
    """torch.library.opcheck of the ops with the entropy on: schema, fake implementation against the real one (the
    shapes of entropy and dh), autograd registration."""
    N, H, V = 20, 16, 40
    hidden = torch.randn(N, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) / H**0.5
    targets = torch.randint(0, V, (N,), device=DEVICE)
    tiles = Tiles(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=1, v_splits=2).as_list()
    h = hidden.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.lowmem_vt.streaming_logprobs, (h, weight, targets, 0.9, tiles, tiles, True))
    active = (torch.rand(N, device=DEVICE) > 0.3).float()
    rows = RowTiles(block_v=32, num_warps=4).as_list()
    for args in ((active, True, True), (active, True, False), (None, True, False), (None, False, True)):
        torch.library.opcheck(torch.ops.lowmem_vt.fused_linear_logprobs, (hidden, weight, targets, 0.9, 8, rows, *args))
