"""Every loss-head path within today's scratch budget (issue 27, item 4), simulated on fake tensors at the recipes'
B 8 x T 1024 (``lowmem_vt.simulate.head_memory``: no Triton launch; the custom ops' workspace by
``op_workspace_bytes``).

The budget is ``fused_linear.SCRATCH_BYTES`` = 0.25 GiB for the vocabulary-sized memory a head holds: the
fused-linear head's [rows, V] fp32 logits chunk, any tensor with a V dimension. Beside it every Triton head holds
[N, H] terms that do not grow with V: d logp / d hidden (or dh) in fp32, saved by the fused-linear head from its
forward, accumulated by the streaming head in its backward, and the hidden states' gradient in their dtype.
kernels/README.md tabulates both parts at V 151,936, 248,320 and 262,144.
"""

from __future__ import annotations

import pytest

import lowmem_vt.kernels.head as head_module
from lowmem_vt.kernels.chunked_logprobs import chunked_entropy
from lowmem_vt.kernels.fused_linear import SCRATCH_BYTES, rows_per_chunk
from lowmem_vt.simulate import HEAD_PATHS, head_memory

HEADS = ("triton_fused_linear", "triton_streaming")
B, T = 8, 1024
N = B * T
# the vocabularies of Qwen2-VL / Qwen2.5-VL, Qwen3.5, Gemma 3, each with the hidden size of a model that has it
MODELS = {151_936: 1536, 248_320: 2560, 262_144: 2560}


def _problems(V: int, H: int) -> list[str]:
    """Each (path, head) whose vocabulary-sized memory passes SCRATCH_BYTES or whose rest passes the [N, H] terms:
    d logp / d hidden in fp32 plus the bf16 gradient ([N, H] x 6 bytes) and one chunk's [rows, H] workspace."""
    rest_bound = N * H * (4 + 2) + rows_per_chunk(V) * H * (4 + 2)
    problems = []
    for head in HEADS:
        for path in HEAD_PATHS:
            m = head_memory(path, head, V, H, B, T)
            print(f"V {V} H {H} {head} {path}: {m.held / 2**30:.4f} GiB held, {m.vocab / 2**30:.4f} GiB vocabulary-sized")
            if m.vocab > SCRATCH_BYTES:
                problems.append(f"{head} {path}: {m.vocab / 2**30:.3f} GiB vocabulary-sized > {SCRATCH_BYTES / 2**30} GiB")
            if m.held - m.vocab > rest_bound:
                problems.append(f"{head} {path}: {(m.held - m.vocab) / 2**30:.3f} GiB beside it > {rest_bound / 2**30:.3f}")
    return problems


def test_every_head_path_within_the_scratch_budget_at_151936():
    """The issue's figure: B 8 x T 1024 x V 151,936 (H 1536, Qwen2-VL-2B), every path of both Triton heads."""
    assert _problems(151_936, MODELS[151_936]) == []


@pytest.mark.parametrize("V", [248_320, 262_144])
def test_within_the_budget_at_the_newest_vocabularies(V):
    assert _problems(V, MODELS[V]) == []


@pytest.mark.parametrize("head", HEADS)
def test_the_entropy_adds_no_vocabulary_sized_memory(head):
    """With the entropy on, the head holds what it holds without it, to a few [N] vectors (the streaming head's
    per-split buffer, [3, splits, N] fp32)."""
    V, H = 151_936, MODELS[151_936]
    without = head_memory("log-prob head (rest of the menu)", head, V, H, B, T)
    with_entropy = head_memory("log-prob head + entropy", head, V, H, B, T)
    assert with_entropy.vocab == without.vocab
    assert abs(with_entropy.held - without.held) <= 16 * N * 4


def test_the_budget_check_fails_for_the_former_entropy_pass(monkeypatch):
    """Fed the design this issue replaced, an extra ``chunked_entropy`` pass over the micro-batch in chunks of
    ``rows_per_chunk(V)`` rows (an fp32 copy of W and several fp32 [rows, V] temporaries: ~2.2 GiB), the check fails."""
    real = head_module.head_logprobs

    def with_extra_pass(hidden, weight, targets, mask, temperature=1.0, backend="triton", *, with_entropy=False, **kw):
        logp, entropy = real(hidden, weight, targets, mask, temperature, backend, with_entropy=with_entropy, **kw)
        if with_entropy:
            flat = hidden.detach().reshape(-1, hidden.shape[-1])
            entropy = chunked_entropy(flat, weight.detach(), temperature, rows_per_chunk(weight.shape[0])).view(entropy.shape)
        return logp, entropy

    monkeypatch.setattr(head_module, "head_logprobs", with_extra_pass)
    problems = _problems(151_936, MODELS[151_936])
    assert problems and all("+ entropy" in p for p in problems), problems
    assert any("vocabulary-sized" in p for p in problems)


def test_the_simulated_scratch_is_the_planners():
    """The fused-linear head's vocabulary-sized memory is the planner's chunk (``rows_per_chunk(V)`` fp32 rows of V)."""
    for V, H in MODELS.items():
        m = head_memory("paper loss, fused", "triton_fused_linear", V, H, B, T)
        assert m.vocab == rows_per_chunk(V) * V * 4 == pytest.approx(SCRATCH_BYTES, rel=0.06), V
