"""Both Triton loss heads and the torch reference at Qwen3.5's vocabulary, V = 248,320 (untied head): values and
gradients in fp32 under the Triton interpreter at a small B x T (the fused-linear head at its default launch shapes,
the streaming head at wider tiles than its default), and the
scratch the heads hold at the recipes' B 8 x T 1024 on fake tensors, within today's budgets (the fused-linear
head's 0.25 GiB fp32 logits chunk; the planner's ``loss_head_bytes``)."""

import os
from types import SimpleNamespace

import pytest
import torch

from lowmem_vt.grpo import LossCounts
from lowmem_vt.kernels.chunked_logprobs import Tiles, chunked_logprobs_reference
from lowmem_vt.kernels.head import fused_grpo_loss
from lowmem_vt.planner import loss_head_bytes

V = 248_320  # Qwen3.5 (families.qwen3_5): 248,320 tokens, the head untied from the embeddings in the 9B model
HEADS = ("triton_fused_linear", "triton_streaming")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def inputs():
    """Logits of std ~3 over the whole vocabulary, targets spread over it (the last token included), a ragged mask."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 3, 16
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 3.0 / H**0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = V - 1
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden.view(-1, H), weight, targets.view(-1)).view(B, T)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=torch.tensor([1.0, -0.5]),
                old_logp=logp + 0.3 * torch.randn(B, T, generator=g), ref_logp=logp + 0.2 * torch.randn(B, T, generator=g))


# the streaming head with 1024-column tiles (242.5 of them across V: the last one ragged) in 3 vocabulary splits:
# its default 128-column tiles take two minutes in the interpreter. The fused-linear head runs its defaults.
STREAMING_TILES = Tiles(block_n=16, block_v=1024, block_h=16, num_warps=4, num_stages=1, v_splits=3)


def _loss(inputs, backend):
    h = inputs["hidden"].clone().requires_grad_(True)
    w = inputs["weight"].clone().requires_grad_(True)
    counts = LossCounts(num_sequences=2, num_tokens=float(inputs["mask"].sum()), max_completion_length=3)
    tiles = dict(forward_tiles=STREAMING_TILES, backward_tiles=STREAMING_TILES) if backend == "triton_streaming" else {}
    loss, stats, logp = fused_grpo_loss(**{**inputs, "hidden": h, "weight": w}, beta=0.04, epsilon_low=0.2,
                                        epsilon_high=0.28, loss_type="grpo", counts=counts, backend=backend, **tiles)
    (2.0 * loss).backward()
    return loss.detach(), logp, h.grad, w.grad


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton heads run under the interpreter (tests/conftest.py sets it) or on a GPU")
@pytest.mark.parametrize("head", HEADS)
def test_heads_equal_the_torch_reference_at_248k(inputs, head):
    """fp32: log-probs and loss within 1e-5, dh and dW within 1e-4 (relative to the largest)."""
    ref = _loss(inputs, "torch")
    got = _loss(inputs, head)
    active = inputs["mask"] != 0
    torch.testing.assert_close(ref[1][active], chunked_logprobs_reference(
        inputs["hidden"].view(-1, 16), inputs["weight"], inputs["targets"].view(-1)).view(2, 3)[active], atol=1e-5, rtol=0)
    assert _rel(got[1][active], ref[1][active]) < 1e-5
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * max(1.0, abs(float(ref[0])))
    assert _rel(got[2], ref[2]) < 1e-4
    assert _rel(got[3], ref[3]) < 1e-4
    assert float(ref[3][V - 1].abs().sum()) > 0  # the vocabulary's last row is reached (no column cut off)


def test_fused_linear_chunk_within_the_scratch_budget_at_248k():
    from lowmem_vt.kernels.fused_linear import SCRATCH_BYTES, rows_per_chunk

    rows = rows_per_chunk(V)
    assert rows % 16 == 0 and rows * V * 4 <= SCRATCH_BYTES < (rows + 16) * V * 4
    assert rows == 256


@pytest.mark.parametrize("head", [*HEADS, "torch"])
@pytest.mark.parametrize("H", [2560, 4096], ids=["4B", "9B"])
def test_head_memory_at_b8_t1024_within_the_planners_budget(head, H):
    """The loss and its backward at B 8 x T 1024 on fake tensors (bf16, the real head's size; no Triton launch):
    the Triton heads hold at most the scratch budget (one fp32 logits chunk) and [N, H] gradients, nothing
    [N, V]; the torch reference holds its fp32 [N, V] log-softmax, as the planner's ``loss_head_bytes`` says (5 %).
    The planner's figure for the Triton heads is printed beside the measure (the fused-linear head's is below it
    at this vocabulary: the policy update's peak is a decoder layer's backward, gigabytes, not the head's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_vt.kernels.fused_linear import SCRATCH_BYTES
    from lowmem_vt.simulate import LiveBytes

    B, T = 8, 1024
    N = B * T
    with FakeTensorMode():
        hidden = torch.empty(B, T, H, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(V, H, dtype=torch.bfloat16)
        targets = torch.zeros(B, T, dtype=torch.long)
        mask, old, ref = torch.ones(B, T), torch.zeros(B, T), torch.zeros(B, T)
        counts = LossCounts(num_sequences=B, num_tokens=float(N), max_completion_length=T)
        tracker = LiveBytes()
        with tracker:
            loss, _, _ = fused_grpo_loss(hidden, weight, targets, mask, torch.zeros(B), old, ref, beta=0.04,
                                         epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", counts=counts, backend=head)
            loss.backward()
    held = tracker.peak
    cfg = SimpleNamespace(model=SimpleNamespace(dtype="bfloat16"), kernels=head)
    inputs_bytes = 2 * N * H * 2  # what loss_head_bytes counts besides the head: the hidden states, the gathered rows
    planned = loss_head_bytes(cfg, SimpleNamespace(hidden=H, vocab=V), B, T, T, backward=True) - inputs_bytes
    print(f"{head} H {H}: {held / 2**30:.3f} GiB above the inputs, planned {planned / 2**30:.3f}")
    if head == "torch":  # fp32 [N, V] log-softmax, kept for the backward: the planner's term to 5 %
        assert abs(planned / held - 1) < 0.05, (held / 2**30, planned / 2**30)
    else:  # one fp32 logits chunk (or none) and the [N, H] gradient of the hidden states in fp32 and bf16, twice
        assert held <= SCRATCH_BYTES + 2 * N * H * (4 + 2), (head, held / 2**30)
        assert held < N * V * 2 / 4  # under a quarter of one bf16 [N, V] logits tensor (3.8 GiB here)
