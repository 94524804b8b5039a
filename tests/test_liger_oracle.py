"""Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` (its chunked fused-linear GRPO loss, the peer of our heads) as
an oracle of ``lowmem_vt.grpo`` where it has the variant (issue 27): every loss type it shares with TRL's meaning
(luspo only at the sequence level without KL or a token correction: Liger's luspo weighs each token by its
completion's length over B x T, TRL 1.16's sums each completion's tokens; they agree only on (B, 1) terms), both levels where it allows them (not cispo / sapo / vespo at the
sequence level), beta 0 / 0.04, the sampler correction's ratio, delta and the bias-corrected KL. Liger computes in
float32 here whatever the inputs: the bounds are float32's (1e-5)."""

from __future__ import annotations

import zlib

import pytest
import torch

from lowmem_vt.grpo import LossCounts, LossVariant, SamplerCorrection, grpo_loss, sampler_correction_ratio
from lowmem_vt.kernels.chunked_logprobs import chunked_logprobs_reference

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger 0.8.5 is an oracle: pip install -e '.[peers]'")

B, T, H, V = 4, 9, 16, 48
TEMPERATURE = 0.9
CASES = [
    # loss_type, level, beta, correction, extras (delta + bias-corrected KL)
    ("grpo", "token", 0.04, "none", False),
    ("grpo", "sequence", 0.0, "token_truncate", True),
    ("dr_grpo", "token", 0.04, "sequence_mask", True),
    ("bnpo", "sequence", 0.04, "none", False),
    ("dapo", "token", 0.0, "token_mask", True),
    ("dapo", "sequence", 0.04, "sequence_truncate", False),
    ("cispo", "token", 0.04, "token_truncate", False),
    ("sapo", "token", 0.0, "sequence_mask", False),
    ("sapo", "token", 0.04, "none", True),
    ("luspo", "sequence", 0.0, "none", False),
    ("luspo", "sequence", 0.0, "sequence_truncate", True),  # (B, 1) terms only: Liger's luspo = TRL's there
    ("vespo", "token", 0.0, "token_mask", False),
    ("vespo", "token", 0.04, "none", False),
]


@pytest.mark.parametrize("loss_type, level, beta, correction_mode, extras", CASES)
def test_matches_liger(loss_type, level, beta, correction_mode, extras):
    g = torch.Generator().manual_seed(zlib.crc32(f"{loss_type} {level} {beta} {correction_mode}".encode()))
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([9, 4, 6, 2])[:, None]).float()
    advantages = torch.randn(B, generator=g)
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden.reshape(-1, H), weight, targets.reshape(-1), TEMPERATURE).view(B, T)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    sampling = old + 0.2 * torch.randn(B, T, generator=g)
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    correction = SamplerCorrection(correction_mode, clip_min=0.5 if "mask" in correction_mode else None, clip_max=2.0)
    variant = LossVariant(importance_sampling_level=level, delta=1.5 if extras else None, bias_corrected_kl=extras)
    ratio = sampler_correction_ratio(old, sampling, mask, correction)[0] if correction.on else None

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    peer = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=2, epsilon_low=0.2, epsilon_high=eps_high,
        loss_type=loss_type, max_completion_length=T, importance_sampling_level=level, temperature=TEMPERATURE,
        delta=variant.delta, use_bias_correction_kl=extras,
    )
    out = peer(h1, w1, targets, mask, advantages, ref_per_token_logps=ref if beta else None, old_per_token_logps=old,
               vllm_is_ratio=ratio)
    peer_loss = out[0] if isinstance(out, tuple) else out
    peer_dh, peer_dw = torch.autograd.grad(peer_loss, (h1, w1))

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours_logp = chunked_logprobs_reference(h2.reshape(-1, H), w2, targets.reshape(-1), TEMPERATURE).view(B, T)
    loss, _ = grpo_loss(ours_logp, mask, advantages, old, ref if beta else None, beta=beta, epsilon_low=0.2,
                        epsilon_high=eps_high, loss_type=loss_type, counts=LossCounts(B, float(mask.sum()), T),
                        variant=variant, correction=correction, sampling_logp=sampling if correction.on else None)
    dh, dw = torch.autograd.grad(loss, (h2, w2))
    where = f"{loss_type} {level} beta={beta} {correction_mode} extras={extras}"
    torch.testing.assert_close(loss, peer_loss.to(loss.dtype), rtol=1e-5, atol=1e-7, msg=lambda m: f"{where}: loss\n{m}")
    torch.testing.assert_close(dh, peer_dh, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: dh\n{m}")
    torch.testing.assert_close(dw, peer_dw, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: dW\n{m}")
