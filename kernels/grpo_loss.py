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
loss, this derivative, k3 and the clip flags. Autograd never sees the [B, T] GRPO graph, and the backward
is a single more streaming pass over W: recompute each logits tile, scale (onehot - softmax) by the saved
per-token derivative times the incoming gradient, and accumulate dh (and dW when the head is trained).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowmem_vt.grpo import LOSS_TYPES, LossCounts, grpo_loss, loss_stats

from .chunked_logprobs import (
    BACKWARD_TILES,
    FORWARD_TILES,
    Tiles,
    _check_inputs,
    _merge_splits,
    _prepare,
    check_targets,
    chunked_logprobs_reference,
    lse_and_target_logits,
    streaming_input_grads,
)

_FINISH_BLOCK = 1024


def aggregation_weights(mask: torch.Tensor, loss_type: str, counts: LossCounts) -> torch.Tensor:
    """Per-token weights w with ``aggregate(x, mask, loss_type, counts) == (x * w).sum()``. mask: [B, T]. Returns [B, T] fp32."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / counts.num_sequences
    if loss_type == "dr_grpo":
        return mask / (counts.num_sequences * counts.max_completion_length)
    if loss_type == "bnpo":
        return mask / max(counts.num_tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


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
    # padding (w = 0) may hold any old / ref log-probs: exp of their difference can overflow, and inf * 0 is
    # NaN, so padded tokens compute with ratio 1 and no KL instead
    active = w != 0.0
    if HAS_OLD:
        old_logp = tl.load(old_logp_ptr + offs, mask=mask, other=0.0)
    else:
        old_logp = logp  # one update per rollout: ratio 1, gradient of logp
    ratio = tl.exp(tl.where(active, logp - old_logp, 0.0))
    adv = tl.load(advantages_ptr + offs // T, mask=mask, other=0.0)
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * adv
    is_clipped = clipped < unclipped
    loss = -tl.minimum(unclipped, clipped)
    dloss = tl.where(is_clipped, 0.0, -unclipped)
    if HAS_KL:
        delta = tl.where(active, tl.load(ref_logp_ptr + offs, mask=mask, other=0.0) - logp, 0.0)
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1.0
        loss += beta * k3
        dloss += beta * (1.0 - exp_delta)
        tl.store(k3_ptr + offs, k3, mask=mask)

    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(logp_ptr + offs, logp, mask=mask)
    tl.store(loss_ptr + offs, loss * w, mask=mask)
    tl.store(dlogp_ptr + offs, dloss * w, mask=mask)
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
    part_lse, target_logit, splits = lse_and_target_logits(hidden, weight, targets, temperature, Tiles.from_list(forward_tiles))
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


def fused_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    counts: LossCounts,
    temperature: float = 1.0,
    backend: str = "triton",
    forward_tiles: Tiles = FORWARD_TILES,
    backward_tiles: Tiles = BACKWARD_TILES,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """This micro-batch's share of the GRPO loss, computed from hidden states and the LM head.

    hidden: [B, T, H] (cast to weight's dtype); weight: [V, H]; targets: [B, T] long, the sampled tokens;
    mask: [B, T] float; advantages: [B]; old_logp, ref_logp: [B, T] float32 or None (None old_logp: one
    update per rollout, ratio exp(logp - logp.detach())). Same meaning of beta, epsilon_low/high, loss_type
    and counts as ``lowmem_vt.grpo.grpo_loss``.

    Returns (loss: scalar fp32 tensor differentiable in hidden and weight, stats: the dict of
    ``lowmem_vt.grpo.grpo_loss``, logp: [B, T] float32 detached). backend "torch" is the reference:
    ``chunked_logprobs_reference`` followed by ``lowmem_vt.grpo.grpo_loss``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    B, T, H = hidden.shape
    for name, x in (("targets", targets), ("mask", mask), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None and tuple(x.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, T] = {[B, T]} like hidden {tuple(hidden.shape)}")
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [B] = [{B}]")
    if backend == "torch":
        logp = chunked_logprobs_reference(hidden.reshape(B * T, H), weight, targets.reshape(B * T), temperature).view(B, T)
        loss, stats = grpo_loss(
            logp, mask, advantages, old_logp, ref_logp,
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type, counts=counts,
        )
        return loss, stats, logp.detach()
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; expected 'triton' or 'torch'")

    flat_hidden, flat_targets = _prepare(hidden.reshape(B * T, H), weight, targets.reshape(B * T))
    weights = aggregation_weights(mask, loss_type, counts).reshape(B * T).contiguous()

    def flat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().float().reshape(B * T).contiguous()

    loss, logp, k3, clipped, _lse, _dlogp = streaming_grpo_loss_op(
        flat_hidden, weight, flat_targets, advantages.detach().float().contiguous(), flat(old_logp), flat(ref_logp),
        weights, T, float(beta), 1.0 - float(epsilon_low), 1.0 + float(epsilon_high), float(temperature),
        forward_tiles.as_list(), backward_tiles.as_list(),
    )
    return loss, loss_stats(k3.view(B, T), clipped.view(B, T), mask), logp.view(B, T)
