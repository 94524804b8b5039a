"""The peers as the oracle (issue 27): TRL 1.16.0's own ``GRPOTrainer._compute_loss`` and Liger 0.8.5's
``LigerFusedLinearGRPOLoss`` run on the same random inputs as ``lowmem_vt.grpo``; loss, d loss / d hidden,
d loss / d weight and the logged metrics must agree within 1e-6 in float64.

TRL's method runs unchanged on a stand-in ``self`` that holds only what it reads (the config values, a
one-process accelerator, the metrics dict) and whose ``_get_per_token_logps_and_entropies`` is the LM head of the
test (hidden @ W.T / temperature, TRL's own ``selective_log_softmax`` and ``entropy_from_logits``). The sampler
correction's ratio is computed before TRL's loss (in TRL, in ``_generate_and_score_completions``, which needs a
model and a sampler): ours is fed to TRL's loss as its ``importance_sampling_ratio``, and checked against the
formula by hand in ``test_sampler_correction_ratio_by_hand``.
"""

from __future__ import annotations

import math
import types
import zlib
from collections import defaultdict

import pytest
import torch

from lowmem_vt.grpo import (
    LOSS_TYPES,
    SAMPLER_CORRECTIONS,
    LossCounts,
    LossVariant,
    SamplerCorrection,
    grpo_loss,
    sampler_correction_ratio,
)
from lowmem_vt.kernels.chunked_logprobs import chunked_entropy, chunked_logprobs_reference

trl_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL 1.16 is the oracle: pip install -e '.[peers]'")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, T, V, H = 6, 7, 40, 16
TEMPERATURE = 0.9
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _inputs(seed: int, masks: bool, with_old: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    hidden = torch.randn(B, T, H, generator=g, dtype=d)
    weight = torch.randn(V, H, generator=g, dtype=d) * 0.7
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(d)
    if masks:
        mask[4] = 0.0  # a truncated completion under mask_truncated_completions: masked whole
    with torch.no_grad():
        logp = chunked_logprobs_reference(hidden.reshape(-1, H), weight, targets.reshape(-1), TEMPERATURE).view(B, T)
    # old / sampler log-probs near the policy's (ratios around 1, some clipped, some outside [0, 3] in sum)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=d) if with_old else None
    sampling = logp + 0.25 * torch.randn(B, T, generator=g, dtype=d)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=d)
    advantages = torch.randn(B, generator=g, dtype=d)
    advantages[1] = 0.0
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, old=old, sampling=sampling, ref=ref,
                advantages=advantages)


def _variant(masks: bool, level: str) -> LossVariant:
    if not masks:
        return LossVariant(importance_sampling_level=level)
    return LossVariant(importance_sampling_level=level, delta=1.5, top_entropy_quantile=0.5, off_policy_mask_threshold=0.05,
                       bias_corrected_kl=True, sapo_temperature_pos=0.8, sapo_temperature_neg=1.2, vespo_k_pos=1.5,
                       vespo_lambda_neg=2.5)


def _trl_stub(loss_type: str, variant: LossVariant, correction: SamplerCorrection, beta: float, weight, temperature):
    """A ``self`` for TRL's unbound ``_compute_loss``: only the attributes it reads."""
    Trainer = trl_trainer.GRPOTrainer
    accelerator = types.SimpleNamespace(
        num_processes=1, pad_across_processes=lambda x, dim=0, pad_index=0: x, gather=lambda x: x,
        gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x, sync_gradients=True,
    )
    args = types.SimpleNamespace(
        use_bias_correction_kl=variant.bias_corrected_kl, delta=variant.delta,
        sapo_temperature_pos=variant.sapo_temperature_pos, sapo_temperature_neg=variant.sapo_temperature_neg,
        vespo_k_pos=variant.vespo_k_pos, vespo_lambda_pos=variant.vespo_lambda_pos, vespo_k_neg=variant.vespo_k_neg,
        vespo_lambda_neg=variant.vespo_lambda_neg, steps_per_generation=1,
    )
    stub = types.SimpleNamespace(
        args=args, accelerator=accelerator, model=types.SimpleNamespace(training=True), aux_loss_enabled=False,
        top_entropy_quantile=variant.top_entropy_quantile, off_policy_mask_threshold=variant.off_policy_mask_threshold,
        importance_sampling_level=variant.importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=correction.on, vllm_importance_sampling_correction=correction.on,
        current_gradient_accumulation_steps=1, max_completion_length=T, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=Trainer.get_off_policy_mask, get_gamma_weights=Trainer.get_gamma_weights,
    )
    stub.get_high_entropy_mask = types.MethodType(Trainer.get_high_entropy_mask, stub)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logits = model["hidden"] @ weight.T / temperature
        logp = trl_utils.selective_log_softmax(logits, model["targets"])
        return logp, trl_utils.entropy_from_logits(logits), None

    stub._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    return stub


def _trl_loss(x: dict, loss_type: str, variant: LossVariant, correction: SamplerCorrection, beta: float):
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    stub = _trl_stub(loss_type, variant, correction, beta, weight, TEMPERATURE)
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": x["targets"], "completion_mask": x["mask"], "advantages": x["advantages"],
        "num_items_in_batch": x["mask"].sum(),
    }
    with torch.no_grad():
        policy = chunked_logprobs_reference(x["hidden"].reshape(-1, H), x["weight"], x["targets"].reshape(-1), TEMPERATURE).view(B, T)
    old = x["old"]
    if old is not None:
        inputs["old_per_token_logps"] = old
    elif correction.on:  # TRL always computes the old log-probs when it corrects: the policy's, before the update
        inputs["old_per_token_logps"] = policy.clone()
    if beta:
        inputs["ref_per_token_logps"] = x["ref"]
    if correction.on:
        ratio, _ = sampler_correction_ratio(policy if old is None else old, x["sampling"], x["mask"], correction)
        inputs["importance_sampling_ratio"] = ratio
        inputs["sampling_per_token_logps"] = x["sampling"]
    loss = trl_trainer.GRPOTrainer._compute_loss(stub, {"hidden": hidden, "targets": x["targets"]}, inputs)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.detach(), dh, dw, metrics


def _our_loss(x: dict, loss_type: str, variant: LossVariant, correction: SamplerCorrection, beta: float, loss_fn=grpo_loss):
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    logp = chunked_logprobs_reference(hidden.reshape(-1, H), weight, x["targets"].reshape(-1), TEMPERATURE).view(B, T)
    entropy = chunked_entropy(hidden.detach().reshape(-1, H), weight.detach(), TEMPERATURE).view(B, T)
    counts = LossCounts(B, float(x["mask"].sum()), T)
    loss, stats = loss_fn(logp, x["mask"], x["advantages"], x["old"], x["ref"] if beta else None, beta=beta,
                            epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type=loss_type, counts=counts, variant=variant,
                            correction=correction, sampling_logp=x["sampling"] if correction.on else None,
                            entropy=entropy)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    s = {k: float(v) for k, v in stats.items()}
    metrics = {"entropy": s["entropy_sum"] / s["tokens"]}
    if beta:
        metrics["kl"] = s["kl_token_sum"] / s["tokens"]
    if "clip_low" in s:
        for side in ("low", "high", "region"):
            metrics[f"clip_ratio/{side}_mean"] = s[f"clip_{side}"] / s["clip_units"]
    if "cispo_clipped" in s:
        metrics["cispo_clip_ratio"] = s["cispo_clipped"] / s["clip_units"]
    if "phi_sum" in s:
        metrics["vespo/phi_seq_mean"] = s["phi_sum"] / B
    return loss.detach(), dh, dw, metrics


SETTINGS = [("plain", False, False), ("plain+old", False, True), ("masks+old", True, True)]


@pytest.mark.parametrize("correction_mode", SAMPLER_CORRECTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_gradients_and_metrics_match_trl(loss_type, level, beta, correction_mode):
    if loss_type == "vespo" and correction_mode.startswith("sequence"):
        pytest.skip("TRL refuses vespo with a sequence-level correction (so does our config)")
    correction = SamplerCorrection(correction_mode, clip_min=0.5 if "mask" in correction_mode else None, clip_max=2.0)
    for name, masks, with_old in SETTINGS:
        x = _inputs(zlib.crc32(f"{loss_type} {level} {beta} {correction_mode} {name}".encode()), masks, with_old)
        variant = _variant(masks, level)
        t_loss, t_dh, t_dw, t_metrics = _trl_loss(x, loss_type, variant, correction, beta)
        o_loss, o_dh, o_dw, o_metrics = _our_loss(x, loss_type, variant, correction, beta)
        where = f"{loss_type} {level} beta={beta} {correction_mode} {name}"
        torch.testing.assert_close(o_loss, t_loss, rtol=1e-6, atol=1e-9, msg=lambda m: f"{where}: loss\n{m}")
        torch.testing.assert_close(o_dh, t_dh, rtol=1e-6, atol=1e-9, msg=lambda m: f"{where}: d loss / d hidden\n{m}")
        torch.testing.assert_close(o_dw, t_dw, rtol=1e-6, atol=1e-9, msg=lambda m: f"{where}: d loss / d weight\n{m}")
        for key, ours in o_metrics.items():
            assert key in t_metrics, (where, key, sorted(t_metrics))
            assert math.isclose(ours, t_metrics[key], rel_tol=1e-6, abs_tol=1e-9), (where, key, ours, t_metrics[key])
        compared = {k for k in t_metrics if not k.endswith(("_min", "_max"))}  # per-sequence extremes: not logged here
        assert compared <= set(o_metrics), (where, compared - set(o_metrics))
        assert t_loss.abs() > 0 or beta == 0.0


# the Triton terms kernel (kernels/policy_terms.py, fp32 like the heads' terms) against TRL: each loss type at both
# levels, a correction mode each (vespo: token modes only), TRL's masks, old log-probs, beta 0.04
KERNEL_CASES = [(lt, lv, SAMPLER_CORRECTIONS[(i + j) % 5]) for i, lt in enumerate(LOSS_TYPES) for j, lv in enumerate(("token", "sequence"))]
KERNEL_CASES = [(lt, lv, m) if not (lt == "vespo" and m.startswith("sequence")) else (lt, lv, "token_mask") for lt, lv, m in KERNEL_CASES]


def test_the_terms_kernel_matches_trl():
    """The kernel's loss, the log-probs' dh and dW through it and TRL's logged metrics from its stats, against TRL's
    float64 numbers within 1e-5 (the kernel computes in fp32, as the heads do; vespo 1e-4, see below)."""
    from lowmem_vt.kernels.policy_terms import policy_loss

    for loss_type, level, mode in KERNEL_CASES:
        correction = SamplerCorrection(mode, clip_min=0.5 if "mask" in mode else None, clip_max=2.0)
        x = _inputs(zlib.crc32(f"kernel {loss_type} {level} {mode}".encode()), True, True)
        variant = _variant(True, level)
        t_loss, t_dh, t_dw, t_metrics = _trl_loss(x, loss_type, variant, correction, 0.04)
        o_loss, o_dh, o_dw, o_metrics = _our_loss(x, loss_type, variant, correction, 0.04, loss_fn=policy_loss)
        where = f"kernel {loss_type} {level} {mode}"
        # VESPO's weight exp(lambda + k log w - lambda w) of the summed log-ratio turns fp32's rounding of each
        # log-prob (~2e-7 nat) into up to |k - lambda w| x T times that: 1e-4 there
        tol = dict(rtol=1e-4 if loss_type == "vespo" else 1e-5, atol=1e-7)
        torch.testing.assert_close(o_loss.double(), t_loss, **tol, msg=lambda m: f"{where}: loss\n{m}")
        torch.testing.assert_close(o_dh, t_dh, **tol, msg=lambda m: f"{where}: d loss / d hidden\n{m}")
        torch.testing.assert_close(o_dw, t_dw, **tol, msg=lambda m: f"{where}: d loss / d weight\n{m}")
        for key, ours in o_metrics.items():
            assert math.isclose(ours, t_metrics[key], rel_tol=tol["rtol"], abs_tol=1e-7), (where, key, ours, t_metrics[key])


def test_the_oracle_sees_a_wrong_loss():
    """A realistic wrong answer (epsilon_high 1 % off; the KL term dropped) fails the comparison."""
    x = _inputs(3, True, True)
    variant, correction = _variant(True, "token"), SamplerCorrection("token_truncate", clip_max=2.0)
    t_loss, t_dh, _, _ = _trl_loss(x, "dapo", variant, correction, 0.04)
    global EPS_HIGH
    saved, EPS_HIGH = EPS_HIGH, EPS_HIGH * 1.01
    try:
        o_loss, o_dh, _, _ = _our_loss(x, "dapo", variant, correction, 0.04)
    finally:
        EPS_HIGH = saved
    assert not torch.allclose(o_dh, t_dh, rtol=1e-6, atol=1e-9) or not torch.allclose(o_loss, t_loss, rtol=1e-6)
    o_loss, _, _, _ = _our_loss(x, "dapo", variant, correction, 0.0)
    assert not torch.allclose(o_loss, t_loss, rtol=1e-6)


def test_sampler_correction_ratio_by_hand():
    policy = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -1.0], [-0.5, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    e = math.exp
    r, masked = sampler_correction_ratio(policy, sampler, mask, SamplerCorrection("token_truncate", None, 3.0))
    torch.testing.assert_close(r, torch.tensor([[3.0, 1.0, e(-1)], [1.0, e(-1), 1.0]]))
    assert not masked.any()
    r, masked = sampler_correction_ratio(policy, sampler, mask, SamplerCorrection("token_mask", 0.5, 3.0))
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert masked.tolist() == [[True, False, True], [False, True, False]]
    r, _ = sampler_correction_ratio(policy, sampler, mask, SamplerCorrection("sequence_truncate", 0.5, 3.0))
    torch.testing.assert_close(r, torch.tensor([[e(0.5)], [0.5]]))  # sums 1.5 - 1 = 0.5 and -1
    r, masked = sampler_correction_ratio(policy, sampler, mask, SamplerCorrection("sequence_mask", 0.5, 3.0))
    torch.testing.assert_close(r, torch.tensor([[e(0.5)], [0.0]]))
    assert masked.flatten().tolist() == [False, True]
