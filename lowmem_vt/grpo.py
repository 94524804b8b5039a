"""GRPO in plain PyTorch: group advantages, the per-token surrogate + KL, and its aggregation.

This module is the reference the Triton kernels in ``kernels/`` are checked against. Every loss is
written as the *contribution of one micro-batch* to the full-batch loss, normalised by counts of the
whole optimizer batch, so that summing micro-batch losses (gradient accumulation) gives exactly the
loss of the full batch whatever the micro-batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True) -> torch.Tensor:
    """Advantages of a flat reward vector made of consecutive groups of ``num_generations``.

    rewards: [P * G] float. Returns [P * G] float32: (r - group mean) / (group std + 1e-4), the std unbiased
    as in the paper's code (``torch.std``). A group whose rewards are all equal gets zero advantage (never NaN).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | list[int], pad_length_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 on every completion token up to and including the first EOS, 0 after it.

    completion_ids: [B, T] long. Returns [B, T] float32.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    # number of EOS strictly before each position: a token is kept while none has been seen yet
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = (seen_before == 0).float()
    if pad_length_mask is not None:
        mask = mask * pad_length_mask.float()
    return mask


@dataclass
class LossCounts:
    """Counts over the whole optimizer batch that normalise every micro-batch's share of the loss."""

    num_sequences: int  # completions in the optimizer batch
    num_tokens: float  # masked completion tokens in the optimizer batch
    max_completion_length: int


def loss_scale(dtype: torch.dtype, counts: LossCounts) -> float:
    """Static factor on the loss before backward (gradients are divided by it after) for a float16 model.

    The loss is normalised over the optimizer batch, so each token's gradient is ~1 / (completions x
    max_completion_length) (2e-5 for 64 x 700): below float16's smallest normal (6e-5), and the activation
    gradients in the model's backward flush towards zero. On the tiny model with a real batch's normalisation
    (tests/test_fp16.py) the LoRA gradients of an unscaled float16 backward are off by ~7 % from float32,
    by ~0.1 % with this scale. The power of two at or above completions x max_completion_length brings each
    token's gradient to O(1), far from float16's maximum (65,504). bfloat16 and float32 have float32's
    exponent range: 1. A step that overflows anyway is skipped by the trainer's non-finite check.
    """
    if dtype != torch.float16:
        return 1.0
    return float(2 ** math.ceil(math.log2(max(1.0, counts.num_sequences * counts.max_completion_length))))


def per_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss ``-(min(r·A, clip(r)·A) - beta·k3)``.

    logp, old_logp, ref_logp: [B, T] float32 log-probs of the sampled tokens; advantages: [B].
    ``old_logp=None`` means one update per rollout: the ratio is ``exp(logp - logp.detach())`` (value 1,
    gradient of logp), exactly the paper's form. mask: [B, T]; where it is 0 (padding, whose old / ref
    log-probs may be anything) the log-ratios are taken as 0, so that no exp overflows into an inf that
    the aggregation's ``* 0`` would turn into NaN, in the value or in the gradient.
    Returns (loss [B, T], k3 [B, T], clipped [B, T] bool).
    """
    active = None if mask is None else mask != 0

    def log_ratio(x: torch.Tensor) -> torch.Tensor:
        return x if active is None else torch.where(active, x, 0.0)

    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(log_ratio(logp - old))
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = torch.minimum(unclipped, clipped_ratio * adv)
    is_clipped = (clipped_ratio * adv < unclipped)
    loss = -surrogate
    if ref_logp is not None and beta != 0.0:
        delta = log_ratio(ref_logp - logp)
        k3 = torch.exp(delta) - delta - 1.0
        loss = loss + beta * k3
    else:
        k3 = torch.zeros_like(logp)
    return loss, k3, is_clipped


def aggregation_weights(mask: torch.Tensor, loss_type: str, counts: LossCounts) -> torch.Tensor:
    """Per-token weights of this micro-batch's share of the batch loss. mask: [B, T] (0/1, any dtype).

    Returns [B, T] fp32 (fp64 for a float64 mask, so that float64 references and gradchecks stay exact).

    grpo: mean over each completion's tokens, then mean over completions (the paper).
    dr_grpo: sum over tokens / (completions · max_completion_length) (Dr. GRPO, no length bias).
    bnpo: sum over tokens / tokens in the batch.
    The Triton heads take these weights as they are; ``aggregate`` is the plain-PyTorch use of them.
    """
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / counts.num_sequences
    if loss_type == "dr_grpo":
        return mask / (counts.num_sequences * counts.max_completion_length)
    if loss_type == "bnpo":
        return mask / max(counts.num_tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, counts: LossCounts) -> torch.Tensor:
    """This micro-batch's share of the batch loss: ``(per_token * aggregation_weights(mask, ...)).sum()``.

    per_token, mask: [B, T]. Returns a 0-dim tensor, differentiable in per_token: fp32 for per_token in fp32 or
    lower (bf16 / fp16 promote against the fp32 weights), fp64 for fp64 inputs.
    """
    return (per_token * aggregation_weights(mask, loss_type, counts)).sum()


def grpo_loss(
    logp: torch.Tensor,
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch from per-token log-probs. Returns (loss, stats summed over this micro-batch).

    Padded tokens (mask 0) never make the loss or its gradient inf / NaN, whatever their log-probs.

    stats: ``kl_sum`` (sum of per-sequence mean k3), ``clipped_tokens`` and ``tokens`` for the logs.
    """
    per_tok, k3, clipped = per_token_loss(logp, advantages, old_logp, ref_logp, beta, epsilon_low, epsilon_high, mask)
    return aggregate(per_tok, mask, loss_type, counts), loss_stats(k3, clipped, mask)


@torch.no_grad()
def loss_stats(k3: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over one micro-batch for the logs; k3, clipped, mask: [B, T].

    ``kl_sum``: sum over completions of each one's mean k3; ``clipped_tokens``; ``tokens``. Each a 0-dim
    fp32 tensor on the inputs' device: reading them (``float()``) is the caller's host sync, and tensors
    let the loss run on fake tensors (memory simulation, torch.compile).
    """
    mask = mask.float()
    per_seq_kl = (torch.where(mask != 0, k3, 0.0)).sum(1) / mask.sum(1).clamp(min=1.0)
    return {
        "kl_sum": per_seq_kl.sum(),
        "clipped_tokens": (clipped.float() * mask).sum(),
        "tokens": mask.sum(),
    }
