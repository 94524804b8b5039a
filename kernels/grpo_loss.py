"""GRPO + KL loss of one micro-batch straight from the policy's last hidden states.

What is fused, and why. The loss depends on the logits only through the log-prob of each sampled token,
and for every loss type in ``lowmem_vt.grpo.LOSS_TYPES`` its derivative in that log-prob is closed-form:

    d loss / d logp[b, t] = w[b, t] * ( -A_b * r[b, t] * [not clipped]  +  beta * (1 - exp(ref - logp)) )

with r = exp(logp - old_logp) and w the aggregation weight of ``lowmem_vt.grpo.aggregate`` (mask / (tokens
of the completion * completions) for grpo, mask / (completions * max_completion_length) for dr_grpo, mask /
tokens of the batch for bnpo). ``torch.minimum`` sends the gradient to the unclipped branch unless the
clipped one is strictly smaller, whose clamped ratio then has zero gradient: hence ``[not clipped]``.

So the forward's streaming pass over W (online log-sum-exp, ``chunked_logprobs``) is followed by one small
kernel that merges the vocabulary splits into log-probs and, in the same place, computes the per-token
loss, this derivative, k3 and the clip flags (``grpo_token_terms``, which the fused-linear head's row kernel
calls too). Autograd never sees the [B, T] GRPO graph, and the backward is a single more streaming pass
over W: recompute each logits tile, scale (onehot - softmax) by the saved per-token derivative times the
incoming gradient, and accumulate dh (and dW when the head is trained).

This closed form is the paper's loss (``lowmem_vt.grpo.is_paper_loss``). The rest of the menu runs the streaming
head as a log-prob head (``streaming_logprobs_op``): the forward gives every token's logp, the terms kernel
(``policy_terms.py``) computes the loss and its closed-form d loss / d logp from them (so the sequence level sees
each sequence's whole ratio before any gradient), and the same streaming backward pass takes that d loss / d logp:
no extra pass over W, no autograd graph over the [B, T] terms (``head.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


from .chunked_logprobs import (
    Tiles,
    _check_inputs,
    _merge_splits,
    check_targets,
    lse_and_target_logits,
    streaming_input_grads,
)

_FINISH_BLOCK = 1024


@triton.jit
def grpo_token_terms(
    logp, old_logp, ref_logp, adv, w, beta, ratio_low, ratio_high, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr,
):
    """The per-token GRPO math of both Triton heads, on a row (scalars) or a block of tokens.

    logp, old_logp, ref_logp, adv, w: fp32 values of one token each (old_logp read only with HAS_OLD, ref_logp
    only with HAS_KL; pass anything otherwise). ratio_low / ratio_high: 1 - epsilon_low, 1 + epsilon_high.
    Returns (w * loss, w * d loss / d logp, k3 (0 without HAS_KL), clipped flag).
    """
    # padding (w = 0) may hold any old / ref log-probs: exp of their difference can overflow, and inf * 0 is
    # NaN, so padded tokens compute with ratio 1 and no KL instead
    active = w != 0.0
    if HAS_OLD:
        ratio = tl.exp(tl.where(active, logp - old_logp, 0.0))
    else:
        ratio = 1.0  # one update per rollout: ratio exp(logp - logp.detach()), gradient of logp
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * adv
    is_clipped = clipped < unclipped
    loss = -tl.minimum(unclipped, clipped)
    dloss = tl.where(is_clipped, 0.0, -unclipped)
    k3 = tl.zeros_like(loss)
    if HAS_KL:
        delta = tl.where(active, ref_logp - logp, 0.0)
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1.0
        loss += beta * k3
        dloss += beta * (1.0 - exp_delta)
    return loss * w, dloss * w, k3, is_clipped


@triton.jit
def _grpo_finish_kernel(
    part_lse_ptr, target_logit_ptr, advantages_ptr, old_logp_ptr, ref_logp_ptr, weights_ptr,
    lse_ptr, logp_ptr, loss_ptr, dlogp_ptr, k3_ptr, clipped_ptr,
    N, T, num_splits, beta, ratio_low, ratio_high,
    HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per token: logp from the split lse's, weighted GRPO loss, weighted d loss / d logp, k3, clip flag."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lse = _merge_splits(part_lse_ptr, offs, mask, N, num_splits)
    logp = tl.load(target_logit_ptr + offs, mask=mask, other=0.0) - lse
    w = tl.load(weights_ptr + offs, mask=mask, other=0.0)
    adv = tl.load(advantages_ptr + offs // T, mask=mask, other=0.0)
    old_logp = logp
    if HAS_OLD:
        old_logp = tl.load(old_logp_ptr + offs, mask=mask, other=0.0)
    ref_logp = logp
    if HAS_KL:
        ref_logp = tl.load(ref_logp_ptr + offs, mask=mask, other=0.0)
    loss, dloss, k3, is_clipped = grpo_token_terms(logp, old_logp, ref_logp, adv, w, beta, ratio_low, ratio_high,
                                                   HAS_OLD, HAS_KL)

    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(logp_ptr + offs, logp, mask=mask)
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(dlogp_ptr + offs, dloss, mask=mask)
    if HAS_KL:
        tl.store(k3_ptr + offs, k3, mask=mask)
    tl.store(clipped_ptr + offs, is_clipped.to(tl.float32), mask=mask)


@torch.library.custom_op("lowmem_vt::streaming_grpo_loss", mutates_args=())
def streaming_grpo_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
    old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, weights: torch.Tensor, seq_len: int,
    beta: float, ratio_low: float, ratio_high: float, temperature: float,
    forward_tiles: list[int], backward_tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro-batch GRPO loss from hidden [N, H] and the LM head [V, H] by the streaming kernels.

    advantages: [N // seq_len] fp32; old_logp, ref_logp, weights: [N] fp32 (weights from
    ``aggregation_weights``). Returns (loss [] fp32, logp, k3, clipped as 0/1, lse, weighted d loss / d logp),
    all [N] fp32 but the loss; only the loss is differentiable (in hidden and weight). lse and d loss / d logp
    are what the backward pass needs.
    """
    check_targets(targets, weight.shape[0])
    N = hidden.shape[0]
    part_lse, target_logit, splits, _ = lse_and_target_logits(hidden, weight, targets, temperature, Tiles.from_list(forward_tiles))
    lse, logp, token_loss, dlogp, k3, clipped = (torch.zeros_like(target_logit) for _ in range(6))
    has_kl = ref_logp is not None and beta != 0.0
    if N > 0:
        _grpo_finish_kernel[(triton.cdiv(N, _FINISH_BLOCK),)](
            part_lse, target_logit, advantages,
            old_logp if old_logp is not None else logp, ref_logp if has_kl else logp, weights,
            lse, logp, token_loss, dlogp, k3, clipped,
            N, seq_len, splits, float(beta), ratio_low, ratio_high,
            HAS_OLD=old_logp is not None, HAS_KL=has_kl, BLOCK=_FINISH_BLOCK,
        )
    return token_loss.sum(), logp, k3, clipped, lse, dlogp


@streaming_grpo_loss_op.register_fake
def _(hidden, weight, targets, advantages, old_logp, ref_logp, weights, seq_len, beta, ratio_low, ratio_high,
      temperature, forward_tiles, backward_tiles):
    _check_inputs(hidden, weight, targets, Tiles.from_list(forward_tiles))
    rows = [hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(5)]
    return (hidden.new_empty((), dtype=torch.float32), *rows)


def _streaming_grpo_setup(ctx, inputs, output):
    hidden, weight, targets = inputs[:3]
    temperature, backward_tiles = inputs[11], inputs[13]
    _loss, logp, k3, clipped, lse, dlogp = output
    ctx.save_for_backward(hidden, weight, targets, lse, dlogp)
    ctx.temperature = temperature
    ctx.backward_tiles = backward_tiles
    ctx.mark_non_differentiable(logp, k3, clipped, lse, dlogp)


def _streaming_grpo_backward(ctx, grad_loss, *_non_differentiable):
    dlogp = ctx.saved_tensors[4]
    dh, dw = streaming_input_grads(ctx, dlogp * grad_loss)
    return (dh, dw) + (None,) * 12


streaming_grpo_loss_op.register_autograd(_streaming_grpo_backward, setup_context=_streaming_grpo_setup)
