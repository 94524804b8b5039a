"""Every policy loss of the menu on the [N] log-probs a Triton head produced: loss, d loss / d logp, stats' terms.

``lowmem_vt.grpo.grpo_loss`` is the reference (TRL 1.16's ``_compute_loss``); this is the same loss, per token,
with its derivative in the log-prob written out in closed form, so that torch autograd never builds a graph over
the [B, T] terms: the head's forward gives logp, ``policy_terms_op`` gives the loss and d loss / d logp, and the
head's own backward (the streaming pass over W, or the fused-linear head's saved d logp / d hidden) takes that
derivative (``head.fused_grpo_loss``). The paper's loss keeps its own fused form (``grpo_loss.grpo_token_terms``,
inside the heads' kernels); this module serves every other configuration (``lowmem_vt.grpo.is_paper_loss`` false).

Per token, with rho the importance ratio (the token's, or at sequence level GSPO's exp(mean log-ratio of the
completion)), A the advantage, f = entropy mask x off-policy mask x sampler correction (the correction not for
vespo), w the aggregation weight and K = beta k3 (x rho when bias-corrected):

    loss_t          = w_t (P_t f_t + K_t)
    d loss / d logp = w_t (f_t dP_t/dlogp_t + dK_t/dlogp_t)                       (direct: cispo, vespo, the KL)
                    + [token level]    w_t (f_t dP_t/drho + dK_t/drho) rho_t          (rho_t = exp(logp_t - old_t))
                    + [sequence level] G_b rho_b m_t / max(sum_u m_u, 1),  G_b = sum_u w_u (f_u dP_u/drho + dK_u/drho)

with torch autograd's conventions of the reference: ``torch.minimum`` of the clipped surrogate sends the whole
gradient to the smaller branch and half to each at a tie (inside the clip range both branches are rho A, so the
sum is A), ``torch.clamp`` passes the gradient on its closed interval [min, max], cispo's min(rho, eps_high) and
vespo's Gamma weight phi are stop-gradients (they scale A d logp), the masks and the sampler correction carry no
gradient (they are computed from detached log-probs).

How the sequence quantities are formed. One program per completion loops over its T tokens three times in blocks
of BLOCK_T: (1) reduce the sums the sequence needs (tokens, the log-ratio for GSPO, the sampler log-ratio for the
sequence correction, the behaviour-policy KL for the off-policy mask, VESPO's clamped log-ratio); (2) per token:
the loss, the direct derivative, the stats' terms, and the sum G_b above; (3) at sequence level only, add each
token's share of G_b. All on [N] fp32 vectors the head already wrote: it reads the log-probs (logp, old, ref,
sampling), the mask, the aggregation weight and the entropy mask (at most 7 x 4 bytes per token in a pass), and
writes 7 fp32 vectors per token (loss, d loss / d logp, k3, clip flag, ratio, sampler ratio and mask flag) and phi
per completion: ~90 bytes a token over the three passes, 0.7 MB for 8 x 1024 tokens, nothing of size V, no extra
pass over W. B programs only, each a short sequential loop: microseconds beside the head's matmuls (not timed:
no GPU here).

The entropy mask (``top_entropy_quantile``) is a batch-level order statistic (the quantile of the micro-batch's
token entropies): it is computed in torch on the [B, T] entropy (``lowmem_vt.grpo.high_entropy_mask``) and
passed in as a 0/1 token weight; the stats are ``lowmem_vt.grpo.loss_stats`` on the kernel's per-token terms.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowmem_vt.grpo import (
    CLIPPED_SURROGATE,
    NO_CORRECTION,
    PAPER,
    LossCounts,
    LossVariant,
    SamplerCorrection,
    TokenTerms,
    aggregation_weights,
    check_loss_inputs,
    high_entropy_mask,
    is_paper_loss,
    loss_stats,
)

from .interpreter import squeeze_interpreter_scalars

squeeze_interpreter_scalars()  # T is a runtime loop bound

# the policy term's form per loss type (constexpr LOSS): clipped surrogate, cispo, sapo, vespo
LOSS_KIND = {**{name: 0 for name in CLIPPED_SURROGATE}, "cispo": 1, "sapo": 2, "vespo": 3}
# the sampler correction's level (constexpr CORRECTION: none, per token, per sequence; CORRECTION_MASKS: mask or truncate)
CORRECTION_LEVEL = {"none": 0, "token": 1, "sequence": 2}
BLOCK_T = 256


@triton.jit
def _token_inputs(logp_ptr, old_ptr, ref_ptr, sampling_ptr, mask_ptr, idx, in_seq,
                  HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, HAS_SAMPLING: tl.constexpr):
    """One block of a completion's tokens: (logp, m, active, behaviour, ref, sampling, log-ratio).

    Padded tokens (m = 0) may hold any old / ref / sampling log-probs: they are replaced by the token's logp before
    any arithmetic, so every difference there is 0 (the reference takes each log-ratio as 0 there, or multiplies
    it by 0 and turns the NaN into 0) and no exp overflows. behaviour: the policy before the update (old, or logp).
    """
    logp = tl.load(logp_ptr + idx, mask=in_seq, other=0.0)
    m = tl.load(mask_ptr + idx, mask=in_seq, other=0.0)
    active = m != 0.0
    behaviour = logp
    if HAS_OLD:
        behaviour = tl.where(active, tl.load(old_ptr + idx, mask=in_seq, other=0.0), logp)
    ref = logp
    if HAS_KL:
        ref = tl.where(active, tl.load(ref_ptr + idx, mask=in_seq, other=0.0), logp)
    sampling = behaviour
    if HAS_SAMPLING:
        sampling = tl.where(active, tl.load(sampling_ptr + idx, mask=in_seq, other=0.0), behaviour)
    log_ratio = tl.where(active, logp - behaviour, 0.0)
    return logp, m, active, behaviour, ref, sampling, log_ratio


@triton.jit
def _nan_to_num(x):
    """torch.nan_to_num(x, nan=0): NaN to 0, +-inf to +-the largest float32."""
    x = tl.where(x == x, x, 0.0)
    return tl.minimum(tl.maximum(x, -3.4028234663852886e38), 3.4028234663852886e38)


@triton.jit
def _vespo_log_clamp(log_w):
    """A log weight clamped to VESPO's [log(1e-8), 20] (lowmem_vt.grpo.vespo_weights)."""
    return tl.minimum(tl.maximum(log_w, -18.420680743952367), 20.0)


@triton.jit
def _correct(ratio, clip_min, clip_max, MASK: tl.constexpr):
    """The sampler correction's ratio truncated to [clip_min, clip_max], or set to 0 outside it; and the mask flag
    (fp32 0 / 1)."""
    if MASK:
        masked = (ratio < clip_min) | (ratio > clip_max)
        return tl.where(masked, 0.0, ratio), tl.where(masked, 1.0, 0.0)
    return tl.minimum(tl.maximum(ratio, clip_min), clip_max), tl.zeros_like(ratio)


@triton.jit
def _policy_terms_kernel(
    logp_ptr, old_ptr, ref_ptr, sampling_ptr, mask_ptr, weights_ptr, token_weight_ptr, adv_ptr,
    loss_ptr, dlogp_ptr, k3_ptr, clipped_ptr, ratio_ptr, is_ratio_ptr, is_masked_ptr, phi_ptr,
    T, beta, ratio_low, ratio_high, eps_high, delta, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg,
    opm_threshold, clip_min, clip_max,
    LOSS: tl.constexpr, SEQUENCE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr, BIAS_KL: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, OFF_POLICY_MASK: tl.constexpr,
    HAS_SAMPLING: tl.constexpr, CORRECTION: tl.constexpr, CORRECTION_MASKS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per completion b (tokens b T .. b T + T - 1); see the module docstring for the three passes."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    offs = tl.arange(0, BLOCK_T)
    adv = tl.load(adv_ptr + b)

    # pass 1: the completion's sums
    tokens = 0.0
    log_ratio_sum = 0.0
    sampler_sum = 0.0
    behaviour_kl_sum = 0.0
    vespo_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        in_seq = offs < T - t0
        idx = base + t0 + offs
        logp, m, active, behaviour, ref, sampling, log_ratio = _token_inputs(
            logp_ptr, old_ptr, ref_ptr, sampling_ptr, mask_ptr, idx, in_seq, HAS_OLD, HAS_KL, HAS_SAMPLING)
        tokens += tl.sum(m, axis=0)
        log_ratio_sum += tl.sum(log_ratio * m, axis=0)
        sampler_diff = _nan_to_num((behaviour - sampling) * m)
        if CORRECTION == 2:
            sampler_sum += tl.sum(sampler_diff, axis=0)
        if OFF_POLICY_MASK:
            behaviour_kl_sum += tl.sum(_nan_to_num(sampling - logp) * m, axis=0)
        if LOSS == 3:  # the token log-ratio is clamped to [-20, 20] (lowmem_vt.grpo.vespo_weights)
            vespo_sum += tl.sum(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0) * m, axis=0)
            if CORRECTION == 1:
                c, _ = _correct(tl.exp(sampler_diff), clip_min, clip_max, CORRECTION_MASKS)
                log_c = _vespo_log_clamp(tl.log(tl.maximum(c, 1e-30)))
                vespo_sum += tl.sum(tl.where(in_seq, log_c, 0.0), axis=0)
    count = tl.maximum(tokens, 1.0)

    # the completion's scalars: GSPO's ratio, the sequence correction, the off-policy mask, VESPO's weight
    seq_ratio = tl.exp(log_ratio_sum / count)
    seq_c = 1.0
    seq_masked = 0.0
    if CORRECTION == 2:
        seq_c, seq_masked = _correct(tl.exp(sampler_sum), clip_min, clip_max, CORRECTION_MASKS)
    keep = 1.0
    if OFF_POLICY_MASK:
        keep = tl.maximum(tl.where(adv >= 0.0, 1.0, 0.0), tl.where(behaviour_kl_sum / count <= opm_threshold, 1.0, 0.0))
    phi = 0.0
    if LOSS == 3:
        if CORRECTION == 2:
            vespo_sum += _vespo_log_clamp(tl.log(tl.maximum(seq_c, 1e-30)))
        log_w = _vespo_log_clamp(vespo_sum)
        k = tl.where(adv >= 0.0, k_pos, k_neg)
        lam = tl.maximum(tl.where(adv >= 0.0, lam_pos, lam_neg), 1e-4)
        phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
        phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)
        tl.store(phi_ptr + b, phi)

    # pass 2: per token loss, direct derivative, stats' terms; G = sum of w d(loss) / d rho (sequence level)
    g_seq = 0.0
    for t0 in range(0, T, BLOCK_T):
        in_seq = offs < T - t0
        idx = base + t0 + offs
        logp, m, active, behaviour, ref, sampling, log_ratio = _token_inputs(
            logp_ptr, old_ptr, ref_ptr, sampling_ptr, mask_ptr, idx, in_seq, HAS_OLD, HAS_KL, HAS_SAMPLING)
        w = tl.load(weights_ptr + idx, mask=in_seq, other=0.0)
        if SEQUENCE:
            rho = tl.zeros_like(logp) + seq_ratio
        else:
            rho = tl.exp(log_ratio)
        # the policy term P and its derivatives: in rho (dp_drho) and in logp directly (dp_dlogp)
        dp_dlogp = tl.zeros_like(logp)
        dp_drho = tl.zeros_like(logp)
        clipped = tl.zeros_like(logp)  # 0 / 1
        if LOSS == 0:
            capped = rho
            capped_passes = rho == rho
            if HAS_DELTA:
                capped = tl.minimum(rho, delta)
                capped_passes = rho <= delta
            unclipped = capped * adv
            clipped_side = tl.minimum(tl.maximum(rho, ratio_low), ratio_high) * adv
            policy = -tl.minimum(unclipped, clipped_side)
            share_unclipped = tl.where(unclipped < clipped_side, 1.0, tl.where(unclipped == clipped_side, 0.5, 0.0))
            share_clipped = tl.where(clipped_side < unclipped, 1.0, tl.where(unclipped == clipped_side, 0.5, 0.0))
            in_range = (rho >= ratio_low) & (rho <= ratio_high)
            dp_drho = -(tl.where(capped_passes, share_unclipped, 0.0) + tl.where(in_range, share_clipped, 0.0)) * adv
            clipped = tl.where(clipped_side < unclipped, 1.0, 0.0)
        elif LOSS == 1:
            cap = tl.minimum(rho, eps_high)
            policy = -cap * adv * logp
            dp_dlogp = -cap * adv
            clipped = tl.where(rho > eps_high, 1.0, 0.0) * tl.where(adv > 0.0, 1.0, 0.0)
        elif LOSS == 2:
            tau = tl.where(adv > 0.0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (rho - 1.0))
            policy = -gate * 4.0 / tau * adv
            dp_drho = -(4.0 / tau) * adv * gate * (1.0 - gate) * tau
        else:
            policy = -phi * adv * logp
            dp_dlogp = tl.zeros_like(logp) - phi * adv
        # f: the masks and the sampler correction that multiply the policy term (no gradient)
        f = tl.zeros_like(logp) + keep
        if HAS_TOKEN_WEIGHT:
            f = tl.load(token_weight_ptr + idx, mask=in_seq, other=0.0) * keep
        c = tl.zeros_like(logp) + seq_c
        c_masked = tl.zeros_like(logp) + seq_masked
        if CORRECTION == 1:
            c, c_masked = _correct(tl.exp(_nan_to_num((behaviour - sampling) * m)), clip_min, clip_max, CORRECTION_MASKS)
        if LOSS != 3:
            f = f * c
        token_loss = policy * f
        d_direct = f * dp_dlogp
        d_rho = f * dp_drho
        k3 = tl.zeros_like(logp)
        if HAS_KL:
            kl_delta = tl.where(active, ref - logp, 0.0)
            exp_delta = tl.exp(kl_delta)
            k3 = exp_delta - kl_delta - 1.0
            dk3 = tl.where(active, 1.0 - exp_delta, 0.0)
            if BIAS_KL:
                d_rho += beta * k3
                dk3 = dk3 * rho
                k3 = k3 * rho
            token_loss += beta * k3
            d_direct += beta * dk3
        if SEQUENCE:
            g_seq += tl.sum(w * d_rho, axis=0)
            dlogp = w * d_direct
        else:
            dlogp = w * (d_direct + d_rho * tl.where(active, rho, 0.0))
        tl.store(loss_ptr + idx, token_loss * w, mask=in_seq)
        tl.store(dlogp_ptr + idx, dlogp, mask=in_seq)
        tl.store(k3_ptr + idx, k3, mask=in_seq)
        tl.store(clipped_ptr + idx, clipped, mask=in_seq)
        tl.store(ratio_ptr + idx, rho, mask=in_seq)
        if CORRECTION != 0:
            tl.store(is_ratio_ptr + idx, c, mask=in_seq)
            tl.store(is_masked_ptr + idx, c_masked, mask=in_seq)

    # pass 3 (sequence level): each token's share of d loss / d rho through rho = exp(sum_u m_u lr_u / count)
    if SEQUENCE:
        share = g_seq * seq_ratio / count
        for t0 in range(0, T, BLOCK_T):
            in_seq = offs < T - t0
            idx = base + t0 + offs
            m = tl.load(mask_ptr + idx, mask=in_seq, other=0.0)
            dlogp = tl.load(dlogp_ptr + idx, mask=in_seq, other=0.0)
            tl.store(dlogp_ptr + idx, dlogp + share * m, mask=in_seq)


def _params(beta: float, epsilon_low: float, epsilon_high: float, variant: LossVariant, correction: SamplerCorrection) -> list[float]:
    inf = math.inf
    return [float(beta), 1.0 - float(epsilon_low), 1.0 + float(epsilon_high), float(epsilon_high),
            inf if variant.delta is None else float(variant.delta), variant.sapo_temperature_pos,
            variant.sapo_temperature_neg, variant.vespo_k_pos, variant.vespo_lambda_pos, variant.vespo_k_neg,
            variant.vespo_lambda_neg, inf if variant.off_policy_mask_threshold is None else float(variant.off_policy_mask_threshold),
            -inf if correction.clip_min is None else float(correction.clip_min),
            inf if correction.clip_max is None else float(correction.clip_max)]


@torch.library.custom_op("lowmem_vt::policy_terms", mutates_args=())
def policy_terms_op(
    logp: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    sampling_logp: torch.Tensor | None, mask: torch.Tensor, weights: torch.Tensor, token_weight: torch.Tensor | None,
    seq_len: int, params: list[float], modes: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss terms of one micro-batch on [N] = [B * seq_len] fp32 vectors (``policy_loss`` prepares them).

    logp, old_logp, ref_logp, sampling_logp, mask, weights (``aggregation_weights``), token_weight (the entropy
    mask, 0/1): [N]; advantages: [B]. params: ``_params``; modes: [loss kind, sequence level, has delta,
    bias-corrected KL, off-policy mask, correction level (CORRECTION_LEVEL), the correction masks]. Returns (loss [] fp32, then [N] fp32: weighted d loss /
    d logp, k3 as added, clip flag, ratio, sampler ratio, sampler mask flag; phi [B]). Differentiable in logp
    only: the backward is d loss / d logp times the incoming gradient.
    """
    N = logp.shape[0]
    B = advantages.shape[0]
    f32 = dict(device=logp.device, dtype=torch.float32)
    token_loss, dlogp, k3, clipped, ratio = (torch.zeros(N, **f32) for _ in range(5))
    is_ratio, is_masked = torch.ones(N, **f32), torch.zeros(N, **f32)
    phi = torch.zeros(B, **f32)
    loss_kind, sequence, has_delta, bias_kl, off_policy, correction, correction_masks = modes
    has_kl = ref_logp is not None and params[0] != 0.0
    if N > 0:
        _policy_terms_kernel[(B,)](
            logp, logp if old_logp is None else old_logp, ref_logp if has_kl else logp,
            logp if sampling_logp is None else sampling_logp, mask, weights,
            weights if token_weight is None else token_weight, advantages,
            token_loss, dlogp, k3, clipped, ratio, is_ratio, is_masked, phi,
            seq_len, *params,
            LOSS=loss_kind, SEQUENCE=bool(sequence), HAS_OLD=old_logp is not None, HAS_KL=has_kl,
            HAS_DELTA=bool(has_delta), BIAS_KL=bool(bias_kl), HAS_TOKEN_WEIGHT=token_weight is not None,
            OFF_POLICY_MASK=bool(off_policy), HAS_SAMPLING=sampling_logp is not None, CORRECTION=correction,
            CORRECTION_MASKS=bool(correction_masks), BLOCK_T=BLOCK_T,
        )
    return token_loss.sum(), dlogp, k3, clipped, ratio, is_ratio, is_masked, phi


@policy_terms_op.register_fake
def _(logp, advantages, old_logp, ref_logp, sampling_logp, mask, weights, token_weight, seq_len, params, modes):
    rows = [logp.new_empty(logp.shape[0], dtype=torch.float32) for _ in range(6)]
    return (logp.new_empty((), dtype=torch.float32), *rows, advantages.new_empty(advantages.shape[0], dtype=torch.float32))


def _setup(ctx, inputs, output):
    _loss, dlogp, *rest = output
    ctx.save_for_backward(dlogp)
    ctx.mark_non_differentiable(dlogp, *rest)


def _backward(ctx, grad_loss, *_non_differentiable):
    (dlogp,) = ctx.saved_tensors
    return (dlogp * grad_loss,) + (None,) * 10


policy_terms_op.register_autograd(_backward, setup_context=_setup)


def policy_loss(
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
    """``lowmem_vt.grpo.grpo_loss`` by the Triton terms kernel: the same arguments, (loss, stats) equal within fp32
    rounding, the loss differentiable in logp ([B, T] fp32, from a head) through ``policy_terms_op`` alone.

    advantages: [B]; old_logp, ref_logp, sampling_logp, entropy: [B, T] or None; mask: [B, T].
    """
    check_loss_inputs(variant, correction, sampling_logp, entropy)
    if loss_type not in LOSS_KIND:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {tuple(LOSS_KIND)}")
    B, T = logp.shape
    token_weight = None
    if variant.needs_entropy:
        # a batch-level order statistic (torch.quantile over the micro-batch): computed here, passed in as a weight
        token_weight = high_entropy_mask(entropy, mask, variant.top_entropy_quantile).float().reshape(-1)

    def flat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().float().reshape(-1).contiguous()

    modes = [LOSS_KIND[loss_type], int(variant.importance_sampling_level == "sequence"), int(variant.delta is not None),
             int(variant.bias_corrected_kl), int(variant.off_policy_mask_threshold is not None),
             CORRECTION_LEVEL[correction.mode.split("_")[0]], int(correction.mode.endswith("mask"))]
    loss, _dlogp, k3, clipped, ratio, is_ratio, is_masked, phi = policy_terms_op(
        logp.float().reshape(-1).contiguous(), advantages.detach().float().contiguous(), flat(old_logp), flat(ref_logp),
        flat(sampling_logp), flat(mask), aggregation_weights(mask, loss_type, counts).float().reshape(-1).contiguous(),
        token_weight, T, _params(beta, epsilon_low, epsilon_high, variant, correction), modes)

    # the stats: lowmem_vt.grpo.loss_stats on the kernel's terms, shaped as the reference's ([B, 1] per completion)
    def per(x: torch.Tensor, sequence: bool) -> torch.Tensor:
        x = x.view(B, T)
        return x[:, :1] if sequence else x

    sequence = variant.importance_sampling_level == "sequence"
    ratio_bt = per(ratio, sequence)
    clipped_bt = per(clipped, sequence).bool()
    if loss_type in ("sapo", "vespo"):
        clipped_bt = torch.zeros_like(ratio_bt if loss_type == "sapo" else phi.view(B, 1), dtype=torch.bool)
    terms = TokenTerms(k3.view(B, T), clipped_bt, ratio_bt, phi.view(B, 1) if loss_type == "vespo" else None)
    sampler = None
    if correction.on:
        seq_mode = correction.mode.startswith("sequence")
        sampler = (per(is_ratio, seq_mode), per(is_masked, seq_mode).bool())
    # the paper's loss logs what it always did (as grpo_loss: the rest of the menu TRL's metrics)
    full = not is_paper_loss(loss_type, variant, correction) or entropy is not None
    stats = loss_stats(terms.k3, terms.clipped, mask, loss_type=loss_type, terms=terms if full else None, advantages=advantages.unsqueeze(1),
                       epsilon_low=epsilon_low, epsilon_high=epsilon_high, entropy=entropy, sampler=sampler)
    return loss, stats
