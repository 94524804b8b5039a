"""GRPO in plain PyTorch: group advantages, every policy loss of the menu, the sampler correction, aggregation.

This module is the reference the Triton heads in ``kernels/`` are checked against, and its formulas are TRL
1.16's (``GRPOTrainer._compute_loss``; tests/test_trl_oracle.py runs TRL's own method on the same inputs).
Every loss is written as the *contribution of one micro-batch* to the full-batch loss, normalised by counts
of the whole optimizer batch, so that summing micro-batch losses (gradient accumulation) gives exactly the
loss of the full batch whatever the micro-batch size.

The menu (``LOSS_TYPES``), each loss type = a per-token term and an aggregation:

============ ====================================================== ==========================================
loss_type    per-token term (r: importance ratio, A: advantage)     aggregation
============ ====================================================== ==========================================
grpo         -min(r A, clip(r, 1-eps_low, 1+eps_high) A)            mean per completion, mean over completions
dr_grpo      as grpo                                                sum / (completions x max_completion_length)
bnpo, dapo   as grpo                                                sum / tokens of the optimizer batch
luspo        as grpo (sequence level: each sequence x its length)   sum per completion, mean over completions
cispo        -sg(min(r, eps_high)) A logp   (MiniMax-M1)            sum / tokens of the optimizer batch
sapo         -sigmoid(tau (r - 1)) 4 / tau A   (soft gate)          as grpo
vespo        -sg(phi(w)) A logp, phi Gamma weight of the sequence   sum / tokens of the optimizer batch
============ ====================================================== ==========================================

``importance_sampling_level: sequence`` (GSPO) replaces the token ratio by exp(mean log-ratio of the
completion). Beside them: ``delta`` (two-sided clip of r), the entropy mask (``top_entropy_quantile``), the
off-policy sequence mask (``off_policy_mask_threshold``), the bias-corrected KL, and the sampler-mismatch
correction (``sampler_correction_ratio``: a weight per token or sequence from the log-probs the rollout
backend reported, truncated or masked to [clip_min, clip_max]).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# the loss types whose per-token term is the clipped surrogate (and whose clip metrics are the clip fractions)
CLIPPED_SURROGATE = ("grpo", "dr_grpo", "bnpo", "dapo", "luspo")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group") -> torch.Tensor:
    """Advantages of a flat reward vector made of consecutive groups of ``num_generations``.

    rewards: [P * G] float. Returns [P * G] float32: (r - group mean) / (std + 1e-4), the std unbiased as in
    the paper's code (``torch.std``): the group's (``"group"``, the paper; also ``True``), the whole batch's
    (``"batch"``, PPO Lite, arXiv 2508.08221) or none (``"none"``, Dr. GRPO; also ``False``). A group whose
    rewards are all equal gets zero advantage (never NaN).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}")
    grouped = rewards.float().view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + 1e-4)
    return centred.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[P] bool: the groups whose G rewards are all equal (zero advantage: no signal; DAPO's dynamic sampling
    drops them). rewards: [P * G]."""
    grouped = rewards.view(-1, num_generations)
    return (grouped == grouped[:, :1]).all(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_completion_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; EasyR1 ``soft_overlong_punishment``).

    lengths: [B] completion lengths in tokens. Returns [B] float32 rewards to add: 0 up to
    ``max_completion_length - buffer`` tokens, then falling linearly to ``-penalty`` at ``max_completion_length``.
    """
    expected = max_completion_length - buffer
    over = (lengths.float() - expected).clamp(min=0.0)
    return -(over / max(buffer, 1)).clamp(max=1.0) * penalty


def truncated_rows(completion_ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """[B] bool: the completions with no EOS among their tokens (cut at ``max_completion_length``).

    completion_ids, mask: [B, T] (the padding after an EOS may hold the EOS id itself: only masked tokens count).
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    return ~(is_eos & mask.bool()).any(dim=1)


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




@dataclass(frozen=True)
class LossVariant:
    """The knobs of the policy loss beyond loss_type / beta / epsilon (defaults: the paper's loss).

    Each is TRL 1.16's ``GRPOConfig`` field of the same meaning (recipe keys in ``config.GRPOConfig``):
    importance_sampling_level (GSPO, arXiv 2507.18071), delta (INTELLECT-2's two-sided clip, 2505.07291),
    sapo_temperature_pos / _neg (SAPO, 2511.20347), vespo_k / lambda (VESPO, 2602.10693),
    top_entropy_quantile (Beyond the 80/20 Rule, 2506.01939), off_policy_mask_threshold and bias_corrected_kl
    (DeepSeek-V3.2, 2512.02556; TRL's ``use_bias_correction_kl``).
    """

    importance_sampling_level: str = "token"
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    bias_corrected_kl: bool = False

    @classmethod
    def of(cls, grpo_config) -> "LossVariant":
        """The knobs of a recipe's ``grpo`` section (``config.GRPOConfig``: the same field names)."""
        return cls(**{f.name: getattr(grpo_config, f.name) for f in dataclasses.fields(cls)})

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss needs each token's entropy from the head (the entropy mask)."""
        return self.top_entropy_quantile < 1.0


PAPER = LossVariant()


@dataclass(frozen=True)
class SamplerCorrection:
    """Sampler-mismatch importance sampling (TRL's ``vllm_importance_sampling_*``; "Your efficient RL framework
    secretly brings you off-policy RL training", Yao et al. 2025): mode one of SAMPLER_CORRECTIONS."""

    mode: str = "none"
    clip_min: float | None = None
    clip_max: float | None = 3.0

    @property
    def on(self) -> bool:
        return self.mode != "none"


NO_CORRECTION = SamplerCorrection()


def sampler_correction_ratio(policy_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor,
                             correction: SamplerCorrection) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight that corrects the sampler-vs-policy mismatch, and where it was masked.

    policy_logp: [B, T] the policy's log-probs of the sampled tokens before the update; sampling_logp: [B, T] what
    the rollout backend reported; mask: [B, T]. Token modes: r = exp(policy - sampler) per token; sequence modes:
    r = exp(sum over the completion of (policy - sampler)), one per sequence ([B, 1]). ``*_truncate`` clamps r to
    [clip_min, clip_max], ``*_mask`` sets r to 0 outside it. Returns (ratio [B, T] or [B, 1], masked bool of the
    same shape), detached. A sampler log-prob that is NaN counts as no mismatch (ratio 1), as in TRL.
    """
    with torch.no_grad():
        diff = torch.nan_to_num((policy_logp - sampling_logp) * mask, nan=0.0)
        if correction.mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        if correction.mode.endswith("truncate"):
            return torch.clamp(ratio, min=correction.clip_min, max=correction.clip_max), torch.zeros_like(ratio, dtype=torch.bool)
        lo = -math.inf if correction.clip_min is None else correction.clip_min
        hi = math.inf if correction.clip_max is None else correction.clip_max
        masked = (ratio < lo) | (ratio > hi)
        return ratio.masked_fill(masked, 0.0), masked


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """[B, T] bool: the tokens whose entropy is at or above the (1 - top_quantile) quantile of this micro-batch's
    completion tokens (Beyond the 80/20 Rule, arXiv 2506.01939); padding is always False. entropy, mask: [B, T]."""
    with torch.no_grad():
        # padding as NaN, which nanquantile leaves out: no boolean indexing (a data-dependent shape, which fake
        # tensors, the memory simulator's, cannot run); no completion token at all gives a NaN threshold, no token
        active = torch.where(mask.bool(), entropy.float(), float("nan"))
        threshold = torch.nanquantile(active.flatten(), 1.0 - top_quantile)
        return ((entropy * mask) >= threshold) & mask.bool()


def off_policy_sequence_mask(advantages: torch.Tensor, logp: torch.Tensor, behaviour_logp: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 1] 0/1: DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): a completion with a negative
    advantage whose mean log(pi_behaviour / pi_theta) over its tokens exceeds ``threshold`` is dropped.
    advantages: [B, 1]; logp, behaviour_logp, mask: [B, T]."""
    kl = torch.nan_to_num(behaviour_logp - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, sampler_ratio: torch.Tensor | None,
                  variant: LossVariant) -> torch.Tensor:
    """[B, 1] VESPO's Gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w (arXiv 2602.10693),
    computed in log space; w = prod over tokens of the ratio (clamped to [1e-8, e^20]) times the token sampler
    correction when there is one. k, lambda by the advantage's sign. No gradient: it scales A · grad logp."""
    floor = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
    if sampler_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(sampler_ratio), floor, 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, floor, 20.0)
    non_negative = advantages >= 0
    k = torch.where(non_negative, variant.vespo_k_pos, variant.vespo_k_neg)
    lam = torch.where(non_negative, variant.vespo_lambda_pos, variant.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class TokenTerms:
    """What ``per_token_loss`` computed besides the loss, for the logs (shapes [B, T], or [B, 1] at sequence level)."""

    k3: torch.Tensor  # the KL term as added to the loss (times the ratio when bias-corrected)
    clipped: torch.Tensor  # bool: the clipped branch of the surrogate won (the paper's clip fraction)
    ratio: torch.Tensor  # the importance ratio r (before delta)
    phi: torch.Tensor | None = None  # VESPO's weight [B, 1]


def per_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    mask: torch.Tensor | None = None,
    *,
    loss_type: str = "grpo",
    variant: LossVariant = PAPER,
    token_weight: torch.Tensor | None = None,
    sampler_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenTerms]:
    """Per-token loss of ``loss_type`` (see the module's table), KL included: [B, T].

    logp, old_logp, ref_logp: [B, T] float32 log-probs of the sampled tokens; advantages: [B].
    ``old_logp=None`` means one update per rollout: the ratio is ``exp(logp - logp.detach())`` (value 1,
    gradient of logp), exactly the paper's form. mask: [B, T]; where it is 0 (padding, whose old / ref
    log-probs may be anything) the log-ratios are taken as 0, so that no exp overflows into an inf that
    the aggregation's ``* 0`` would turn into NaN, in the value or in the gradient.
    token_weight: [B, T] or [B, 1], the product of the masks that multiply the policy term (entropy mask,
    off-policy mask); sampler_ratio: the sampler correction (``sampler_correction_ratio``), which multiplies the
    policy term (all loss types but vespo, which folds it into its weight). Order of terms as TRL 1.16's.
    """
    active = None if mask is None else mask != 0

    def log_ratio(x: torch.Tensor) -> torch.Tensor:
        return x if active is None else torch.where(active, x, 0.0)

    old = logp.detach() if old_logp is None else old_logp
    token_log_ratio = log_ratio(logp - old)
    adv = advantages.unsqueeze(1)
    if variant.importance_sampling_level == "sequence":
        m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
        token_log_ratio = (token_log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(token_log_ratio)
    phi = None
    if loss_type in CLIPPED_SURROGATE:
        clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        capped = ratio if variant.delta is None else torch.clamp(ratio, max=variant.delta)
        unclipped = capped * adv
        surrogate = torch.minimum(unclipped, clipped_ratio * adv)
        is_clipped = clipped_ratio * adv < unclipped
        loss = -surrogate
    elif loss_type == "cispo":
        loss = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
        is_clipped = (ratio > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, variant.sapo_temperature_pos, variant.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        is_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    elif loss_type == "vespo":
        m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
        phi = vespo_weights(adv, log_ratio(logp - old), m, sampler_ratio, variant)
        loss = -phi * adv * logp
        is_clipped = torch.zeros_like(phi, dtype=torch.bool)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if token_weight is not None:
        loss = loss * token_weight
    if sampler_ratio is not None and loss_type != "vespo":
        loss = loss * sampler_ratio
    if ref_logp is not None and beta != 0.0:
        delta = log_ratio(ref_logp - logp)
        k3 = torch.exp(delta) - delta - 1.0
        if variant.bias_corrected_kl:
            k3 = k3 * ratio
        loss = loss + beta * k3
    else:
        k3 = torch.zeros_like(logp)
    return loss, TokenTerms(k3, is_clipped, ratio, phi)


def aggregation_weights(mask: torch.Tensor, loss_type: str, counts: LossCounts) -> torch.Tensor:
    """Per-token weights of this micro-batch's share of the batch loss. mask: [B, T] (0/1, any dtype).

    Returns [B, T] fp32 (fp64 for a float64 mask, so that float64 references and gradchecks stay exact).

    grpo, sapo: mean over each completion's tokens, then mean over completions (the paper).
    dr_grpo: sum over tokens / (completions · max_completion_length) (Dr. GRPO, no length bias).
    bnpo, dapo, cispo, vespo: sum over tokens / tokens in the optimizer batch (DAPO's token-level loss).
    luspo: sum over each completion's tokens, mean over completions (LUSPO: the sequence's loss times its length).
    The Triton heads take these weights as they are; ``aggregate`` is the plain-PyTorch use of them.
    """
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    if loss_type in ("grpo", "sapo"):
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / counts.num_sequences
    if loss_type == "dr_grpo":
        return mask / (counts.num_sequences * counts.max_completion_length)
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        return mask / max(counts.num_tokens, 1.0)
    if loss_type == "luspo":
        return mask / counts.num_sequences
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, counts: LossCounts) -> torch.Tensor:
    """This micro-batch's share of the batch loss: ``(per_token * aggregation_weights(mask, ...)).sum()``.

    per_token, mask: [B, T]. Returns a 0-dim tensor, differentiable in per_token: fp32 for per_token in fp32 or
    lower (bf16 / fp16 promote against the fp32 weights), fp64 for fp64 inputs.
    """
    return (per_token * aggregation_weights(mask, loss_type, counts)).sum()


def is_paper_loss(loss_type: str, variant: LossVariant, correction: SamplerCorrection) -> bool:
    """Whether the loss is the per-token clipped surrogate + k3 with nothing of the rest of the menu: the form the
    Triton heads compute in their own kernels (``kernels/grpo_loss.grpo_token_terms``)."""
    return loss_type in ("grpo", "dr_grpo", "bnpo", "dapo") and variant == PAPER and not correction.on


def check_loss_inputs(variant: LossVariant, correction: SamplerCorrection, sampling_logp: torch.Tensor | None,
                      entropy: torch.Tensor | None) -> None:
    """The inputs this loss configuration needs beyond the log-probs, or a ValueError saying which is missing (for
    ``grpo_loss`` and the Triton terms kernel's ``kernels.policy_terms.policy_loss`` alike)."""
    if correction.on and sampling_logp is None:
        raise ValueError(f"sampler correction {correction.mode!r} needs the rollout's sampling log-probs; this backend "
                         "reports none (use sampler_correction: none)")
    if variant.needs_entropy and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs each token's entropy from the head")


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
    variant: LossVariant = PAPER,
    correction: SamplerCorrection = NO_CORRECTION,
    sampling_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch from per-token log-probs. Returns (loss, stats summed over this micro-batch).

    Padded tokens (mask 0) never make the loss or its gradient inf / NaN, whatever their log-probs.
    sampling_logp: [B, T] the rollout backend's log-probs (for the sampler correction and, when given, the
    off-policy mask's behaviour policy); entropy: [B, T] each token's entropy (needed by the entropy mask; logged
    when given). The policy before the update, for the correction, is old_logp or (one update per rollout)
    logp itself, detached.

    stats (``loss_stats``): ``kl_sum`` (sum of per-sequence mean k3), ``clipped_tokens`` and ``tokens`` for the
    logs, and, beyond the paper's loss (or with entropy given), the sums behind TRL's metrics.
    """
    check_loss_inputs(variant, correction, sampling_logp, entropy)
    advantages_col = advantages.unsqueeze(1)
    mask_t = mask.to(logp.dtype)
    behaviour = logp.detach() if old_logp is None else old_logp
    weight = None
    if variant.needs_entropy:
        weight = high_entropy_mask(entropy, mask, variant.top_entropy_quantile)
    if variant.off_policy_mask_threshold is not None:
        opm = off_policy_sequence_mask(advantages_col, logp, behaviour if sampling_logp is None else sampling_logp,
                                       mask_t, variant.off_policy_mask_threshold)
        weight = opm if weight is None else opm * weight
    ratio = masked = None
    if correction.on:
        ratio, masked = sampler_correction_ratio(behaviour, sampling_logp, mask_t, correction)
    per_tok, terms = per_token_loss(logp, advantages, old_logp, ref_logp, beta, epsilon_low, epsilon_high, mask,
                                    loss_type=loss_type, variant=variant, token_weight=weight, sampler_ratio=ratio)
    # the paper's loss logs what it always did (the fused heads compute no more); the rest of the menu TRL's metrics
    full = not is_paper_loss(loss_type, variant, correction) or entropy is not None
    stats = loss_stats(terms.k3, terms.clipped, mask, loss_type=loss_type, terms=terms if full else None, advantages=advantages_col,
                       epsilon_low=epsilon_low, epsilon_high=epsilon_high, entropy=entropy,
                       sampler=None if ratio is None else (ratio, masked))
    return aggregate(per_tok, mask, loss_type, counts), stats


@torch.no_grad()
def loss_stats(k3: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
               terms: TokenTerms | None = None, advantages: torch.Tensor | None = None, epsilon_low: float = 0.0,
               epsilon_high: float = 0.0, entropy: torch.Tensor | None = None,
               sampler: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Sums over one micro-batch for the logs; k3, clipped, mask: [B, T] ([B, 1] k3 / clipped broadcast).

    Always: ``kl_sum`` (sum over completions of each one's mean k3), ``clipped_tokens``, ``tokens``. With
    ``terms`` (the full loss), TRL 1.16's metrics as sums and their counts (a metric = sum / count over the
    optimizer batch): ``kl_token_sum`` / tokens (TRL ``kl``); for the clipped surrogate ``clip_low`` /
    ``clip_high`` / ``clip_region`` over ``clip_units`` (tokens at token level, completions at sequence level);
    ``cispo_clipped`` / tokens; ``phi_sum`` / completions (VESPO); ``entropy_sum`` / tokens when entropy is
    given; with the sampler correction ``is_ratio_sum`` / ``is_units``, ``is_ratio_min``, ``is_ratio_max``,
    ``is_masked`` / ``is_units`` (tokens for token modes, completions for sequence modes). Each a 0-dim fp32
    tensor on the inputs' device: reading them (``float()``) is the caller's host sync, and tensors let the
    loss run on fake tensors (memory simulation, torch.compile).
    """
    mask = mask.float()
    k3, clipped = k3.expand_as(mask), clipped.expand_as(mask)
    per_seq_kl = (torch.where(mask != 0, k3, 0.0)).sum(1) / mask.sum(1).clamp(min=1.0)
    stats = {
        "kl_sum": per_seq_kl.sum(),
        "clipped_tokens": (clipped.float() * mask).sum(),
        "tokens": mask.sum(),
    }
    if terms is None:
        return stats
    stats["kl_token_sum"] = (torch.where(mask != 0, k3, 0.0)).sum()

    def units(x: torch.Tensor) -> torch.Tensor:  # TRL's global_masked_mean numerator: per token, or per sequence
        x = x.float()
        return x.sum() if x.shape[1] == 1 else (x * mask).sum()

    ratio = terms.ratio.float()
    stats["clip_units"] = torch.tensor(float(ratio.shape[0]), device=mask.device) if ratio.shape[1] == 1 else mask.sum()
    if loss_type in CLIPPED_SURROGATE:
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        stats.update(clip_low=units(low), clip_high=units(high), clip_region=units(low | high))
    elif loss_type == "cispo":
        stats["cispo_clipped"] = units((ratio > epsilon_high) & (advantages > 0))
    elif loss_type == "vespo":
        stats["phi_sum"] = terms.phi.float().sum()
    if entropy is not None:
        stats["entropy_sum"] = (entropy.float() * mask).sum()
    if sampler is not None:  # no boolean indexing: the stats run on fake tensors too (memory simulation)
        ratio_is, masked = sampler
        ratio_is = ratio_is.float()
        keep = torch.ones_like(ratio_is, dtype=torch.bool) if ratio_is.shape[1] == 1 else mask != 0
        stats.update(
            is_ratio_sum=torch.where(keep, ratio_is, 0.0).sum(), is_units=keep.float().sum(),
            is_ratio_min=torch.where(keep, ratio_is, math.inf).min(),
            is_ratio_max=torch.where(keep, ratio_is, -math.inf).max(),
            is_masked=(masked & keep).float().sum(),
        )
    return stats
